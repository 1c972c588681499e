"""Quality of block-KV reuse on a real checkpoint: a continuation read over composed cached blocks vs a full prefill.

Two multi-document tasks from the shared data (``--data_dir``), ``n`` documents each (``--docs``, default 4 and 8):

- ``recall``: n AG News test articles, each ``"Title: <title>\\n<description>"`` (one block each); then the question
  ``"\\n\\nTitle: <title of one of them>\\n"`` and the continuation: that article's description (the first
  ``--continuation`` tokens). Scored: NLL of the description's tokens. Copying from a block is what RAG needs.
- ``continue``: n consecutive ``--doc_tokens``-token pieces of Tiny Shakespeare, then the next ``--continuation``
  tokens (no question). Scored: those tokens but the first (the first is predicted, in the full prefill, from the
  last document's last position, which a composed cache does not have).

Conditions, all scoring the same tokens (nats per token):

- ``full dial 0``: the unmodified model reads ``[sink] + documents + question + continuation`` (the reference);
- ``composed``: the documents' keys and values from a :class:`hf_localist.BlockKVStore`, composed; the question and
  continuation read over the composed cache (dial 1, ``block_positions="restart"``);
- ``no context``: ``[sink] + question + continuation`` (what the documents are worth);
- ``composed + bias`` (training-free remedy, APE-style): ``LocalistConfig.general_block_bias = g``, the log-scale of
  the question's attention to the blocks; g chosen per task on ``--calibration`` separate samples (column ``g``);
- ``composed + LoRA`` (trained remedy, as Block-Attention): a LoRA adapter trained ``--lora_steps`` steps at dial 1
  (restart) on separate training samples of both tasks, loss on the question and continuation tokens; blocks encoded
  again with the adapter. Its ``full dial 0`` is reported too (what the adapter does to the model used normally).

Run: ``python experiments/block_kv_quality.py --model DIR --data_dir DATA [--quick]`` (``hf-localist fetch
smollm2-135m --output_dir DIR``). Prints a markdown table and writes ``results.json`` to ``--out_dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_localist import BlockKVStore, LocalistConfig, apply_localist
from hf_localist.demo.passages import sink_token_id, token_nll


# ---------------------------------------------------------------------------------------------- samples
def recall_samples(tok, data_dir: Path, n_docs: int, count: int, cont: int, rng: random.Random, skip: int = 0):
    """(docs, question, continuation) triples from AG News test articles (rows after ``skip``)."""
    with open(data_dir / "ag_news" / "test.csv", newline="", encoding="utf-8") as fh:
        rows = [(t, " ".join(d.replace("\\", " ").replace(" #39;", "'").split())) for _, t, d in csv.reader(fh)]
    rows = rows[skip:]
    out = []
    for i in range(count):
        chosen = rows[i * n_docs:(i + 1) * n_docs]
        docs = [tok(f"Title: {t}\n{d}", add_special_tokens=False)["input_ids"][:160] for t, d in chosen]
        k = rng.randrange(n_docs)
        question = tok(f"\n\nTitle: {chosen[k][0]}\n", add_special_tokens=False)["input_ids"]
        target = tok(chosen[k][1], add_special_tokens=False)["input_ids"][:cont]
        out.append((docs, question, target))
    return out


def continue_samples(tok, data_dir: Path, n_docs: int, count: int, doc_tokens: int, cont: int, offset: int):
    """(docs, [], continuation): consecutive Tiny Shakespeare pieces from token ``offset`` on."""
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    span = n_docs * doc_tokens + cont
    out = []
    for i in range(count):
        start = offset + i * span
        docs = [ids[start + j * doc_tokens: start + (j + 1) * doc_tokens] for j in range(n_docs)]
        out.append((docs, [], ids[start + n_docs * doc_tokens: start + span]))
    return out


# ---------------------------------------------------------------------------------------------- scoring
def scored(question: list[int], target: list[int]) -> tuple[list[int], int]:
    """Tokens read after the documents, and the index (in them) of the first scored token."""
    tail = question + target
    return tail, len(question) if question else 1  # without a question the first continuation token is not scored


@torch.no_grad()
def nll_full(model, sink: int, docs, question, target, **kw) -> tuple[float, int]:
    tail, first = scored(question, target)
    prefix = [sink] + [t for d in docs for t in d]
    ids = torch.tensor([prefix + tail])
    # all general (block 0): at dial 0 with "restart" positions that is the unmodified model, positions 0..L-1
    nll = token_nll(model(input_ids=ids, block_ids=torch.zeros_like(ids), **kw).logits, ids)[0, len(prefix) + first:]
    return float(nll.sum()), nll.numel()


@torch.no_grad()
def nll_composed(model, store: BlockKVStore, docs, question, target) -> tuple[float, int]:
    tail, first = scored(question, target)
    ids = torch.tensor([tail])
    logits = model(input_ids=ids, cache=store.compose(docs)).logits
    nll = token_nll(logits, ids)[0, first:]  # column t: NLL of tail[t] from tail[:t] and the blocks
    return float(nll.sum()), nll.numel()


def mean(pairs) -> float:
    return sum(p[0] for p in pairs) / max(sum(p[1] for p in pairs), 1)


def evaluate(model, handle, store, sink, samples, bias: float | None = None) -> dict[str, float]:
    out = {}
    handle.update(general_block_bias=0.0)
    out["full dial 0"] = mean([nll_full(model, sink, *s, localist_alpha=0.0) for s in samples])
    out["composed"] = mean([nll_composed(model, store, *s) for s in samples])
    out["no context"] = mean([nll_full(model, sink, [], s[1], s[2], localist_alpha=0.0) for s in samples])
    if bias is not None:
        handle.update(general_block_bias=bias)
        out[f"composed + bias {bias:g}"] = mean([nll_composed(model, store, *s) for s in samples])
        handle.update(general_block_bias=0.0)
    return out


def choose_bias(model, handle, store, samples, grid) -> tuple[float, dict[str, float]]:
    scores = {}
    for g in grid:
        handle.update(general_block_bias=g)
        scores[f"{g:g}"] = mean([nll_composed(model, store, *s) for s in samples])
    handle.update(general_block_bias=0.0)
    best = min(grid, key=lambda g: scores[f"{g:g}"])
    return best, scores


# ---------------------------------------------------------------------------------------------- LoRA remedy
def train_lora(model, sink: int, samples, steps: int, lr: float, r: int, seed: int):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    peft_model.train()
    for _ in range(steps):
        docs, question, target = rng.choice(samples)
        prefix = [sink] + [t for d in docs for t in d]
        ids = torch.tensor([prefix + question + target])
        blocks = torch.tensor([[0] + [j + 1 for j, d in enumerate(docs) for _ in d] + [0] * (len(question) +
                                                                                             len(target))])
        labels = ids.clone()
        labels[:, :len(prefix)] = -100  # loss on what is read over the blocks (the blocks are read alone anyway)
        loss = peft_model(input_ids=ids, block_ids=blocks, labels=labels, localist_alpha=1.0).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    peft_model.eval()
    return peft_model, losses


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", required=True, type=Path)
    p.add_argument("--docs", default="4,8")
    p.add_argument("--doc_tokens", type=int, default=96)
    p.add_argument("--continuation", type=int, default=32)
    p.add_argument("--samples", type=int, default=16, help="evaluation samples per task and document count")
    p.add_argument("--calibration", type=int, default=6, help="samples per task that choose the bias")
    p.add_argument("--bias_grid", default="-2,-1,-0.5,0.5,1")
    p.add_argument("--lora_steps", type=int, default=100, help="0: no LoRA remedy")
    p.add_argument("--lora_lr", type=float, default=5e-4)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", type=Path, default=Path("experiments/out/block_kv_quality"))
    p.add_argument("--quick", action="store_true", help="2 samples, 1 calibration sample, 2 LoRA steps")
    args = p.parse_args()
    if args.quick:
        args.samples, args.calibration, args.lora_steps = 2, 1, 2
    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    counts = [int(c) for c in args.docs.split(",")]
    handle = apply_localist(model, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart",
                                                  max_blocks=max(counts)))
    sink = sink_token_id(tok)
    rng = random.Random(args.seed)
    # Disjoint samples: evaluation first, then calibration, then LoRA training (later rows / later text).
    evals, calib, train = {}, {"recall": [], "continue": []}, []
    for i, n in enumerate(counts):
        n_eval = args.samples
        rec = recall_samples(tok, args.data_dir, n, n_eval + args.calibration, args.continuation, rng,
                             skip=i * 1000)
        shk = continue_samples(tok, args.data_dir, n, n_eval + args.calibration, args.doc_tokens, args.continuation,
                               offset=i * 40000)
        evals[("recall", n)], evals[("continue", n)] = rec[:n_eval], shk[:n_eval]
        calib["recall"] += rec[n_eval:]
        calib["continue"] += shk[n_eval:]
    for i, n in enumerate(counts):
        train += recall_samples(tok, args.data_dir, n, 60, args.continuation, rng, skip=4000 + i * 1000)
        train += continue_samples(tok, args.data_dir, n, 30, args.doc_tokens, args.continuation,
                                  offset=150000 + i * 50000)
    grid = [float(g) for g in args.bias_grid.split(",")] + [0.0]
    store = BlockKVStore(handle, max_bytes=4 << 30, sink_token_id=sink)
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "bias_grid": {}, "bias": {}, "rows": []}
    for task, samples in calib.items():  # the bias is chosen per task, on its calibration samples
        best, grid_scores = choose_bias(model, handle, store, samples, grid)
        results["bias_grid"][task], results["bias"][task] = grid_scores, best
        print(f"{task}: bias grid on {len(samples)} calibration samples: {grid_scores} -> g = {best:g}", flush=True)
    for (task, n), samples in evals.items():
        row = evaluate(model, handle, store, sink, samples, bias=results["bias"][task])
        row["composed + bias"] = row.pop(f"composed + bias {results['bias'][task]:g}")
        row = {"task": task, "docs": n, "g": results["bias"][task], **row}
        results["rows"].append(row)
        print(row, flush=True)
    store.clear()
    if args.lora_steps:
        lora_rows(model, handle, sink, train, evals, results, args)
    results["seconds"] = round(time.time() - t0, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    cols = ["full dial 0", "composed", "composed + bias", "g"]
    cols += ["composed + LoRA", "LoRA full dial 0"] if args.lora_steps else []
    cols += ["no context"]
    print("| task | docs | " + " | ".join(cols) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in cols) + " |")
    for row in results["rows"]:
        print(f"| {row['task']} | {row['docs']} | " + " | ".join(f"{row[c]:.3f}" if c != "g" else f"{row[c]:g}"
                                                                 for c in cols) + " |")
    print(f"nats per scored token; perplexity = exp; {results['seconds']} s")
    if args.lora_steps:
        print(f"LoRA loss {results['lora']['mean_first_10']:.3f} -> {results['lora']['mean_last_10']:.3f}")


def lora_rows(model, handle, sink, train, evals, results, args) -> None:
    """Train the LoRA remedy, then add its composed and dial-0 NLL to every row (blocks encoded again)."""
    peft_model, losses = train_lora(model, sink, train, args.lora_steps, args.lora_lr, args.lora_r, args.seed)
    results["lora"] = {"steps": args.lora_steps, "first_loss": losses[0], "last_loss": losses[-1],
                       "mean_first_10": sum(losses[:10]) / len(losses[:10]), "mean_last_10": sum(losses[-10:]) /
                       len(losses[-10:])}
    lora_store = BlockKVStore(handle, max_bytes=4 << 30, sink_token_id=sink)  # the adapter changes every block
    for row, ((task, n), samples) in zip(results["rows"], evals.items()):
        row["composed + LoRA"] = mean([nll_composed(peft_model, lora_store, *s) for s in samples])
        row["LoRA full dial 0"] = mean([nll_full(peft_model, sink, *s, localist_alpha=0.0) for s in samples])
        print(row, flush=True)


if __name__ == "__main__":
    main()
