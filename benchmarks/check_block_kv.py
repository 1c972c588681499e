"""Exactness of block-KV reuse: question logits from a composed cache vs the library's full forward (dial 1, restart).

    python benchmarks/check_block_kv.py [--model DIR] [--docs 4] [--doc_tokens 64]

Per registered causal architecture (tiny random configs, fp32, GQA where the architecture has it; Gemma 2 / 3 with
a sliding window wider than the prefix) and, with ``--model``, on a real checkpoint: the max abs difference of the
question's logits and whether greedy generation gives the same tokens. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import table  # noqa: E402

import hf_localist as hl  # noqa: E402

TINY = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, initializer_range=0.2)


def tiny(model_type: str):
    kw = dict(TINY)
    if model_type == "gpt2":
        kw = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2)
    if model_type in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "olmo2", "gemma", "gemma2", "gemma3_text",
                      "phi3"):
        kw["num_key_value_heads"] = 2
    if model_type in ("gemma", "qwen3", "gemma2", "gemma3_text", "phi"):
        kw["head_dim"] = 8
    if model_type in ("gemma2", "gemma3_text"):
        kw.update(sliding_window=128, layer_types=["sliding_attention", "full_attention"])
    if model_type == "mixtral":
        kw.update(num_local_experts=2, num_experts_per_tok=1)
    if model_type == "opt":
        kw.update(ffn_dim=64, word_embed_proj_dim=32)
    kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    attn = "eager" if model_type == "gemma2" else "sdpa"
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw), attn_implementation=attn).eval()


def check(model, sink: int, docs: list[list[int]], question: list[int], new_tokens: int = 8) -> tuple[float, bool]:
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit",
                                                        block_positions="restart", max_blocks=max(len(docs), 1)))
    blocks = [handle.encode_block(d, sink_token_id=sink) for d in docs]
    ids, bids = hl.composed_sequence(blocks, question)
    q = torch.tensor([question])
    with torch.no_grad():
        out = model(input_ids=q, cache=handle.compose_cache(blocks)).logits[0]
        ref = model(input_ids=ids, block_ids=bids).logits[0, -len(question):]
    gen = model.generate(q, cache=handle.compose_cache(blocks), max_new_tokens=new_tokens, do_sample=False)
    full = model.generate(ids, block_ids=bids, max_new_tokens=new_tokens, do_sample=False)
    if getattr(model.generation_config, "eos_token_id", None) is not None:
        n = min(gen.shape[1] - q.shape[1], full.shape[1] - ids.shape[1])
    else:
        n = new_tokens
    same = gen[0, q.shape[1]:q.shape[1] + n].tolist() == full[0, ids.shape[1]:ids.shape[1] + n].tolist()
    handle.revert()
    return (out - ref).abs().max().item(), same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a real checkpoint directory (e.g. from hf-localist fetch)")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--doc_tokens", type=int, default=24)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for model_type in hl.supported_architectures():
        if not hl.get_arch_spec(model_type).causal:
            continue
        docs = [torch.randint(3, 100, (args.doc_tokens,), generator=g).tolist() for _ in range(args.docs)]
        question = torch.randint(3, 100, (8,), generator=g).tolist()
        model = tiny(model_type)
        model.generation_config.eos_token_id = None
        diff, same = check(model, 1, docs, question)
        rows.append([model_type, "tiny, random", f"{diff:.1e}", "yes" if same else "no"])
        print(rows[-1], flush=True)
    if args.model:
        from transformers import AutoTokenizer

        from hf_localist.demo.passages import sink_token_id

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        text = open(os.path.join(os.path.dirname(hl.__file__), "data", "ag_news_sample.csv"), encoding="utf-8").read()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        n = 4 * args.doc_tokens
        docs = [ids[i * n:(i + 1) * n] for i in range(args.docs)]
        question = tok(" Which of these stories is about sports?", add_special_tokens=False)["input_ids"]
        diff, same = check(model, sink_token_id(tok), docs, question)
        rows.append([model.config.model_type, os.path.basename(os.path.normpath(args.model)), f"{diff:.1e}",
                     "yes" if same else "no"])
    print(table(["architecture", "weights", "max abs logit diff", "same greedy tokens"], rows))


if __name__ == "__main__":
    main()
