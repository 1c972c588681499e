"""Speed and memory of hf_localist's attention (docs/design.md section 9), as ratios measured side by side in one run.

Sections (markdown tables on stdout; ``--out FILE`` writes them to a file too):

  a   localist at alpha = 0 vs the model's own ``sdpa``: forward of a tiny Llama (hidden 256, 4 layers, 4 heads),
      batch 1, no grad. Target: time ratio <= 1.03.
  b1  hard mode (alpha = 1), the attention op alone: ``segment_attention`` and ``flex_attention_hard`` (compiled,
      no grad) on random q/k/v of shape (1, 8, S, 64) with K equal contiguous blocks, vs
      ``F.scaled_dot_product_attention(is_causal=True)``. Target at S = 4096: speedup >= K / 2.
  b2  hard mode, a whole small model (Llama hidden 256, 4 layers, 8 heads, head_dim 32; ``apply_localist`` with
      backend 'segment' or 'flex', block_assignment 'explicit', K equal contiguous blocks) vs the same model with
      ``sdpa``: forward (no grad) and forward+backward. Target: forward+backward at S = 4096, K = 8: >= 2x.
  c   peak memory of the b1/b2 configurations: growth of resident memory during one call, in a fresh subprocess
      per configuration (see benchlib.peak_rss_growth).
  ref (not in the default set) the current segment backend vs the one at git commit --ref (default eb5d304, the
      first implementation), op and model forward+backward, interleaved in one process.

Usage::

    python benchmarks/bench_attention.py --quick            # CI smoke, < 60 s
    python benchmarks/bench_attention.py                    # full grid, ~15 min on 2 cores
    python benchmarks/bench_attention.py --sections b1 --seqs 4096 --blocks 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_localist import LocalistConfig, apply_localist  # noqa: E402
from hf_localist.attention.backends import Layout, repeat_kv, segment_attention  # noqa: E402
from hf_localist.attention.flex import flex_attention_hard  # noqa: E402

try:  # absent before the plan cache existed: the script then also measures the original backends (git history)
    from hf_localist.attention.backends import _segment_plan, clear_plan_cache
except ImportError:  # pragma: no cover - only with an old hf_localist on PYTHONPATH
    _segment_plan = None

    def clear_plan_cache() -> None:
        pass
from hf_localist.blocks.ids import anchor_flags  # noqa: E402

OUT: list[str] = []


def emit(text: str = "") -> None:
    print(text, flush=True)
    OUT.append(text)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _iqr(t: benchlib.Timings, num: str, den: str) -> str:
    lo, hi = t.ratio_iqr(num, den)
    return f"{t.ratio(num, den):.2f} [{lo:.2f}-{hi:.2f}]"


# ------------------------------------------------------------------------------------------------ (a) alpha = 0
def section_a(args) -> None:
    seqs = [512] if args.quick else [512, 2048]
    emit("### (a) localist at alpha = 0 vs the model's own sdpa (forward, no grad)")
    emit()
    emit("Tiny Llama: hidden 256, 4 layers, 4 heads (head_dim 64), vocab 1000, batch 1. The localist copy has the same "
         "weights, `apply_localist(alpha=0, block_assignment='explicit')` and gets `block_ids` (4 equal blocks) in "
         "every call. Ratio = localist time / sdpa time (median of per-round ratios, [25th-75th percentile]).")
    emit()
    rows = []
    base = benchlib.tiny_llama(256, 4, 4, 64)
    loc = benchlib.tiny_llama(256, 4, 4, 64)
    apply_localist(loc, LocalistConfig(alpha=0.0, block_assignment="explicit"))
    for seq in seqs:
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seq))
        blocks = benchlib.equal_blocks(1, seq, 4)
        with torch.no_grad():
            same = torch.equal(base(input_ids=ids).logits, loc(input_ids=ids, block_ids=blocks).logits)
            rounds = args.rounds or (10 if args.quick else (40 if seq <= 512 else 15))
            t = benchlib.interleaved({"sdpa": lambda: base(input_ids=ids),
                                      "localist": lambda: loc(input_ids=ids, block_ids=blocks)}, rounds, warmup=2)
        r = t.ratio("localist", "sdpa")
        rows.append([seq, t.median_ms("sdpa"), t.median_ms("localist"), _iqr(t, "localist", "sdpa"),
                     "yes" if same else "NO", met(r <= 1.03)])
        log(f"(a) seq {seq}: ratio {r:.3f}")
    emit(benchlib.table(["seq", "sdpa ms", "localist a=0 ms", "ratio (target <= 1.03)", "logits bit-identical",
                         "target"], rows))
    emit()


# ------------------------------------------------------------------------------------------------ (b1) the op
def op_layout(seq: int, blocks: int) -> Layout:
    ids = benchlib.equal_blocks(1, seq, blocks)
    pos = torch.arange(seq)
    return Layout(q_blocks=ids, k_blocks=ids, q_pos=pos, k_pos=pos, k_anchor=anchor_flags(ids),
                  sink=torch.zeros(1, dtype=torch.long), causal=True)


def op_candidates(seq: int, blocks_list: list[int], flex: bool, heads: int = 8, dim: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq, dim, generator=g) for _ in range(3))
    scale = dim ** -0.5
    cands = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for nb in blocks_list:
        lay = op_layout(seq, nb)

        def seg(lay=lay):
            return segment_attention(q, k, v, None, lay, 0.0, scale)

        def seg_cold(lay=lay):
            clear_plan_cache()
            return segment_attention(q, k, v, None, lay, 0.0, scale)

        cands[f"seg{nb}"], cands[f"segcold{nb}"] = seg, seg_cold
        if _segment_plan is not None:
            # The SDPA call alone on the already gathered groups: the floor of any gather-based implementation.
            plan = _segment_plan(lay, None, 0.0, 1, seq, seq)
            assert len(plan.parts) == 1 and plan.parts[0].is_causal
            part = plan.parts[0]
            qg, kg, vg = (x[0].index_select(1, idx).view(heads, part.groups, -1, dim).transpose(0, 1).contiguous()
                          for x, idx in ((q, part.q.index), (k, part.k.index), (v, part.k.index)))

            def kernel(qg=qg, kg=kg, vg=vg):
                return F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)

            cands[f"kernel{nb}"] = kernel
        if flex:
            def fx(lay=lay):
                return flex_attention_hard(q, k, v, None, lay, scale, compile_kernel=True)

            def fx_cold(lay=lay):
                clear_plan_cache()
                return flex_attention_hard(q, k, v, None, lay, scale, compile_kernel=True)

            cands[f"flex{nb}"], cands[f"flexcold{nb}"] = fx, fx_cold
    return cands


def section_b1(args) -> None:
    seqs = args.seqs or ([1024] if args.quick else [1024, 2048, 4096])
    blocks_list = args.blocks or ([8] if args.quick else [4, 8, 16])
    emit("### (b1) hard mode, the attention op alone (no grad)")
    emit()
    emit("q, k, v: `torch.randn(1, 8, S, 64)`; K equal contiguous blocks (ids 1..K, sink at position 0); baseline "
         "`F.scaled_dot_product_attention(q, k, v, is_causal=True)`. Speedup = baseline time / backend time (median "
         "of per-round ratios, [25th-75th percentile]). *warm*: the layout plan (segment) or BlockMask (flex) is "
         "cached, as in every layer after the first of one forward call; *cold*: rebuilt in every call (the "
         "first layer); *kernel-only*: the SDPA call of segment alone, on groups gathered beforehand (the floor of "
         "any implementation that gathers blocks into the batch dimension). flex: `torch.compile(flex_attention)`, "
         "compilation excluded (warm-up).")
    emit()
    rows = []
    for seq in seqs:
        cands = op_candidates(seq, blocks_list, args.flex)
        rounds = args.rounds or (5 if args.quick else 9)
        log(f"(b1) seq {seq}: {len(cands)} candidates x {rounds} rounds (flex compiles on warm-up)")
        with torch.no_grad():
            t = benchlib.interleaved(cands, rounds, warmup=2 if args.flex else 1)
        for nb in blocks_list:
            s_warm = t.ratio("sdpa", f"seg{nb}")
            row = [seq, nb, t.median_ms("sdpa"), t.median_ms(f"seg{nb}"), _iqr(t, "sdpa", f"seg{nb}"),
                   t.ratio("sdpa", f"segcold{nb}"), t.ratio("sdpa", f"kernel{nb}") if f"kernel{nb}" in t.times else "-"]
            if args.flex:
                row += [t.median_ms(f"flex{nb}"), _iqr(t, "sdpa", f"flex{nb}"), t.ratio("sdpa", f"flexcold{nb}")]
            else:
                row += ["-", "-", "-"]
            row += [f">= {nb / 2:g}", met(s_warm >= nb / 2) if seq == 4096 else f"({met(s_warm >= nb / 2)})"]
            rows.append(row)
            flex_note = f", flex {t.ratio('sdpa', f'flex{nb}'):.2f}x" if args.flex else ""
            log(f"(b1) seq {seq} K {nb}: segment {s_warm:.2f}x{flex_note}")
    emit(benchlib.table(["seq", "K", "sdpa causal ms", "segment ms (warm)", "segment speedup (warm)",
                         "segment speedup (cold)", "kernel-only speedup", "flex ms (warm)", "flex speedup (warm)",
                         "flex speedup (cold)", "target", "segment vs target"], rows))
    emit()
    emit("The target applies at S = 4096; shorter sequences are shown in parentheses for reference.")
    emit()


# ------------------------------------------------------------------------------------------------ (b2) the model
_NULL_KEY = "bench_no_attention"


def _no_attention(module, query, key, value, attention_mask, **kwargs):
    """A stand-in for attention that costs O(T): everything of the model but attention (a floor for any backend)."""
    n_rep = query.shape[1] // key.shape[1]
    out = query + repeat_kv(key, n_rep) + repeat_kv(value, n_rep)
    return out.transpose(1, 2).contiguous(), None


def model_b2(kind: str, blocks: int | None = None):
    """(model, extra forward kwargs) for kind in sdpa / floor / segment / flex."""
    model = benchlib.tiny_llama(256, 4, 8, 32)
    if kind == "floor":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(_NULL_KEY, _no_attention)
        AttentionMaskInterface.register(_NULL_KEY, sdpa_mask)
        model.set_attn_implementation(_NULL_KEY)
    elif kind in ("segment", "flex"):
        apply_localist(model, LocalistConfig(alpha=1.0, backend=kind, block_assignment="explicit"))
    return model


def run_model(model, ids, block_ids, grad: bool):
    """One forward (no grad) or forward+backward; the layout plan is rebuilt in every call (a new batch)."""
    clear_plan_cache()
    return benchlib.model_step(model, ids, grad, **({} if block_ids is None else {"block_ids": block_ids}))


def section_b2(args) -> None:
    seqs = args.seqs or ([1024] if args.quick else [1024, 2048, 4096])
    blocks_list = args.blocks or ([8] if args.quick else [4, 8, 16])
    emit("### (b2) hard mode, whole model: forward (no grad) and forward+backward")
    emit()
    emit("Llama: hidden 256, intermediate 682, 4 layers, 8 heads, head_dim 32, vocab 1000, batch 1; loss = LM cross "
         "entropy on the input ids. segment / flex: the same weights with `apply_localist(alpha=1, backend=..., "
         "block_assignment='explicit')` and K equal contiguous `block_ids`; the layout plan is rebuilt in every "
         "call (cache cleared), as with a new batch. Speedup = sdpa time / backend time (median of per-round ratios, "
         "[25th-75th percentile]). *bound*: sdpa time / time of the same model with attention replaced by an "
         "O(T) stand-in (q + k + v): the speedup an infinitely fast attention would give (Amdahl).")
    emit()
    models = {"sdpa": model_b2("sdpa"), "floor": model_b2("floor"), "segment": model_b2("segment")}
    if args.flex:
        models["flex"] = model_b2("flex")
    rows = []
    for seq in seqs:
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seq))
        res = {}
        for grad in (False, True):
            cands = {"sdpa": lambda: run_model(models["sdpa"], ids, None, grad),
                     "floor": lambda: run_model(models["floor"], ids, None, grad)}
            for nb in blocks_list:
                bids = benchlib.equal_blocks(1, seq, nb)
                cands[f"seg{nb}"] = (lambda bids=bids: run_model(models["segment"], ids, bids, grad))
                if args.flex and not grad:
                    cands[f"flex{nb}"] = (lambda bids=bids: run_model(models["flex"], ids, bids, grad))
            rounds = args.rounds or (3 if args.quick else (5 if seq >= 4096 else 7))
            log(f"(b2) seq {seq} {'fwd+bwd' if grad else 'fwd'}: {len(cands)} candidates x {rounds} rounds")
            res[grad] = benchlib.interleaved(cands, rounds, warmup=1)
        tf, tb = res[False], res[True]
        for nb in blocks_list:
            s_fb = tb.ratio("sdpa", f"seg{nb}")
            flex_cell = _iqr(tf, "sdpa", f"flex{nb}") if args.flex else "-"
            target = met(s_fb >= 2.0) if (seq == 4096 and nb == 8) else "-"
            rows.append([seq, nb, tf.median_ms("sdpa"), tf.median_ms(f"seg{nb}"), _iqr(tf, "sdpa", f"seg{nb}"),
                         flex_cell, tf.ratio("sdpa", "floor"), tb.median_ms("sdpa"), tb.median_ms(f"seg{nb}"),
                         _iqr(tb, "sdpa", f"seg{nb}"), tb.ratio("sdpa", "floor"), target])
            log(f"(b2) seq {seq} K {nb}: fwd {tf.ratio('sdpa', f'seg{nb}'):.2f}x, fwd+bwd {s_fb:.2f}x "
                f"(bound {tb.ratio('sdpa', 'floor'):.2f}x)")
    emit(benchlib.table(["seq", "K", "fwd sdpa ms", "fwd segment ms", "fwd segment speedup", "fwd flex speedup",
                         "fwd bound", "fwd+bwd sdpa ms", "fwd+bwd segment ms", "fwd+bwd segment speedup",
                         "fwd+bwd bound", "target (>= 2x at 4096, K=8)"], rows))
    emit()


# ------------------------------------------------------------------------------------------------ ref: before/after
def load_ref_backends(ref: str):
    """``hf_localist/attention/backends.py`` as it was at git commit ``ref``, imported as a separate module."""
    import importlib.util
    import tempfile

    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    for where in ("src/hf_localist/attention/backends.py", "src/hf_localist/backends.py"):  # after / before the move
        shown = subprocess.run(["git", "show", f"{ref}:{where}"], capture_output=True, text=True, cwd=root)
        if shown.returncode == 0:
            text = shown.stdout
            break
    else:
        raise SystemExit(f"--ref {ref}: no backends.py at that commit")
    path = os.path.join(tempfile.mkdtemp(prefix="ref-backends-"), "ref_backends.py")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    spec = importlib.util.spec_from_file_location("ref_backends", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ref_backends"] = module
    spec.loader.exec_module(module)
    return module


def section_ref(args) -> None:
    """The current segment backend vs the one at git commit ``--ref``, interleaved in one process."""
    from hf_localist.attention import function as attention_module

    ref = load_ref_backends(args.ref)
    seqs = args.seqs or ([1024] if args.quick else [2048, 4096])
    blocks_list = args.blocks or ([8] if args.quick else [4, 8, 16])
    emit(f"### segment now vs segment at commit `{args.ref}` (same process, interleaved)")
    emit()
    emit("Same configurations as b1 (op, no grad, layout plan warm) and b2 (model forward+backward, plan rebuilt per "
         "call); the model runs the old function by swapping `hf_localist.attention.function.segment_attention` "
         "around its calls. Speedup = sdpa time / backend time (median of per-round ratios).")
    emit()
    rows = []
    current = attention_module.segment_attention
    model = model_b2("segment")
    base = model_b2("sdpa")

    def with_ref(fn):
        attention_module.segment_attention = ref.segment_attention
        try:
            return fn()
        finally:
            attention_module.segment_attention = current

    for seq in seqs:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, seq, 64, generator=g) for _ in range(3))
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seq))
        op = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        fb = {"sdpa": lambda: run_model(base, ids, None, True)}
        for nb in blocks_list:
            lay = op_layout(seq, nb)
            bids = benchlib.equal_blocks(1, seq, nb)
            op[f"now{nb}"] = lambda lay=lay: segment_attention(q, k, v, None, lay, 0.0, 0.125)
            op[f"ref{nb}"] = lambda lay=lay: ref.segment_attention(q, k, v, None, lay, 0.0, 0.125)
            fb[f"now{nb}"] = lambda bids=bids: run_model(model, ids, bids, True)
            fb[f"ref{nb}"] = lambda bids=bids: with_ref(lambda: run_model(model, ids, bids, True))
        log(f"(ref) seq {seq}: op and model comparisons")
        with torch.no_grad():
            t_op = benchlib.interleaved(op, args.rounds or (5 if args.quick else 9), warmup=1)
        t_fb = benchlib.interleaved(fb, args.rounds or (3 if args.quick else 5), warmup=1)
        for nb in blocks_list:
            rows.append([seq, nb, _iqr(t_op, "sdpa", f"ref{nb}"), _iqr(t_op, "sdpa", f"now{nb}"),
                         t_op.ratio(f"ref{nb}", f"now{nb}"), _iqr(t_fb, "sdpa", f"ref{nb}"),
                         _iqr(t_fb, "sdpa", f"now{nb}"), t_fb.ratio(f"ref{nb}", f"now{nb}")])
    emit(benchlib.table(["seq", "K", f"op speedup at {args.ref}", "op speedup now", "op: now faster by",
                         f"fwd+bwd speedup at {args.ref}", "fwd+bwd speedup now", "fwd+bwd: now faster by"], rows))
    emit()


# ------------------------------------------------------------------------------------------------ (c) memory
def probe(spec: dict) -> dict:
    """Run in a fresh subprocess: peak RSS growth of one call of the configuration ``spec``."""
    seq, kind, nb = spec["seq"], spec["kind"], spec.get("blocks")
    if spec["what"] == "op":
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 8, seq, 64, generator=g) for _ in range(3))
        lay = op_layout(seq, nb) if nb else None

        def call():
            clear_plan_cache()
            with torch.no_grad():
                if kind == "sdpa":
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                if kind == "segment":
                    return segment_attention(q, k, v, None, lay, 0.0, 0.125)[0]
                return flex_attention_hard(q, k, v, None, lay, 0.125, compile_kernel=True)[0]
    else:
        model = model_b2(kind)
        ids = torch.randint(0, 1000, (1, seq), generator=torch.Generator().manual_seed(seq))
        bids = benchlib.equal_blocks(1, seq, nb) if nb else None
        grad = spec["what"] == "fwd+bwd"

        def call():
            return run_model(model, ids, bids, grad)
    call()  # warm-up: lazy initialisation, compilation; its memory is freed and trimmed before measuring
    mib, method = benchlib.peak_rss_growth(call)
    return {"mib": mib, "method": method}


def run_probe(spec: dict, threads: int) -> dict:
    return benchlib.run_probe(__file__, spec, threads)


def section_c(args) -> None:
    seqs = args.seqs or ([1024] if args.quick else [1024, 2048, 4096])
    blocks_list = args.blocks or ([8] if args.quick else [4, 8, 16])
    whats = ["op"] if args.quick else ["op", "fwd", "fwd+bwd"]
    emit("### (c) peak memory")
    emit()
    emit("Peak growth of resident memory (MiB) during one call, each number from a fresh subprocess: warm-up call, "
         "`malloc_trim(0)`, reset of the kernel's high-water mark (`/proc/self/clear_refs`), then `VmHWM` after the "
         "call minus `VmRSS` before it. It counts every buffer the call allocates (inputs and weights excluded; "
         "outputs, activations kept for backward, gradients and temporaries included) at page granularity. "
         "The subprocesses run with `MALLOC_MMAP_THRESHOLD_=65536` (glibc), so that every buffer of 64 KiB or more is "
         "mapped when allocated and unmapped when freed and resident memory follows the live buffers. "
         "*op*: the b1 configuration (no grad); *fwd* / *fwd+bwd*: the b2 model (the layout plan is built inside "
         "the call).")
    emit()
    rows = []
    method = "?"
    for what in whats:
        for seq in seqs:
            base = run_probe({"what": what, "seq": seq, "kind": "sdpa"}, args.threads)
            method = base["method"]
            row = [what, seq, base["mib"]]
            for nb in blocks_list:
                m = run_probe({"what": what, "seq": seq, "kind": "segment", "blocks": nb}, args.threads)["mib"]
                row += [m, m / base["mib"] if base["mib"] > 0 else float("nan")]
            if args.flex and what == "op" and seq == max(seqs) and 8 in blocks_list:
                m = run_probe({"what": what, "seq": seq, "kind": "flex", "blocks": 8}, args.threads)["mib"]
                row.append(f"{m:.1f} ({m / base['mib']:.2f})")
            else:
                row.append("-")
            rows.append(row)
            log(f"(c) {what} seq {seq}: {row[2:]}")
    header = ["call", "seq", "sdpa MiB"]
    for nb in blocks_list:
        header += [f"segment K={nb} MiB", "ratio"]
    header.append("flex K=8 MiB (ratio)")
    emit(benchlib.table(header, rows))
    emit()
    emit(f"Method: {method}.")
    emit()


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true", help="CI smoke: small grid, no flex, < 60 s")
    parser.add_argument("--sections", default="a,b1,b2,c",
                        help="comma-separated subset of a,b1,b2,c,ref (ref: segment now vs at commit --ref)")
    parser.add_argument("--seqs", type=int, nargs="*", help="override the sequence lengths of b1, b2, c")
    parser.add_argument("--blocks", type=int, nargs="*", help="override the block counts of b1, b2, c")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per comparison (0: per-section default)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                        help="include flex_attention (default: on, off with --quick)")
    parser.add_argument("--ref", default="eb5d304",
                        help="git commit whose segment backend section 'ref' compares with (default: the first one)")
    parser.add_argument("--out", help="also write the markdown to this file")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    if args.flex is None:
        args.flex = not args.quick
    if args.flex:
        from torch import _dynamo

        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    benchlib.settle_allocator()
    start = time.time()
    cmd = "python benchmarks/bench_attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    emit(f"## hf_localist attention benchmarks (`{cmd.strip()}`)")
    emit()
    emit(benchlib.environment())
    emit()
    sections = {"a": section_a, "b1": section_b1, "b2": section_b2, "c": section_c, "ref": section_ref}
    for name in args.sections.split(","):
        sections[name.strip()](args)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    emit(f"Total time {time.time() - start:.0f} s; load average at the end {load:.2f}.")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(OUT) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
