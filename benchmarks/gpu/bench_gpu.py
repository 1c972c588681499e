"""GPU fast path of hf_localist: flex_attention with a BlockMask, bf16, vs sdpa (and flash where available).

Prints markdown ratio tables, in the format of the CPU benchmarks (``benchmarks/bench_attention.py``):

  op     the attention op alone, q/k/v (1, H, S, D) in bf16, K equal contiguous blocks: forward and forward+backward
         time of ``sdpa(is_causal=True)`` (the default dispatch: flash on recent GPUs), ``sdpa`` forced to the flash
         kernel (where available) and hard-mode localist attention (``flex_attention_hard``, compiled). Speedup =
         baseline time / localist time, median of per-round ratios measured side by side (rounds interleave the
         candidates, so drifts of a shared machine cancel); peak memory allocated during one call.
  model  a Llama (hidden 1024, 4 layers, 16 heads, bf16) trained for a few steps with ``apply_localist(alpha=1,
         backend='flex')`` and a new random block layout at every step (same shapes) vs the same model with sdpa:
         forward+backward time ratio, and the number of torch.compile graphs after the first step (must stay
         constant: the BlockMask is built once per distinct layout and the kernel is not recompiled).

Usage (one GPU; a few minutes)::

    bash benchmarks/gpu/run.sh                        # S = 4k, 8k, 16k, 32k; K = 4, 8, 16
    python benchmarks/gpu/bench_gpu.py --device cpu --quick   # smoke test of the script itself (forward only)

torch 2.13 has no flex_attention backward on CPU: ``--device cpu`` times forwards only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchlib  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hf_localist import LocalistConfig, apply_localist  # noqa: E402
from hf_localist.attention.backends import Layout, clear_plan_cache  # noqa: E402
from hf_localist.attention.flex import flex_attention_hard  # noqa: E402
from hf_localist.blocks.ids import anchor_flags  # noqa: E402


def emit(text: str = "") -> None:
    print(text, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layout(seq: int, blocks: int, device: torch.device) -> Layout:
    ids = benchlib.equal_blocks(1, seq, blocks).to(device)
    pos = torch.arange(seq, device=device)
    return Layout(q_blocks=ids, k_blocks=ids, q_pos=pos, k_pos=pos, k_anchor=anchor_flags(ids),
                  sink=torch.zeros(1, dtype=torch.long, device=device), causal=True)


def flash_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q = torch.randn(1, 1, 128, 64, device=device, dtype=torch.bfloat16)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True
    except RuntimeError:
        return False


def peak_mib(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


def section_op(args, device: torch.device, dtype: torch.dtype) -> None:
    grad_modes = [False] if device.type == "cpu" else [False, True]
    flash = flash_available(device)
    emit(f"### op: hard-mode attention alone, (1, {args.heads}, S, {args.dim}) {str(dtype).split('.')[-1]}")
    emit()
    rows = []
    for seq in args.seqs:
        g = torch.Generator(device="cpu").manual_seed(seq)
        q, k, v = (torch.randn(1, args.heads, seq, args.dim, generator=g).to(device, dtype) for _ in range(3))
        scale = args.dim ** -0.5
        for grad in grad_modes:
            qq, kk, vv = (x.detach().requires_grad_(grad) for x in (q, k, v))

            def run(fn):
                def call():
                    out = fn()
                    if grad:
                        out.float().sum().backward()
                        qq.grad = kk.grad = vv.grad = None
                    sync(device)
                return call

            cands = {"sdpa": run(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True))}
            if flash:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                def flash_call():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                cands["flash"] = run(flash_call)
            for nb in args.blocks:
                lay = layout(seq, nb, device)
                cands[f"flex{nb}"] = run(lambda lay=lay: flex_attention_hard(qq, kk, vv, None, lay, scale, True)[0])
            with torch.set_grad_enabled(grad):
                t = benchlib.interleaved(cands, args.rounds, warmup=2)
                mem = {name: peak_mib(fn, device) for name, fn in cands.items()}
            for nb in args.blocks:
                rows.append([seq, nb, "fwd+bwd" if grad else "fwd", t.median_ms("sdpa"),
                             t.median_ms("flash") if flash else "-", t.median_ms(f"flex{nb}"),
                             t.ratio("sdpa", f"flex{nb}"), t.ratio("flash", f"flex{nb}") if flash else "-",
                             f"{mem['sdpa']:.0f} / {mem[f'flex{nb}']:.0f}"])
            print(f"# op seq {seq} {'fwd+bwd' if grad else 'fwd'} done", file=sys.stderr, flush=True)
    emit(benchlib.table(["seq", "K", "pass", "sdpa ms", "flash ms", "localist flex ms", "speedup vs sdpa",
                         "speedup vs flash", "peak MiB sdpa / flex"], rows))
    emit()


def section_model(args, device: torch.device, dtype: torch.dtype) -> None:
    from torch._dynamo.utils import counters

    grad = device.type != "cpu"
    hidden = 256 if args.quick else 1024
    emit(f"### model: Llama hidden {hidden}, 4 layers, 16 heads, {str(dtype).split('.')[-1]}, "
         f"{'forward+backward' if grad else 'forward'}; a new block layout every step")
    emit()
    sdpa = benchlib.tiny_llama(hidden, 4, 16, hidden // 16, max_len=max(args.seqs)).to(device, dtype)
    local = benchlib.tiny_llama(hidden, 4, 16, hidden // 16, max_len=max(args.seqs)).to(device, dtype)
    apply_localist(local, LocalistConfig(alpha=1.0, backend="flex", block_assignment="explicit"))
    rows = []
    for seq in args.seqs:
        ids = torch.randint(0, 1000, (1, seq), device=device)
        step = [0]

        def call(model, blocks_fn):
            def go():
                benchlib.model_step(model, ids, grad, **({} if blocks_fn is None else {"block_ids": blocks_fn()}))
                sync(device)
            return go

        def new_layout(nb):
            step[0] += 1  # random cut points: every step a layout never seen before
            g = torch.Generator().manual_seed(step[0])
            cuts = torch.sort(torch.randperm(seq - 1, generator=g)[: nb - 1] + 1).values
            blocks = torch.zeros(seq, dtype=torch.long)
            blocks[cuts] = 1
            return (blocks.cumsum(0) + 1)[None].to(device)

        for nb in args.blocks:
            warm = call(local, lambda nb=nb: new_layout(nb))
            warm()
            graphs = counters["stats"]["unique_graphs"]
            t = benchlib.interleaved({"sdpa": call(sdpa, None), "localist": warm}, args.rounds, warmup=1)
            recompiles = counters["stats"]["unique_graphs"] - graphs
            rows.append([seq, nb, t.median_ms("sdpa"), t.median_ms("localist"), t.ratio("sdpa", "localist"),
                         recompiles])
        print(f"# model seq {seq} done", file=sys.stderr, flush=True)
    emit(benchlib.table(["seq", "K (random cuts)", "sdpa ms", "localist flex ms", "speedup", "recompiles"], rows))
    emit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test: forward only)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--seqs", type=int, nargs="*", default=None, help="default 4096 8192 16384 32768")
    parser.add_argument("--blocks", type=int, nargs="*", default=None, help="default 4 8 16")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison (default 7; quick 2)")
    parser.add_argument("--sections", default="op,model")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --device cpu --quick for a smoke test")
    dtype = getattr(torch, args.dtype)
    args.seqs = args.seqs or ([256] if args.quick else [4096, 8192, 16384, 32768])
    args.blocks = args.blocks or ([4] if args.quick else [4, 8, 16])
    args.rounds = args.rounds or (2 if args.quick else 7)
    if args.quick:
        args.heads, args.dim = 4, 32
    emit(f"## hf_localist GPU benchmark ({device}, "
         f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})")
    emit()
    emit(benchlib.environment())
    emit()
    start = time.perf_counter()
    clear_plan_cache()
    if "op" in args.sections:
        section_op(args, device, dtype)
    if "model" in args.sections:
        section_model(args, device, dtype)
    emit(f"Total time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
