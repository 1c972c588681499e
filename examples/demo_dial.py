"""The localist dial on bundled AG News, step by step with the public API (about a minute on 2 CPU cores).

    python examples/demo_dial.py

1. tokenizer + tiny Llama from scratch; the 4 news topics become 4 blocks (anchor tokens <blk_world>, ...);
2. ``apply_localist``: the model now reads its block layout from the anchor tokens in ``input_ids``;
3. a short training run with the dial at 1 (hard block mask, ``segment`` backend);
4. turn the dial at inference time and look at perplexity and attention diagnostics (``handle.record()``);
5. save, reload with ``AutoLocalistModel``, and ``revert`` to the plain model.

The full experiment (two models, the whole sweep, a report) is ``hf-localist demo``.
"""

import math
import tempfile

import torch

from hf_localist import AutoLocalistModel, LocalistConfig, add_block_tokens, apply_localist
from hf_localist.demo.run import (
    TOPICS,
    DemoSettings,
    TrainingSampler,
    build_model,
    build_tokenizer,
    encode_articles,
    held_out_sequences,
    load_articles,
    pad_batch,
    scored_targets,
    train,
)

torch.manual_seed(0)

# 1. Data, tokenizer, model. ------------------------------------------------------------------------------
train_articles, test_articles = load_articles("train"), load_articles("test")
tokenizer = build_tokenizer([a.text for a in train_articles])  # word level, lower-cased, [UNK] [PAD] [BOS]
settings = DemoSettings(steps=60)  # a shorter budget than `hf-localist demo`
model = build_model(len(tokenizer), settings, tokenizer.bos_token_id, tokenizer.pad_token_id, seed=0)

# Each topic becomes a block: <blk_world> opens block 1, <blk_sports> block 2, ... (embeddings are resized).
config = add_block_tokens(tokenizer, model, list(TOPICS), LocalistConfig(backend="segment"))
print("anchor tokens:", dict(zip(tokenizer.convert_ids_to_tokens(config.anchor_token_ids), config.anchor_token_ids)))

# 2. Make the model localist. -----------------------------------------------------------------------------
handle = apply_localist(model, config)  # also reachable as model.localist_handle

# A sequence is [BOS] <blk_sports> article <blk_business> article ...: block ids come from the anchors.
anchors = config.anchor_token_ids
train_enc = encode_articles(tokenizer, train_articles, settings.max_article_tokens)
test_seqs = held_out_sequences(encode_articles(tokenizer, test_articles, settings.max_article_tokens),
                               tokenizer.bos_token_id, anchors, seed=0)
print("held-out sequence:", tokenizer.decode(test_seqs[0][:12]), "...")

# 3. Train with the dial at 1: every article attends only to itself (and [BOS]). ------------------------------
sampler = TrainingSampler(train_enc, tokenizer.bos_token_id, anchors, seed=1)
train(model, handle, sampler, settings, alpha=1.0, pad_id=tokenizer.pad_token_id, desc="train at dial 1")

# 4. Turn the dial at inference time: no retraining. ----------------------------------------------------------
ids, mask = pad_batch(test_seqs, tokenizer.pad_token_id)
keep = scored_targets(ids, mask, anchors)[:, 1:]


@torch.no_grad()
def perplexity() -> float:
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return math.exp(float(nll[keep].mean()))


print(f"\n{'dial':>5} {'perplexity':>11} {'H_t':>7} {'PF_t':>6} {'BM_t':>6}")
for alpha in (0.0, 0.5, 0.9, 1.0):
    with handle.dial(alpha), handle.record() as recorder:  # dial() restores the previous value on exit
        ppl = perplexity()
    mean = recorder.summary()["mean"]  # also per layer: recorder.summary()["layers"]
    print(f"{alpha:5.2f} {ppl:11.1f} {mean['entropy']:7.3f} {mean['pointer_fidelity']:6.3f} {mean['block_mass']:6.3f}")

handle.set_dial(0.9)  # a lasting setting (validated: 1.5 would raise LocalistConfigError)

# 5. Save and reload with the localist settings; revert to the plain model. -----------------------------------
with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)  # weights (safetensors) + config.json with a "localist" entry + localist_config.json
    tokenizer.save_pretrained(path)
    reloaded = AutoLocalistModel.from_pretrained(path)
    print("\nreloaded dial:", reloaded.localist_handle.config.alpha)
    with torch.no_grad():
        same = torch.allclose(reloaded(input_ids=ids, attention_mask=mask).logits,
                              model(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    print("reloaded model gives the same logits:", same)

plain = handle.revert()  # the exact original model: attention implementation, forward, config
print("after revert:", plain.config._attn_implementation)
