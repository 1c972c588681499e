"""Correctness check of the hard-mode backends: ``segment_attention`` (and ``flex_attention_hard``) vs the
reference ``dense_attention`` at ``alpha = 1``, outputs AND gradients, on random layouts.

Run after any change to ``src/hf_localist/attention/backends.py``::

    python benchmarks/check_segment.py            # ~1 minute on 2 CPU cores
    python benchmarks/check_segment.py --cases 40 # fewer random cases

Covered: batch 2 with a different layout per row, blocks that recur (non-contiguous), block 0 runs, left and right
padding (bool and float base masks, as transformers' ``sdpa_mask`` gives them), a sink that is not position 0,
GQA, ``beta_anchor > 0``, queries that are a suffix of the keys (chunked prefill, single-token decoding), a
non-causal layer, float32 and float64, equal contiguous blocks (the benchmark layout), and a whole tiny Llama
(``apply_localist`` with ``backend='segment'`` vs ``'dense'``). Rows with no visible key (padding queries whose
output the model never uses) are excluded from the comparison and from the loss.

Exit status 0 when every case matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch

from hf_localist.attention.backends import Layout, base_mask_as_float, block_bias, dense_attention, segment_attention
from hf_localist.blocks.ids import anchor_flags


def random_blocks(g: torch.Generator, length: int, num_blocks: int, mean_run: int) -> torch.Tensor:
    row, cur = [], int(torch.randint(0, num_blocks + 1, (1,), generator=g))
    while len(row) < length:
        run = int(torch.randint(1, 2 * mean_run, (1,), generator=g))
        row += [cur] * run
        cur = int(torch.randint(0, num_blocks + 1, (1,), generator=g))
    return torch.tensor(row[:length], dtype=torch.long)


def make_case(g: torch.Generator, *, batch: int, total: int, q_len: int, heads: int, kv_heads: int, dim: int,
              num_blocks: int, mean_run: int, pad: str, mask_kind: str, causal: bool, dtype: torch.dtype,
              contiguous_equal: bool = False):
    """Random q/k/v, a Layout (last ``q_len`` positions as queries), and a base mask like transformers gives."""
    if contiguous_equal:
        ids = (torch.arange(total) * num_blocks // total + 1)[None].expand(batch, total).clone()
    else:
        ids = torch.stack([random_blocks(g, total, num_blocks, mean_run) for _ in range(batch)])
    valid = torch.ones(batch, total, dtype=torch.bool)
    for r in range(batch):
        n_pad = int(torch.randint(0, max(total // 3, 1), (1,), generator=g)) if pad != "none" and r > 0 else 0
        if pad == "left" and n_pad:
            valid[r, :n_pad] = False
        elif pad == "right" and n_pad:
            valid[r, total - n_pad:] = False
    sink = valid.long().argmax(dim=1)
    q_pos = torch.arange(total - q_len, total)
    k_pos = torch.arange(total)
    layout = Layout(q_blocks=ids[:, total - q_len:], k_blocks=ids, q_pos=q_pos, k_pos=k_pos,
                    k_anchor=anchor_flags(ids), sink=sink, causal=causal)
    mask = None
    if pad != "none" or mask_kind != "none":
        ok = valid[:, None, None, :].expand(batch, 1, q_len, total)
        if causal:
            ok = ok & (k_pos[None, :] <= q_pos[:, None])[None, None]
        if mask_kind in ("none", "bool"):
            mask = ok
        else:
            mask = torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, float("-inf"))
    q = torch.randn(batch, heads, q_len, dim, dtype=dtype, generator=g)
    k = torch.randn(batch, kv_heads, total, dim, dtype=dtype, generator=g)
    v = torch.randn(batch, kv_heads, total, dim, dtype=dtype, generator=g)
    if bool(torch.randint(0, 2, (1,), generator=g)):  # the (B, T, H, D) memory layout models produce
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    return q, k, v, mask, layout


def compare(fn, q, k, v, mask, layout, beta: float, scaling: float, atol: float):
    """Max abs difference of outputs and of q/k/v gradients between ``fn`` and the dense reference."""
    live = ~torch.isneginf(base_mask_as_float(mask, layout, q.shape[2], k.shape[2])
                           + block_bias(layout, 1.0, beta)).all(dim=-1)  # (B, 1, T)
    live = live[:, 0]  # (B, T) rows with at least one visible key
    w = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype) * live[:, :, None, None]
    results = []
    for f in (lambda *a: dense_attention(*a[:5], 1.0, beta, scaling), lambda *a: fn(*a[:5], beta, scaling)):
        qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        out, _ = f(qq, kk, vv, mask, layout)
        (out * w).sum().backward()
        results.append((out.detach() * live[:, :, None, None], qq.grad, kk.grad, vv.grad))
    errs = [float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(*results)]
    finite = all(bool(torch.isfinite(x).all()) for x in results[1])
    return errs, finite and max(errs) <= atol


def same_block_mask(layout, mask, b: int, t: int, s: int) -> bool:
    """The BlockMask of flex_attention_hard has the same partial and full tiles as ``create_block_mask`` (with
    ``mask_mod`` evaluated everywhere): a wrongly 'full' tile would skip the mask in the compiled kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    from hf_localist.attention.flex import _flex_block_mask

    ours = _flex_block_mask(layout, mask, b, t, s)
    ref = create_block_mask(ours.mask_mod, b, None, t, s, device="cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        if not torch.equal(getattr(ours, name).expand_as(getattr(ref, name)), getattr(ref, name)):
            return False
    for num, name in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        counts = getattr(ref, num)
        a, r = getattr(ours, name).expand_as(getattr(ref, name)), getattr(ref, name)
        keep = torch.arange(r.shape[-1]) < counts[..., None]
        if not torch.equal(a[keep], r[keep]):
            return False
    return True


def check_cache() -> bool:
    """The per-call plan cache never serves a stale plan: in-place change of the mask, equal-valued new layouts,
    alternating layouts, a plan built under inference mode then used with autograd."""
    from hf_localist.attention.backends import clear_plan_cache

    g = torch.Generator().manual_seed(11)
    ok = True
    spec = dict(batch=2, total=48, q_len=48, heads=2, kv_heads=2, dim=4, num_blocks=3, mean_run=5, pad="left",
                mask_kind="bool", causal=True, dtype=torch.float64)
    q, k, v, mask, layout = make_case(g, **spec)
    q2, k2, v2, mask2, layout2 = make_case(g, **spec)
    clear_plan_cache()
    for qq, kk, vv, mm, ll in [(q, k, v, mask, layout), (q2, k2, v2, mask2, layout2), (q, k, v, mask, layout)]:
        ok &= compare(segment_attention, qq, kk, vv, mm, ll, 0.0, 0.5, 1e-9)[1]
    mask[1, 0, :, :9] = False  # in place: more padding in row 1
    mask[1, 0, torch.arange(48), torch.arange(48)] |= torch.arange(48) < 9  # padded queries see themselves
    ok &= compare(segment_attention, q, k, v, mask, layout, 0.0, 0.5, 1e-9)[1]
    layout.q_blocks[0, 5:9] = (layout.q_blocks[0, 5:9] + 1) % 4  # in place in the caller's layout tensors
    ok &= compare(segment_attention, q, k, v, mask, layout, 0.0, 0.5, 1e-9)[1]
    clear_plan_cache()
    with torch.inference_mode():
        segment_attention(q, k, v, mask, layout, 0.0, 0.5)
    ok &= compare(segment_attention, q, k, v, mask, layout, 0.0, 0.5, 1e-9)[1]
    print(f"{'PASS' if ok else 'FAIL'} plan cache (in-place mask/layout changes, alternating layouts, inference mode)")
    return ok


def check_model(atol: float = 1e-4) -> bool:
    """A tiny Llama, hard mode: backend='segment' vs 'dense', logits and parameter gradients, with padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_localist import LocalistConfig, apply_localist

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
    ok = True
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 96), generator=g)
    blocks = torch.stack([random_blocks(g, 96, 3, 8) for _ in range(2)])
    am = torch.ones(2, 96, dtype=torch.long)
    am[1, :17] = 0
    grads = {}
    outs = {}
    for backend in ("dense", "segment"):
        torch.manual_seed(0)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
        handle = apply_localist(model, LocalistConfig(alpha=1.0, backend=backend, block_assignment="explicit"))
        out = model(input_ids=ids, attention_mask=am, block_ids=blocks).logits
        loss = (out * am[:, :, None]).square().mean()
        loss.backward()
        outs[backend] = out.detach() * am[:, :, None]
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert handle.state.backend_counts.get(backend, 0) > 0, handle.state.backend_counts
    err = float((outs["dense"] - outs["segment"]).abs().max())
    gerr = max(float((grads["dense"][n] - grads["segment"][n]).abs().max()) for n in grads["dense"])
    ok = err <= atol and gerr <= atol
    print(f"{'PASS' if ok else 'FAIL'} tiny llama (GQA, left padding, random blocks): "
          f"logits {err:.2e}, grads {gerr:.2e}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=120, help="number of random cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flex", action="store_true", help="also check flex_attention_hard (forward only, eager)")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    failures = 0

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=g))]

    fixed = [  # always-run cases, then random ones
        dict(batch=1, total=256, q_len=256, heads=8, kv_heads=8, dim=16, num_blocks=8, mean_run=0, pad="none",
             mask_kind="none", causal=True, dtype=torch.float64, contiguous_equal=True),
        dict(batch=2, total=200, q_len=200, heads=4, kv_heads=2, dim=8, num_blocks=4, mean_run=0, pad="left",
             mask_kind="bool", causal=True, dtype=torch.float64, contiguous_equal=True),
    ]
    for i in range(len(fixed) + args.cases):
        if i < len(fixed):
            spec = fixed[i]
        else:
            total = pick([1, 2, 7, 33, 64, 130])
            heads, kv = pick([(4, 4), (4, 2), (6, 1)])
            spec = dict(batch=pick([1, 2, 3]), total=total, q_len=pick([total, total, max(total // 2, 1), 1]),
                        heads=heads, kv_heads=kv, dim=pick([4, 8]), num_blocks=pick([1, 2, 3, 6]),
                        mean_run=pick([1, 3, 8, 40]), pad=pick(["none", "left", "right"]),
                        mask_kind=pick(["none", "bool", "float"]), causal=pick([True, True, False]),
                        dtype=pick([torch.float64, torch.float32]))
        beta = pick([0.0, 0.0, 1.5]) if i >= len(fixed) else 0.0
        q, k, v, mask, layout = make_case(g, **spec)
        scaling = spec["dim"] ** -0.5
        atol = 1e-9 if spec["dtype"] == torch.float64 else 2e-5
        errs, ok = compare(segment_attention, q, k, v, mask, layout, beta, scaling, atol)
        failures += not ok
        if not ok or i < len(fixed):
            shown = {key: val for key, val in spec.items() if key != "dtype"}
            print(f"{'PASS' if ok else 'FAIL'} case {i} {shown} beta={beta} {str(spec['dtype'])[6:]}: "
                  f"out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}")
        if args.flex and beta == 0.0 and spec["total"] >= 1:
            from hf_localist.attention.flex import flex_attention_hard

            with torch.no_grad():
                ref, _ = dense_attention(q, k, v, mask, layout, 1.0, 0.0, scaling)
                out, _ = flex_attention_hard(q, k, v, mask, layout, scaling, compile_kernel=False)
            live = ~torch.isneginf(base_mask_as_float(mask, layout, q.shape[2], k.shape[2])
                                   + block_bias(layout, 1.0, 0.0)).all(dim=-1)[:, 0]
            err = float(((ref - out) * live[:, :, None, None]).abs().max())
            same_tiles = same_block_mask(layout, mask, q.shape[0], q.shape[2], k.shape[2])
            if err > max(atol, 1e-5) or not same_tiles:
                failures += 1
                print(f"FAIL flex case {i}: out {err:.1e}, tiles as create_block_mask: {same_tiles}")
    print(f"{args.cases + len(fixed)} layout cases checked, {failures} failed")
    if args.flex:  # BlockMask tiles on longer sequences (several 128-tiles, query windows not tile-aligned)
        bad = 0
        for i in range(30):
            total = int(torch.randint(200, 1100, (1,), generator=g))
            q_len = pick([total, int(torch.randint(1, total + 1, (1,), generator=g))])
            pad, causal = pick(["none", "left", "right"]), pick([True, True, False])
            spec = dict(batch=2, total=total, q_len=q_len, heads=1, kv_heads=1, dim=2, num_blocks=pick([2, 5]),
                        mean_run=pick([20, 150]), pad=pad, mask_kind=pick(["bool", "float"]), causal=causal,
                        dtype=torch.float32)
            _, _, _, mask, layout = make_case(g, **spec)
            if not same_block_mask(layout, mask, 2, q_len, total):
                bad += 1
                print(f"FAIL flex tiles {spec}")
        print(f"30 flex BlockMask cases on long sequences, {bad} failed")
        failures += bad
    failures += not check_cache()
    failures += not check_model()
    print("ALL PASS" if failures == 0 else f"{failures} FAILURES")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
