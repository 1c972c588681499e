"""Hard-mode localist attention with ``torch.nn.attention.flex_attention`` and a ``BlockMask``.

The block rule is a ``mask_mod`` closed over the layout tensors; the BlockMask's tiles are classified without
evaluating it over the whole grid, built once per distinct layout (shared by the layers of a call and reused across
calls through the plan cache of :mod:`hf_localist.attention.backends`), and the compiled kernel is not recompiled when
only the layout changes. torch 2.13 has no flex backward on CPU: training on CPU uses the segment backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import _PLANS, Layout, _base_is_causal_padding

_COMPILED_FLEX = None
_FLEX_TILE = 128  # flex_attention's default sparse block size


def _tile_classes_dense(layout: Layout, base: torch.Tensor | None, b: int, t: int, s: int):
    """(any visible, all visible) per (row, query tile, key tile), from the dense visibility in chunks of rows."""
    qb, kb, tile = layout.q_blocks, layout.k_blocks, _FLEX_TILE
    n_q, n_k = -(-t // tile), -(-s // tile)
    any_vis = torch.zeros(b, n_q, n_k, dtype=torch.bool, device=qb.device)
    all_vis = torch.zeros(b, n_q, n_k, dtype=torch.bool, device=qb.device)
    k_free = (((kb == 0) & layout.general_visible) | layout.key_is_sink())[:, None, :]  # (B, 1, S): keys every query
    # sees (block rule)
    step = max(1, (1 << 22) // (b * n_k * tile * tile)) * tile  # query rows per chunk: ~4M mask entries
    for lo in range(0, t, step):
        hi = min(t, lo + step)
        q_blk = qb[:, lo:hi, None]
        visible = (kb[:, None, :] == q_blk) | k_free | (q_blk == 0)  # (B, rows, S)
        if base is not None:
            visible &= base[:, 0, lo:hi]
        elif layout.causal:
            visible &= layout.k_pos[None, None, :] <= layout.q_pos[None, lo:hi, None]
        rows = -(-(hi - lo) // tile) * tile
        visible = F.pad(visible, (0, n_k * tile - s, 0, rows - (hi - lo)))  # outside the sequence: not visible
        tiles = visible.view(b, rows // tile, tile, n_k, tile)
        any_vis[:, lo // tile: lo // tile + rows // tile] = tiles.any(dim=4).any(dim=2)
        all_vis[:, lo // tile: lo // tile + rows // tile] = tiles.all(dim=4).all(dim=2)
    return any_vis, all_vis


def _tile_classes_counted(layout: Layout, key_ok: torch.Tensor | None, b: int, t: int, s: int):
    """The same as :func:`_tile_classes_dense` for the block rule AND causality AND per-key validity, in
    O(tiles * blocks) plus the tiles that cross the causal diagonal (evaluated densely): per tile pair, the number
    of block-visible (query, key) pairs comes from per-tile histograms of block ids."""
    qb, kb, tile = layout.q_blocks, layout.k_blocks, _FLEX_TILE
    dev = qb.device
    n_q, n_k = -(-t // tile), -(-s // tile)
    nb = int(max(int(qb.max()), int(kb.max()))) + 1
    ok = torch.ones(b, s, dtype=torch.bool, device=dev) if key_ok is None else key_ok
    sink = layout.key_is_sink()
    q_tile = torch.arange(t, device=dev) // tile
    k_tile = torch.arange(s, device=dev) // tile
    hist_q = torch.zeros(b, n_q * nb, dtype=torch.long, device=dev).scatter_add_(
        1, q_tile * nb + qb, torch.ones_like(qb)).view(b, n_q, nb)
    hidden = ok & ~sink  # keys a query of another block >= 1 cannot see (by the block rule)
    if layout.general_visible:
        hidden &= kb >= 1
    hist_k = torch.zeros(b, n_k * nb, dtype=torch.long, device=dev).scatter_add_(
        1, k_tile * nb + kb, hidden.long()).view(b, n_k, nb)
    n_ok = torch.zeros(b, n_k, dtype=torch.long, device=dev).scatter_add_(1, k_tile.expand(b, s), ok.long())
    in_q = torch.zeros(n_q, dtype=torch.long, device=dev).scatter_add_(0, q_tile, torch.ones_like(q_tile))
    # Pairs (query of block v >= 1, ok key of block w >= 1 (or w = 0 when block 0 is hidden), w != v, not the sink)
    # are the invisible ones.
    hq, hk = hist_q[:, :, 1:].double(), hist_k[:, :, 1:].double()
    k_all = hist_k.double().sum(-1)  # (B, n_k): hidden keys of every block (block 0's are counted only when hidden)
    invisible = hq.sum(-1)[:, :, None] * k_all[:, None, :] - hq @ hk.transpose(1, 2)  # (B, n_q, n_k)
    visible = in_q[None, :, None] * n_ok[:, None, :] - invisible.round().long()
    any_vis = visible > 0
    all_vis = visible == tile * tile  # an edge tile (outside the sequence) is never fully visible
    if layout.causal:
        def tile_ends(n, tiles, pos):  # first and last position of each tile
            lo = pos.new_zeros(n).scatter_reduce(0, tiles, pos, "amin", include_self=False)
            return lo, pos.new_zeros(n).scatter_reduce(0, tiles, pos, "amax", include_self=False)

        (q_lo, q_hi), (k_lo, k_hi) = tile_ends(n_q, q_tile, layout.q_pos), tile_ends(n_k, k_tile, layout.k_pos)
        below = k_hi[None, :] <= q_lo[:, None]  # every key of the tile is at or before every query
        above = k_lo[None, :] > q_hi[:, None]  # no key of the tile is visible
        any_vis &= ~above[None]
        all_vis &= below[None]
        cross = (~below & ~above)[None].expand(b, n_q, n_k) & any_vis
        if bool(cross.any()):
            ri, qi, ki = cross.nonzero(as_tuple=True)  # (P,): evaluate these tiles densely
            off = torch.arange(tile, device=dev)
            qr, kr = qi[:, None] * tile + off, ki[:, None] * tile + off  # (P, tile)
            q_in, k_in = qr < t, kr < s
            qr, kr = qr.clamp(max=t - 1), kr.clamp(max=s - 1)
            q_blk, k_blk = qb[ri[:, None], qr][:, :, None], kb[ri[:, None], kr][:, None, :]
            vis = ((k_blk == q_blk) | ((k_blk == 0) & layout.general_visible) | (q_blk == 0)
                   | sink[ri[:, None], kr][:, None, :])
            vis &= (ok[ri[:, None], kr] & k_in)[:, None, :] & q_in[:, :, None]
            vis &= layout.k_pos[kr][:, None, :] <= layout.q_pos[qr][:, :, None]
            any_vis[ri, qi, ki] = vis.flatten(1).any(dim=1)
            all_vis[ri, qi, ki] = vis.flatten(1).all(dim=1)
    return any_vis, all_vis


def _flex_block_mask(layout: Layout, attention_mask: torch.Tensor | None, b: int, t: int, s: int):
    """The BlockMask of the hard block rule (``mask_mod`` closed over the layout tensors). Tiles are classified
    without evaluating the ``mask_mod`` over the whole grid as ``create_block_mask`` does (seconds at 4k tokens on
    CPU): by counting when the base mask is absent or plain causal + padding, else from the dense visibility."""
    from torch.nn.attention.flex_attention import BlockMask

    qb, kb, qpos, kpos, sink = layout.q_blocks, layout.k_blocks, layout.q_pos, layout.k_pos, layout.sink
    base = None
    if attention_mask is not None:
        base = attention_mask[..., :s].expand(b, 1, t, s)
        base = base if base.dtype == torch.bool else ~torch.isneginf(base)
    causal = layout.causal
    general = layout.general_visible

    def mask_mod(bi, hi, qi, ki):
        q_blk, k_blk = qb[bi, qi], kb[bi, ki]
        visible = (k_blk == q_blk) | (q_blk == 0) | (kpos[ki] == sink[bi])
        if general:
            visible = visible | (k_blk == 0)
        if base is not None:
            visible = visible & base[bi, 0, qi, ki]
        elif causal:
            visible = visible & (kpos[ki] <= qpos[qi])
        return visible

    if attention_mask is None:
        any_vis, all_vis = _tile_classes_counted(layout, None, b, t, s)
    else:
        key_ok = _base_is_causal_padding(attention_mask, layout, b, t, s) if causal else None
        if key_ok is not None:
            any_vis, all_vis = _tile_classes_counted(layout, key_ok, b, t, s)
        else:
            any_vis, all_vis = _tile_classes_dense(layout, base, b, t, s)

    def ordered(dense):  # create_block_mask's layout: per query tile, the count and the tile indices first
        dense = dense[:, None]  # (B, 1, n_q, n_k): one mask for every head
        num = dense.sum(dim=-1).to(torch.int32)
        idx = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num, idx

    partial_num, partial_idx = ordered(any_vis & ~all_vis)
    full_num, full_idx = ordered(all_vis)
    return BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=_FLEX_TILE,
                                    mask_mod=mask_mod, seq_lengths=(t, s))


_SOFTCAP_MODS: dict = {}  # softcap -> score_mod: one function per value, so the compiled kernel is reused


def _softcap_score_mod(softcap: float):
    """flex_attention's ``score_mod`` for a logit softcap (Gemma 2): ``softcap * tanh(score / softcap)`` on the
    scaled score, before the mask, as the model's eager attention applies it."""
    fn = _SOFTCAP_MODS.get(softcap)
    if fn is None:
        def fn(score, b, h, q_idx, kv_idx):
            return torch.tanh(score / softcap) * softcap

        _SOFTCAP_MODS[softcap] = fn
    return fn


def flex_attention_hard(query, key, value, attention_mask, layout: Layout, scaling: float, compile_kernel: bool,
                        softcap: float | None = None):
    """Hard-mode attention with flex_attention: the block rule as a ``mask_mod`` closed over the layout tensors.
    The BlockMask is built once per forward call (shared by the layers, see :class:`_PlanCache`); a logit
    ``softcap`` is a ``score_mod``."""
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    b, h, t, _ = query.shape
    s = key.shape[2]
    block_mask = _PLANS.get("flex", layout, attention_mask, ("flex", b, t, s, layout.general_visible),
                            lambda: _flex_block_mask(layout, attention_mask, b, t, s))
    fn = flex_attention
    if compile_kernel:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    gqa = key.shape[1] != h
    score_mod = _softcap_score_mod(float(softcap)) if softcap is not None else None
    out = fn(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
             enable_gqa=gqa)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None
