"""Training-step overhead of the group-lasso penalty (loss term and proximal step) vs no penalty.

Variants: ``none``; ``loss`` (the penalty's gradient through ``outputs.loss``); ``prox`` (the proximal step
preconditioned by AdamW's own step, ``prox_step(handle, lr, optimizer=opt)``: what ``LocalistCallback`` runs);
``prox-plain`` (the plain ``lr * lambda`` shrink, ``prox_preconditioner='none'``).

One model, one batch, one optimizer; the three variants run interleaved, repetition by repetition, so that the
machine's noise hits them alike; the table reports the median step time of each as a ratio to no penalty.

    python benchmarks/bench_penalty.py            # 4 layers, hidden 256, seq 512 (the issue's setting)
    python benchmarks/bench_penalty.py --quick    # smaller, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_localist import LocalistConfig, apply_localist
from hf_localist.training.penalty import prox_step


def build(args, penalty: str, preconditioner: str = "auto"):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq, 128))
    model = LlamaForCausalLM(cfg).train()
    handle = apply_localist(model, LocalistConfig(alpha=1.0, backend="segment", block_assignment="explicit",
                                                  active_blocks=list(range(1, args.blocks + 1)), penalty=penalty,
                                                  penalty_lambda=1e-3,
                                                  prox_preconditioner=preconditioner))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, handle, opt


def step(model, handle, opt, batch, prox: bool) -> float:
    """One training step; returns the seconds spent in the proximal step alone (0 without it)."""
    out = model(**batch)
    out.loss.backward()
    opt.step()
    spent = 0.0
    if prox:
        t0 = time.perf_counter()
        prox_step(handle, opt.param_groups[0]["lr"], optimizer=opt)
        spent = time.perf_counter() - t0
    opt.zero_grad(set_to_none=True)
    return spent


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="hidden 64, seq 128, 5 repetitions")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.seq, args.reps, args.vocab = 64, 128, 5, 200
    torch.set_num_threads(torch.get_num_threads())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    blocks = (torch.arange(args.seq) * args.blocks // args.seq + 1).expand(args.batch, args.seq).contiguous()
    batch = {"input_ids": ids, "labels": ids, "block_ids": blocks}
    variants = {name: build(args, pen, pre) for name, pen, pre in (("none", "none", "auto"), ("loss", "loss", "auto"),
                                                                     ("prox", "prox", "auto"),
                                                                     ("prox-plain", "prox", "none"))}
    times: dict[str, list[float]] = {name: [] for name in variants}
    prox_times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (model, handle, opt) in variants.items():  # warm-up
        step(model, handle, opt, batch, prox=name.startswith("prox"))
    for _ in range(args.reps):
        for name, (model, handle, opt) in variants.items():
            t0 = time.perf_counter()
            prox_times[name].append(step(model, handle, opt, batch, prox=name.startswith("prox")))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"\nTraining step, Llama {args.layers} layers x {args.hidden} wide, {args.heads} heads, batch {args.batch}, "
          f"seq {args.seq}, {args.blocks} blocks, hard mode (segment); median of {args.reps} interleaved steps, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    # The proximal step alone, timed inside each step: a steadier figure than the difference of two noisy medians.
    # Its share = median over steps of (prox time / that step's time).
    share = {name: statistics.median(p / t for p, t in zip(prox_times[name], times[name])) for name in variants}
    print("| penalty | median step (ms) | ratio vs none | proximal step alone (ms) | share of its step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in variants:
        alone = statistics.median(prox_times[name]) * 1e3
        print(f"| {name} | {med[name] * 1e3:.1f} | {med[name] / med['none']:.3f} | {alone:.1f} | {share[name]:.2%} |")
    return {"median_s": med, "prox_share": share}


if __name__ == "__main__":
    main()
