"""Recruitment on real text: AG News articles without anchors, normal models, what the passes propose and accept.

    python experiments/recruitment_real_text.py --data_dir DATA --write_docs              # tiny models, ~20 min
    python experiments/recruitment_real_text.py --data_dir DATA --arms smollm2_lora_context --model SMOLLM2_DIR
    python experiments/recruitment_real_text.py --quick                                    # smoke test (bundled data)

Each *arm* runs the pipeline of ``hf-localist recruit`` (``hf_localist.cli.recruit.recruit_csv``): rows of AG News
are joined 2-4 at a time without any marker (``concat``: one after the other; ``ticker``: cut into runs of 8 words
and interleaved), a model trains on them in centroid mode with no block, and a recruitment pass (Algorithm 1) runs
every ``every`` steps. Recorded per arm: every proposal of every pass with its held-out topic purity (the share of
the held-out tokens it would take that come from its majority topic; chance about 0.25-0.4), its ``dL_data``,
``dL_model`` and decision; the accepted blocks and their purity; held-out NLL with the blocks and with the same
weights and the blocks disabled.

Arms (``--arms``, default every tiny-model arm):

* ``blind_token``: the old demo model: a tiny Llama whose Q/K are zero and frozen (content-blind attention),
  assignment by each token's own state (``assign_horizon=1``);
* ``normal_token``: the same Llama with learnable Q/K (a normal model), assignment per token;
* ``normal_context``: normal, assignment from context (``assign_horizon=8``, ``assign_min_run=4``) and recruited
  blocks that do not see unassigned tokens (``unassigned_visible=False``);
* ``normal_context_soft``: as ``normal_context`` with the dial at 0.5 while training and recruiting (other blocks'
  keys get a ``log(1 - 0.5)`` bias instead of being masked);
* ``normal_context_ticker``: as ``normal_context`` on the news-ticker layout, with ``assign_horizon=4``,
  ``assign_min_run=2`` (runs of 8 words);
* ``smollm2_lora_context`` (needs ``--model``): SmolLM2-135M with peft LoRA adapters, assigning and localising from
  layer 25 (of 30; among the last layers, whose running-mean states cluster best by topic), ``assign_horizon=8``,
  ``assign_min_run=4``, ``unassigned_visible=False``;
* ``smollm2_lora_topics`` (needs ``--model``): as ``smollm2_lora_context`` from layer 26 (the best layer of
  ``experiments/topic_features.py``) with k-means always splitting (``min_silhouette=0``, k <= 4), so that
  topic-like clusters are proposed and scored even when their silhouette is low;
* ``smollm2_lora_topics_soft``: as ``smollm2_lora_topics`` with the dial at 0.5 (a block is a ``log(1 - 0.5)`` bias
  on the other blocks' keys, not a mask);
* ``smollm2_lora_ticker``: as ``smollm2_lora_topics`` on the news-ticker layout (runs of 8 words), with
  ``assign_horizon=4``, ``assign_min_run=2``.

Data: ``--data_dir`` is the shared data folder (``ag_news/train_sample_5k.csv``: ``text,label`` without header,
labels 0-3 = World, Sports, Business, Sci/Tech); ``--rows`` of it are used. Without ``--data_dir`` the bundled
sample (``src/hf_localist/data/ag_news_sample.csv``) is used.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "recruitment_real_text"
TOPICS = ("World", "Sports", "Business", "Sci/Tech")
BUNDLED = _common.REPO / "src" / "hf_localist" / "data" / "ag_news_sample.csv"

TINY = dict(steps=600, every=200, freeze_qk=False, chunk_tokens=0, max_blocks=6, max_clusters=4, assign_horizon=1.0,
            assign_min_run=1, unassigned_visible=True)
ARMS = {
    "blind_token": dict(TINY, freeze_qk=True),
    "normal_token": dict(TINY),
    "normal_context": dict(TINY, assign_horizon=8.0, assign_min_run=4, unassigned_visible=False),
    "normal_context_soft": dict(TINY, assign_horizon=8.0, assign_min_run=4, unassigned_visible=False, alpha=0.5),
    "normal_context_ticker": dict(TINY, chunk_tokens=8, assign_horizon=4.0, assign_min_run=2,
                                  unassigned_visible=False),
    "smollm2_lora_context": dict(steps=40, every=20, batch_size=8, lr=1e-3, budget_lr=1e-3, budget_steps=15,
                                 freeze_qk=False, chunk_tokens=0, max_blocks=4, max_clusters=4,
                                 first_local_layer=25, assign_horizon=8.0, assign_min_run=4,
                                 unassigned_visible=False, source_batches=16, heldout_train_fraction=0.1),
    "smollm2_lora_topics": dict(steps=40, every=20, batch_size=8, lr=1e-3, budget_lr=1e-3, budget_steps=15,
                                freeze_qk=False, chunk_tokens=0, max_blocks=4, max_clusters=4, min_silhouette=0.0,
                                first_local_layer=26, assign_horizon=8.0, assign_min_run=4,
                                unassigned_visible=False, source_batches=16, heldout_train_fraction=0.1),
}
ARMS["smollm2_lora_topics_soft"] = dict(ARMS["smollm2_lora_topics"], alpha=0.5)
ARMS["smollm2_lora_ticker"] = dict(ARMS["smollm2_lora_topics"], chunk_tokens=8, assign_horizon=4.0, assign_min_run=2)
TINY_ARMS = [a for a in ARMS if not a.startswith("smollm2")]
QUICK = dict(steps=40, every=20, budget_steps=4, diagnostic_batches=2, source_batches=6, min_cluster_tokens=16)


def write_csv(args, directory: Path) -> Path:
    """A ``text,label`` CSV with a header (what ``recruit_csv`` reads) of ``--rows`` rows."""
    rows: list[tuple[str, str]] = []
    if args.data_dir:
        src = Path(args.data_dir) / "ag_news" / "train_sample_5k.csv"
        if not src.is_file():
            from hf_localist.errors import LocalistLoadError

            raise LocalistLoadError(f"--data_dir {args.data_dir}: no ag_news/train_sample_5k.csv in it; pass the "
                                    "shared data folder, or leave --data_dir out to use the bundled sample")
        with open(src, newline="", encoding="utf-8") as fh:
            rows = [(text, TOPICS[int(label)]) for text, label in csv.reader(fh)]
    else:
        with open(BUNDLED, newline="", encoding="utf-8") as fh:
            rows = [(r["text"], r["topic"]) for r in csv.DictReader(fh)]
    rows = rows[: args.rows]
    path = directory / "data.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def run_arm(name: str, data: Path, args) -> dict:
    from hf_localist.cli.recruit import recruit_csv
    from hf_localist.demo.recruit import RecruitSettings

    kw = dict(ARMS[name])
    if args.quick:
        kw.update(QUICK)
    settings = replace(RecruitSettings(), **kw)
    model = args.model if name.startswith("smollm2") else None
    t0 = time.perf_counter()
    res = recruit_csv(str(data), "text", "label", settings, seed=args.seed, progress=False, model_dir=model)
    proposals = [{"step": p.get("step"), "cluster_size": p.get("cluster_size"), "heldout_tokens": p["tokens"],
                  "purity": p["purity"], "majority": p.get("majority_topic"), "accepted": p.get("accepted"),
                  "reason": p.get("reason"), "dL_total": p.get("dL_total"), "top_tokens": p["top_tokens"][:6]}
                 for passes in res["proposals"] for p in passes]
    decisions = [d for d in res["decisions"] if d.get("slot") is not None]
    return {"arm": name, "settings": kw, "model": res["model"], "seconds": time.perf_counter() - t0,
            "blocks": [{k: b.get(k) for k in ("slot", "heldout_tokens", "purity", "majority_label", "top_tokens")}
                       for b in res["blocks"]],
            "mean_purity": res["mean_purity"], "nll_with": res["heldout_nll_with_blocks"],
            "nll_without": res["heldout_nll_without_blocks"], "heldout_tokens": res["heldout_tokens"],
            "stop_reason": res["stop_reason"], "passes": res["passes"], "proposals": proposals,
            "decisions": [{k: d.get(k) for k in ("step", "slot", "cluster_size", "dL_data", "dL_model", "dL_total",
                                                 "accepted", "reason")} for d in decisions],
            "timeline": res["timeline"], "trainable_parameters": res["trainable_parameters"]}


def _f(x, fmt=".3f"):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(results: dict) -> str:
    env = results["environment"]
    data = f"`--data_dir DATA`, {results['rows']} rows" if results["data_dir"] else "the bundled sample"
    lines = [
        "## Recruitment on real text (AG News, no anchors)",
        "",
        f"Command: `python experiments/{NAME}.py --data_dir DATA --write_docs` ({data}; seed {results['seed']}; "
        f"{results['wall_time_s']:.0f} s wall on {env['torch_threads']} torch thread(s) of a shared "
        f"{env['cpu_count']}-core CPU machine). The SmolLM2 rows: `--arms smollm2_lora_context --model SMOLLM2_DIR` "
        "and `--rows 1200 --arms smollm2_lora_topics smollm2_lora_topics_soft smollm2_lora_ticker --model "
        "SMOLLM2_DIR` (the last two side by side on the 2 cores; `hf_localist.fetch_checkpoint('smollm2-135m', "
        "SMOLLM2_DIR)`).",
        "",
        "Each arm is the `hf-localist recruit` pipeline (module docstring of the script: arms, layouts, settings). "
        "*Proposal purity* is the topic purity of the held-out tokens a proposed block would take (chance: the "
        "share of the majority topic, about 0.25-0.4); `dL_data` < 0 means the block lowered the held-out NLL of its "
        "tokens against the arm trained without it on the same batches.",
        "",
        "| arm | passes | proposals (purity, dL_data → decision) | blocks accepted | mean purity | "
        "held-out NLL with blocks / same weights without | time |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for r in results["runs"]:
        props = "; ".join(
            f"s{p['step']}: {_f(p['purity'], '.2f')} → {p['reason'] or '–'}" for p in r["proposals"]) or "none"
        dls = ", ".join(f"{d['dL_data']:+.0f}" for d in r["decisions"] if d.get("dL_data") is not None)
        rows = f" ({r['rows']} rows)" if r.get("rows") not in (None, results["rows"]) else ""
        lines.append(
            f"| {r['arm']}{rows} | {r['passes']} | {props} (dL_data: {dls or '–'}) | {len(r['blocks'])} | "
            f"{_f(r['mean_purity'], '.2f')} | {_f(r['nll_with'], '.4f')} / {_f(r['nll_without'], '.4f')} | "
            f"{r['seconds']:.0f} s |")
    lines += ["", results["reading"]]
    return "\n".join(lines)


def reading(runs: list[dict]) -> str:
    accepted = [r for r in runs if r["blocks"]]
    best = max((p["purity"] for r in runs for p in r["proposals"] if p["purity"] is not None), default=None)
    text = (f"**Reading.** {len(accepted)} of {len(runs)} arm(s) accepted a block. The purest proposal of any arm "
            f"had purity {_f(best, '.2f')}. ")
    hurt = [d["dL_data"] for r in runs for d in r["decisions"] if d.get("dL_data") is not None]
    if hurt:
        text += (f"Of {len(hurt)} scored proposals, {sum(x > 0 for x in hurt)} raised the held-out NLL of the tokens "
                 "they take (dL_data > 0) against the arm trained without them.")
    return text


def main(argv=None) -> dict:
    parser = _common.make_parser(NAME, __doc__.split("\n\n")[0], render=True)
    parser.add_argument("--data_dir", default=None, help="the shared data folder (ag_news/train_sample_5k.csv); "
                        "default: the bundled sample")
    parser.add_argument("--rows", type=int, default=2000, help="AG News rows to use (default 2000)")
    parser.add_argument("--arms", nargs="+", default=None, choices=sorted(ARMS), help="arms to run (default: every "
                        "tiny-model arm)")
    parser.add_argument("--model", default=None, help="SmolLM2-135M directory for the smollm2 arm")
    args = parser.parse_args(argv)
    if args.render:  # the docs section from the results.json in --out_dir (e.g. runs of several commands merged)
        import json

        results = json.loads((_common.out_dir(args, NAME) / "results.json").read_text())
        _common.publish(NAME, markdown(results), [])
        return results
    arms = args.arms or TINY_ARMS
    if any(a.startswith("smollm2") for a in arms) and not args.model:
        from hf_localist.errors import LocalistConfigError

        raise LocalistConfigError("the smollm2 arms need --model SMOLLM2_DIR (a directory written by "
                                  "hf_localist.fetch_checkpoint('smollm2-135m', DIR))")
    _common.setup(args)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    directory = _common.out_dir(args, NAME)
    data = write_csv(args, directory)
    wall = time.perf_counter()
    runs = []
    for name in arms:
        r = run_arm(name, data, args)
        runs.append(r)
        print(f"{name}: {len(r['blocks'])} block(s), mean purity {_f(r['mean_purity'], '.3f')}, proposals "
              f"{[(p['step'], _f(p['purity'], '.2f'), p['reason']) for p in r['proposals']]}, dL_data "
              f"{[round(d['dL_data'], 1) for d in r['decisions'] if d.get('dL_data') is not None]}, NLL "
              f"{_f(r['nll_with'], '.4f')} / {_f(r['nll_without'], '.4f')} ({r['seconds']:.0f} s)", flush=True)
    results = {"name": NAME, "quick": args.quick, "seed": args.seed, "rows": args.rows,
               "data_dir": bool(args.data_dir), "runs": runs, "environment": _common.environment(),
               "reading": reading(runs), "wall_time_s": time.perf_counter() - wall}
    _common.write_json(directory / "results.json", results)
    print(f"{results['wall_time_s']:.0f} s; results in {directory}")
    if args.write_docs:
        _common.publish(NAME, markdown(results), [])
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
