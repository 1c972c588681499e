"""Real-checkpoint benchmark: conversion time, and SmolLM2 forward at 2k tokens, dial 1 "restart" vs sdpa.

    python benchmarks/bench_real.py [--tokens 2048] [--blocks 8] [--rounds 3] [--workdir DIR]

Speed is a ratio measured in one run (rounds interleaved, median of per-round ratios): the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from hf_localist import LocalistConfig, apply_localist, fetch_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where the checkpoint is converted (default: a temporary dir)")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench_real_")
    t0 = time.perf_counter()
    path = fetch_checkpoint("smollm2-135m", f"{work}/smollm2")
    print(f"smollm2-135m fetch: {time.perf_counter() - t0:.1f} s (0 if it was already converted in --workdir)")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    apply_localist(local, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, plain.config.vocab_size, (1, args.tokens), generator=g)
    ids[0, 0] = 0  # the sink
    per = (args.tokens - 1) // args.blocks
    blocks = torch.zeros_like(ids)
    for b in range(args.blocks):
        blocks[0, 1 + b * per: 1 + (b + 1) * per] = b + 1  # the remainder, if any, is general
    ratios, times = [], []
    with torch.no_grad():
        local(input_ids=ids[:, :64], block_ids=blocks[:, :64])  # warm-up
        for _ in range(args.rounds):
            t = time.perf_counter()
            plain(input_ids=ids)
            dense = time.perf_counter() - t
            t = time.perf_counter()
            local(input_ids=ids, block_ids=blocks)
            sparse = time.perf_counter() - t
            ratios.append(dense / sparse)
            times.append((dense, sparse))
    print(f"forward {args.tokens} tokens, {args.blocks} blocks: sdpa {statistics.median(t[0] for t in times):.2f} s, "
          f"localist dial 1 restart {statistics.median(t[1] for t in times):.2f} s, speedup (sdpa / localist) "
          f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] over {args.rounds} rounds")


if __name__ == "__main__":
    main()
