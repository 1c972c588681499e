"""The performance budget (issue 7): ratios measured side by side in one run, printed as markdown tables.

Sections:

  scaling  hard-mode attention (``segment_attention``, no grad) on q/k/v (1, 8, S, 64) for S = 1k..8k and K = 4..32
           equal blocks, plus unequal layouts (one large block and many small ones) with the same K: time relative
           to causal sdpa next to the predicted cost ratio ``sum_b n_b^2 / S^2`` (causal attention over S keys costs
           ~S^2/2; over blocks ~sum n_b^2/2). A least-squares fit ``t = a * sum n_b^2 + c * S`` over all
           configurations gives R^2: near 1 means time follows the sum of squared block sizes.
  soft     soft mode (alpha = 0.5: the additive bias, ``dense`` backend) vs the model's own sdpa, a small Llama,
           forward and forward+backward, S = 512..2048. Budget: <= 1.5x.
  recruit  share of training time spent in recruitment passes, ``LocalistTrainer`` with ``RecruitmentConfig()``
           defaults (a pass every 1000 steps) and with every=200, a small Llama on the bundled AG News sample.
           Budget: <= 10% at the defaults.
  memory   peak resident memory growth of one hard-mode call at S = 8192 (op: (1, 8, S, 64); model forward and
           forward+backward) next to the size of one S x S float32 score matrix (256 MiB) and of all heads'
           (2 GiB), each in a fresh subprocess (``benchlib.peak_rss_growth``). Budget: far below one S x S matrix.

Usage::

    python benchmarks/bench_budget.py                      # every section (~15 min on 2 cores)
    python benchmarks/bench_budget.py --sections scaling --seqs 1024 2048
    python benchmarks/bench_budget.py --quick              # smoke test, < 2 min
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_localist import LocalistConfig, apply_localist  # noqa: E402
from hf_localist.attention.backends import Layout, clear_plan_cache, segment_attention  # noqa: E402
from hf_localist.blocks.ids import anchor_flags  # noqa: E402


def emit(text: str = "") -> None:
    print(text, flush=True)


def log(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def met(ok: bool) -> str:
    return "met" if ok else "missed"


# ------------------------------------------------------------------------------------------------ scaling
def sizes_layout(sizes: list[int]) -> Layout:
    ids = torch.cat([torch.full((n,), b + 1) for b, n in enumerate(sizes)])[None]
    pos = torch.arange(ids.shape[1])
    return Layout(q_blocks=ids, k_blocks=ids, q_pos=pos, k_pos=pos, k_anchor=anchor_flags(ids),
                  sink=torch.zeros(1, dtype=torch.long), causal=True)


def layouts_for(seq: int, k: int) -> dict[str, list[int]]:
    equal = [seq // k] * k
    equal[-1] += seq - sum(equal)
    big = seq // 2  # one block of half the sequence, the rest split equally among k - 1 blocks
    rest = [(seq - big) // (k - 1)] * (k - 1)
    rest[-1] += seq - big - sum(rest)
    return {"equal": equal, "one half-size": [big] + rest}


def section_scaling(args) -> None:
    seqs = args.seqs or ([1024] if args.quick else [1024, 2048, 4096, 8192])
    ks = args.blocks or ([4, 16] if args.quick else [4, 8, 16, 32])
    emit("### Hard mode scales with the sum of squared block sizes")
    emit()
    emit("`segment_attention` (no grad, layout plan cached as in every layer after the first of a call) on q, k, v "
         "`torch.randn(1, 8, S, 64)`, vs `F.scaled_dot_product_attention(is_causal=True)`. *predicted*: "
         "`sum_b n_b^2 / S^2`, the cost of block-causal attention relative to causal attention; *measured*: localist "
         "time / sdpa time (median of per-round ratios).")
    emit()
    rows, points = [], []
    for seq in seqs:
        g = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(1, 8, seq, 64, generator=g) for _ in range(3))
        cands = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        shapes = {}
        for nb in ks:
            for name, sizes in layouts_for(seq, nb).items():
                lay = sizes_layout(sizes)
                key = f"{name} K={nb}"
                shapes[key] = (nb, name, sizes)
                cands[key] = (lambda lay=lay: segment_attention(q, k, v, None, lay, 0.0, 0.125))
        rounds = args.rounds or (3 if args.quick or seq >= 8192 else 5)
        log(f"scaling seq {seq}: {len(cands)} candidates x {rounds} rounds")
        with torch.no_grad():
            t = benchlib.interleaved(cands, rounds, warmup=1)
        sdpa_ms = t.median_ms("sdpa")
        points.append((float(seq) ** 2 / 2, float(seq), sdpa_ms))
        for key, (nb, name, sizes) in shapes.items():
            sq = sum(n * n for n in sizes)
            points.append((sq / 2, float(seq), t.median_ms(key)))
            rows.append([seq, nb, name, f"{max(sizes)}", sdpa_ms, t.median_ms(key), sq / seq ** 2,
                         1.0 / t.ratio("sdpa", key)])
    emit(benchlib.table(["S", "K", "layout", "largest block", "sdpa ms", "localist ms", "predicted ratio",
                         "measured ratio"], rows))
    emit()
    x = torch.tensor([[p[0], p[1]] for p in points], dtype=torch.float64)
    y = torch.tensor([p[2] for p in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    r2 = 1 - float(((x @ coef - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    emit(f"Fit over all {len(points)} timings (sdpa counted as one block of S): t = {coef[0] * 1e6:.3f} ms per "
         f"10^6 query-key pairs + {coef[1] * 1e3:.3f} ms per 1000 tokens; R^2 = {r2:.3f}.")
    emit()


# ------------------------------------------------------------------------------------------------ soft
def section_soft(args) -> None:
    seqs = args.seqs or ([512] if args.quick else [512, 1024, 2048])
    emit("### Soft mode (alpha = 0.5) vs sdpa, whole model")
    emit()
    emit("Llama hidden 256, 4 layers, 8 heads, head_dim 32, batch 1; `apply_localist(alpha=0.5, "
         "block_assignment='explicit')` with 8 equal blocks (the bias `log(1 - alpha)` on other blocks' keys, "
         "backend `dense` = SDPA with an additive mask) vs the same weights with sdpa. Ratio = localist time / "
         "sdpa time (median of per-round ratios; budget <= 1.5).")
    emit()
    sdpa = benchlib.tiny_llama(256, 4, 8, 32)
    soft = benchlib.tiny_llama(256, 4, 8, 32)
    apply_localist(soft, LocalistConfig(alpha=0.5, block_assignment="explicit"))
    rows = []
    for seq in seqs:
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seq))
        bids = benchlib.equal_blocks(1, seq, 8)
        for grad in (False, True):
            def run(model, kw, grad=grad):
                def call():
                    clear_plan_cache()
                    benchlib.model_step(model, ids, grad, **kw)
                return call
            rounds = args.rounds or (3 if args.quick else 7)
            t = benchlib.interleaved({"sdpa": run(sdpa, {}), "soft": run(soft, {"block_ids": bids})}, rounds)
            ratio = 1.0 / t.ratio("sdpa", "soft")
            lo, hi = t.ratio_iqr("soft", "sdpa")
            rows.append([seq, "fwd+bwd" if grad else "fwd", t.median_ms("sdpa"), t.median_ms("soft"),
                         f"{ratio:.2f} [{lo:.2f}-{hi:.2f}]", met(ratio <= 1.5)])
            log(f"soft seq {seq} grad {grad}: {ratio:.2f}")
    emit(benchlib.table(["S", "pass", "sdpa ms", "soft ms", "ratio", "budget <= 1.5"], rows))
    emit()


# ------------------------------------------------------------------------------------------------ recruit
def _recruit_run(args, every: int, steps: int) -> dict:
    import importlib

    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from hf_localist import RecruitmentConfig
    from hf_localist.demo.run import build_tokenizer, load_articles

    # The module (the package exports the function ``recruit`` under the same name).
    rec = importlib.import_module("hf_localist.recruitment.recruit")
    from hf_localist.trainer import LocalistTrainer

    articles = load_articles("train")
    tok = build_tokenizer([a.text for a in articles])
    tok.pad_token = tok.pad_token or "[PAD]"
    enc = [tok(a.text, truncation=True, max_length=128)["input_ids"] for a in articles]
    train, held = [{"input_ids": e} for e in enc[:900]], [{"input_ids": e} for e in enc[900:]]
    model = benchlib.tiny_llama(128, 2, 4, 32, vocab=len(tok))
    rcfg = RecruitmentConfig() if every == RecruitmentConfig().every else RecruitmentConfig(every=every)
    cfg = LocalistConfig(alpha=1.0, block_assignment="centroid", max_blocks=8, active_blocks=[], first_local_layer=1,
                         recruitment=rcfg)
    apply_localist(model, cfg)
    spent, real = [], rec.run_pass

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t0)

    targs = TrainingArguments(os.path.join(args.tmp, f"recruit_{every}"), max_steps=steps,
                              per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-3,
                              logging_steps=10 ** 6, save_strategy="no", report_to=[], disable_tqdm=True,
                              use_cpu=True, eval_strategy="no", seed=0)
    trainer = LocalistTrainer(model=model, args=targs, train_dataset=train, eval_dataset=held,
                              data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    rec.run_pass = timed
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        rec.run_pass = real
    total = time.perf_counter() - t0
    per_step = (total - sum(spent)) / steps
    return {"every": every, "steps": steps, "passes": len(spent), "total": total, "passes_s": sum(spent),
            "pass_steps": sum(spent) / max(len(spent), 1) / per_step, "share": sum(spent) / total,
            "blocks": len(cfg.active_block_list()),
            "stop": (model.localist_handle.state.recruitment_status or {}).get("stop_reason")}


def section_recruit(args) -> None:
    from hf_localist import RecruitmentConfig

    default = RecruitmentConfig().every
    runs = [(20, 20)] if args.quick else [(default, default), (200, 200)]
    emit("### Recruitment's share of training time")
    emit()
    emit("`LocalistTrainer`, Llama hidden 128, 2 layers, word-level AG News (900 training articles, <= 128 tokens, "
         "batch 8; 160 held-out articles), centroid blocks from none (`max_blocks=8`). Each run trains `every` steps, "
         "so that exactly one pass runs (at its last step): *share* = pass time / total time, the share of every "
         "interval while recruitment is active (it stops after a pass that accepts nothing: later intervals cost "
         f"nothing). The default is `RecruitmentConfig().every = {default}`; 200 is the issue's example setting. "
         "*pass cost in steps*: pass time / mean time of one training step.")
    emit()
    rows = []
    for every, steps in runs:
        r = _recruit_run(args, every, steps)
        rows.append([("default " if every == default else "") + str(every), r["passes"], r["blocks"], r["total"],
                     r["passes_s"], f"{r['pass_steps']:.0f}", f"{100 * r['share']:.1f}%",
                     met(r["share"] <= 0.10) if every == default else "-"])
        log(f"recruit every {every}: share {r['share']:.3f}, pass = {r['pass_steps']:.0f} steps")
    emit(benchlib.table(["every", "passes", "blocks", "total s", "in passes s", "pass cost in steps", "share",
                         "budget <= 10% (default)"], rows))
    emit()


# ------------------------------------------------------------------------------------------------ memory
def probe(spec: dict) -> dict:
    seq, kind, what = spec["seq"], spec["kind"], spec["what"]
    if what == "op":
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, seq, 64, generator=g) for _ in range(3))
        lay = sizes_layout(layouts_for(seq, 8)["equal"])

        def call():
            clear_plan_cache()
            with torch.no_grad():
                if kind == "sdpa":
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return segment_attention(q, k, v, None, lay, 0.0, 0.125)[0]
    else:
        model = benchlib.tiny_llama(256, 4, 8, 32)
        if kind == "segment":
            apply_localist(model, LocalistConfig(alpha=1.0, backend="segment", block_assignment="explicit"))
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seq))
        kw = {"block_ids": benchlib.equal_blocks(1, seq, 8)} if kind == "segment" else {}

        def call():
            clear_plan_cache()
            return benchlib.model_step(model, ids, what != "fwd", **kw)
    call()
    mib, method = benchlib.peak_rss_growth(call)
    return {"mib": mib, "method": method}


def run_probe(spec: dict, threads: int) -> dict:
    return benchlib.run_probe(__file__, spec, threads)


def section_memory(args) -> None:
    seq = 1024 if args.quick else 8192
    nn_mib = seq * seq * 4 / 2 ** 20
    emit(f"### Peak memory of hard mode at S = {seq}")
    emit()
    emit(f"Peak growth of resident memory during one call (fresh subprocess per cell, as in `bench_attention.py` "
         f"section c). One S x S float32 matrix is {nn_mib:.0f} MiB; all 8 heads' scores, {8 * nn_mib:.0f} MiB. "
         "*op*: (1, 8, S, 64), 8 equal blocks, no grad; *fwd* / *fwd+bwd*: Llama hidden 256, 4 layers, 8 heads. "
         "*extra*: localist minus sdpa, the memory the block-sparse attention adds (gathered copies of q/k/v, the "
         "layout plan); the budget is that it stays far below one S x S matrix (a dense mask or score matrix).")
    emit()
    rows = []
    for what in (["op"] if args.quick else ["op", "fwd", "fwd+bwd"]):
        base = run_probe({"what": what, "seq": seq, "kind": "sdpa"}, args.threads)["mib"]
        seg = run_probe({"what": what, "seq": seq, "kind": "segment"}, args.threads)["mib"]
        rows.append([what, base, seg, seg - base, (seg - base) / nn_mib, met(seg - base < nn_mib)])
        log(f"memory {what}: sdpa {base:.0f} MiB, segment {seg:.0f} MiB")
    emit(benchlib.table(["call", "sdpa MiB", "localist hard MiB", "extra MiB", "extra / one S x S matrix",
                         "extra below one S x S matrix"], rows))
    emit()


SECTIONS = {"scaling": section_scaling, "soft": section_soft, "recruit": section_recruit, "memory": section_memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test sizes")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--seqs", type=int, nargs="*")
    parser.add_argument("--blocks", type=int, nargs="*")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--tmp", default="/tmp/hf_localist_budget", help="scratch directory (Trainer output)")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    emit(benchlib.environment())
    emit()
    start = time.perf_counter()
    for name in args.sections.split(","):
        if name not in SECTIONS:
            parser.error(f"unknown section {name!r}; choose from {list(SECTIONS)}")
        benchlib.settle_allocator()
        SECTIONS[name](args)
    emit(f"Total time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
