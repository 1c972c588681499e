"""The dial on a real pretrained checkpoint, on multi-document text: both position policies, both schedules.

Sources (the shared data, see docs/real-models.md): AG News test articles of the 4 topics (World, Sports, Business,
Sci/Tech), Tiny Shakespeare (consecutive lines) and SST-2 movie-review sentences (consecutive dev sentences), each cut
into passages of ``--passage_tokens`` tokens. A sequence is the sink and ``--passages`` passages of distinct sources,
one block each (``block_assignment='explicit'``). For every (schedule, position policy, dial) the perplexity of each
source's passages (every token but a passage's first, see :mod:`hf_localist.demo.passages`) is measured, with each
passage read alone after the sink by the unmodified model as the reference. No training: what the dial does to a
model as it is.

Run: ``python experiments/real_dial.py --model DIR [--model DIR2] --data_dir DATA [--quick]``; the checkpoints come
from ``hf-localist fetch smollm2-135m --output_dir DIR`` / ``gemma3-270m``. Prints a markdown table per model and
writes ``results.json`` to ``--out_dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_localist import LocalistConfig, apply_localist
from hf_localist.demo.passages import (
    alone_nll,
    block_nll,
    encode_passages,
    passage_sequences,
    perplexities,
    sink_token_id,
)

TOPICS = ("world", "sports", "business", "scitech")


def load_sources(data_dir: Path, per_source: int) -> dict[str, list[str]]:
    """Texts per source (long enough to fill a passage)."""
    out: dict[str, list[str]] = {t: [] for t in TOPICS}
    with open(data_dir / "ag_news" / "test.csv", newline="", encoding="utf-8") as fh:
        for label, title, desc in csv.reader(fh):
            pool = out[TOPICS[int(label) - 1]]
            if len(pool) < per_source:
                pool.append(" ".join(f"{title}. {desc}".replace("\\", " ").replace(" #39;", "'").split()))
    lines = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").split("\n")
    out["shakespeare"] = ["\n".join(lines[i: i + 12]) for i in range(0, 12 * per_source, 12)]
    with open(data_dir / "sst2" / "dev.tsv", encoding="utf-8") as fh:
        sentences = [row.split("\t")[0] for row in fh.read().split("\n")[1:] if row.strip()]
    out["reviews"] = [" ".join(sentences[i: i + 5]) for i in range(0, 5 * per_source, 5)]
    return out


def measure(model_dir: str, sources: dict[str, list[str]], args) -> dict:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    labels = list(sources)
    sink = sink_token_id(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else sink
    enc = encode_passages(tok, sources, labels, args.passage_tokens)
    seqs = passage_sequences(enc, labels, sink, args.sequences, args.passages, args.seed)
    t0 = time.perf_counter()
    alone = perplexities(alone_nll(model, seqs, sink, pad, args.batch_size), labels)
    handle = apply_localist(model, LocalistConfig(alpha=0.0, block_assignment="explicit"))
    rows = []
    for schedule in ("uniform", "progressive"):
        for policy in ("continuous", "restart"):
            for alpha in args.dials:
                handle.update(schedule=schedule, block_positions=policy)
                ppl = perplexities(block_nll(model, seqs, pad, args.batch_size, localist_alpha=alpha), labels)
                rows.append({"schedule": schedule, "policy": policy, "alpha": alpha, "perplexity": ppl})
                print(f"  {schedule:11s} {policy:10s} α={alpha:<4g} all {ppl['all']:.2f}", flush=True)
    return {"model": model_dir, "model_type": model.config.model_type, "sink_token_id": sink, "labels": labels,
            "sequences": len(seqs), "tokens": sum(len(s.input_ids) for s in seqs), "alone": alone, "rows": rows,
            "time_s": time.perf_counter() - t0}


def table(res: dict) -> str:
    labels = res["labels"]
    lines = ["| schedule | positions | dial | " + " | ".join(labels) + " | all |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in labels) + " | ---: |"]
    for r in res["rows"]:
        p = r["perplexity"]
        lines.append(f"| {r['schedule']} | {r['policy']} | {r['alpha']:g} | "
                     + " | ".join(f"{p[k]:.1f}" for k in labels) + f" | **{p['all']:.2f}** |")
    a = res["alone"]
    lines.append("| each passage alone | | | " + " | ".join(f"{a[k]:.1f}" for k in labels) + f" | **{a['all']:.2f}** |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True, help="a model directory (repeatable)")
    p.add_argument("--data_dir", required=True, help="the shared data folder (ag_news/, tinyshakespeare/, sst2/)")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--passages", type=int, default=4)
    p.add_argument("--passage_tokens", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--dials", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.9, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="2 sequences, 2 dial values (smoke test)")
    p.add_argument("--out_dir", default="experiments/results/real_dial")
    args = p.parse_args()
    if args.quick:
        args.sequences, args.dials, args.passage_tokens = 2, [0.0, 1.0], 32
    if args.threads:
        torch.set_num_threads(args.threads)
    sources = load_sources(Path(args.data_dir), per_source=4 * args.sequences)
    results = []
    for model_dir in args.model:
        print(f"{model_dir}:", flush=True)
        res = measure(model_dir, sources, args)
        results.append(res)
        print(f"\n{res['model_type']} ({res['sequences']} sequences, {res['tokens']} tokens, "
              f"{res['time_s']:.0f} s)\n\n{table(res)}\n", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump({"args": vars(args), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
