"""The three ways to compute localist attention once the per-layer dial is known.

- :func:`dense_attention`: the reference. Builds the additive bias of DESIGN.md section 3 as a float mask over
  all (query, key) pairs and runs SDPA, or an explicit softmax when the weights are needed.
- :func:`segment_attention`: hard mode (``alpha_l = 1``). Gathers each (row, block) group's queries and the keys
  they may see into the batch dimension and runs one SDPA call, so the work grows with the sum of squared block
  sizes instead of ``N^2``.
- :func:`flex_attention_hard`: hard mode with ``torch.nn.attention.flex_attention`` and a ``BlockMask``.

All take ``query`` (B, H, T, D), ``key``/``value`` (B, H_kv, S, D) and a :class:`Layout` describing blocks and
positions, and return ``(out (B, T, H, D), weights (B, H, T, S) or None)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Layout:
    """Blocks and positions of one attention call (all on the query's device)."""

    q_blocks: torch.Tensor  # (B, T) block id of each query
    k_blocks: torch.Tensor  # (B, S) block id of each key
    q_pos: torch.Tensor  # (T,) absolute position of each query
    k_pos: torch.Tensor  # (S,) absolute position of each key
    k_anchor: torch.Tensor  # (B, S) bool: key is the first position of a run of its block
    sink: torch.Tensor  # (B,) absolute position of the attention sink (first non-padding token)
    causal: bool  # apply causality when no base mask is given

    def key_is_sink(self) -> torch.Tensor:  # (B, S)
        return self.k_pos[None, :] == self.sink[:, None]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * n_rep, S, D), head h reading kv head h // n_rep (transformers' convention)."""
    if n_rep == 1:
        return x
    b, h_kv, s, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def block_bias(layout: Layout, alpha: float, beta_anchor: float) -> torch.Tensor:
    """The additive bias of DESIGN.md section 3, shape (B, 1, T, S), float32.

    z'_ts = z_ts + log(1 - alpha)        key in another block j != b(t), j != 0, not the sink
    z'_ts = z_ts + alpha * beta_anchor    key is an anchor of b(t) (not the sink)
    queries in block 0 are unbiased. log(1 - 1) = -inf: the hard block mask.
    """
    qb = layout.q_blocks[:, :, None]  # (B, T, 1)
    kb = layout.k_blocks[:, None, :]  # (B, 1, S)
    not_sink = ~layout.key_is_sink()[:, None, :]
    biased_query = qb >= 1
    other = biased_query & (kb >= 1) & (kb != qb) & not_sink
    bias = torch.zeros(other.shape, dtype=torch.float32, device=other.device)
    bias = bias.masked_fill(other, math.log1p(-alpha) if alpha < 1.0 else float("-inf"))
    if beta_anchor > 0.0 and alpha > 0.0:
        own_anchor = biased_query & (kb == qb) & layout.k_anchor[:, None, :] & not_sink
        bias = bias + own_anchor.float() * (alpha * beta_anchor)
    return bias[:, None]  # (B, 1, T, S)


def base_mask_as_float(attention_mask: torch.Tensor | None, layout: Layout, q_len: int, kv_len: int) -> torch.Tensor:
    """The mask transformers gave (bool, float or None), as an additive float32 (B or 1, 1, T, S) mask.

    With no mask, causality is applied here when the layer is causal (transformers passes ``None`` when SDPA's
    ``is_causal`` would do, and for single-token decoding).
    """
    if attention_mask is None:
        if not layout.causal:
            return torch.zeros(1, 1, q_len, kv_len, device=layout.q_pos.device)
        ok = layout.k_pos[None, :] <= layout.q_pos[:, None]  # (T, S)
        return torch.zeros(ok.shape, device=ok.device).masked_fill(~ok, float("-inf"))[None, None]
    mask = attention_mask[..., :kv_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def dense_attention(query, key, value, attention_mask, layout: Layout, alpha: float, beta_anchor: float,
                    scaling: float, dropout: float = 0.0, need_weights: bool = False, softcap: float | None = None):
    """Reference localist attention: SDPA (or an explicit softmax) with base mask + block bias."""
    b, h, t, _ = query.shape
    s = key.shape[2]
    n_rep = h // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    mask = base_mask_as_float(attention_mask, layout, t, s) + block_bias(layout, alpha, beta_anchor)  # (B, 1, T, S)
    # A row with no visible key (a padding query) would give NaN; attend uniformly instead (output is unused).
    dead = torch.isneginf(mask).all(dim=-1, keepdim=True)
    mask = mask.masked_fill(dead, 0.0)
    if not need_weights and softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype), dropout_p=dropout,
                                             scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.float() + mask, dim=-1).to(query.dtype)
    weights = probs
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), weights


def _group_indices(member: torch.Tensor):
    """For a (G, N) bool membership matrix: (G, M) indices of the members (padded with 0) and (G, M) validity."""
    counts = member.sum(dim=1)
    m = max(int(counts.max()), 1)
    n = member.shape[1]
    # Sort members first, in position order: key = position for members, n + position for the rest.
    pos = torch.arange(n, device=member.device).expand_as(member)
    order = torch.where(member, pos, pos + n).argsort(dim=1)[:, :m]
    valid = torch.arange(m, device=member.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def segment_attention(query, key, value, attention_mask, layout: Layout, beta_anchor: float, scaling: float,
                      dropout: float = 0.0):
    """Hard-mode attention with block-sparse work (alpha_l = 1).

    Groups are (row r, block k) pairs present among the queries. Group (r, k >= 1) sees keys of block k, of block
    0 and the sink; group (r, 0) sees every key. Each group's queries (padded to Q_max) and visible keys (padded to
    K_max) go into the batch dimension of one SDPA call, with a mask that keeps causality (on absolute positions),
    the mask transformers gave, and the padding of the groups.
    """
    b, h, t, d = query.shape
    s = key.shape[2]
    n_rep = h // key.shape[1]
    dev = query.device
    qb, kb = layout.q_blocks, layout.k_blocks
    nb = int(max(int(qb.max()), int(kb.max()))) + 1
    # Groups: (row, block) pairs with at least one query.
    present = torch.zeros(b, nb, dtype=torch.bool, device=dev)
    present.scatter_(1, qb, True)
    g_row, g_blk = present.nonzero(as_tuple=True)  # (G,), (G,)
    q_member = qb[g_row] == g_blk[:, None]  # (G, T)
    q_idx, q_valid = _group_indices(q_member)  # (G, Qm)
    g_kb = kb[g_row]  # (G, S)
    k_member = (g_kb == g_blk[:, None]) | (g_kb == 0) | (g_blk[:, None] == 0) | layout.key_is_sink()[g_row]
    if layout.causal or attention_mask is not None:
        # Keys after the group's last query are never visible under a causal mask: skip them.
        last_q = torch.where(q_valid, layout.q_pos[q_idx], torch.full_like(q_idx, -1)).max(dim=1).values
        if layout.causal:
            k_member &= layout.k_pos[None, :] <= last_q[:, None]
    k_idx, k_valid = _group_indices(k_member)  # (G, Km)

    # Gather queries (B, H, T, D) -> (G, H, Qm, D) and keys/values (B, H_kv, S, D) -> (G, H_kv, Km, D).
    qg = query.transpose(1, 2)[g_row[:, None], q_idx].transpose(1, 2)
    kg = key.transpose(1, 2)[g_row[:, None], k_idx].transpose(1, 2)
    vg = value.transpose(1, 2)[g_row[:, None], k_idx].transpose(1, 2)
    kg, vg = repeat_kv(kg, n_rep), repeat_kv(vg, n_rep)

    qpos, kpos = layout.q_pos[q_idx], layout.k_pos[k_idx]  # (G, Qm), (G, Km)
    allowed = q_valid[:, :, None] & k_valid[:, None, :]  # (G, Qm, Km)
    additive = None
    if attention_mask is None:
        if layout.causal:
            allowed &= kpos[:, None, :] <= qpos[:, :, None]
    else:
        base = attention_mask[..., :s]
        base = base.expand(b, 1, t, s)[g_row[:, None, None], 0, q_idx[:, :, None], k_idx[:, None, :]]  # (G, Qm, Km)
        if base.dtype == torch.bool:
            allowed &= base
        else:
            additive = base.float()
            allowed &= ~torch.isneginf(additive)
    # Rows with no visible key (group padding, padding queries) attend to the group's first key only, so that
    # SDPA never sees an empty row; their output is dropped or unused.
    empty = ~allowed.any(dim=-1)  # (G, Qm)
    allowed[:, :, 0] |= empty
    if beta_anchor > 0.0:
        # Anchor bonus (alpha_l = 1): + beta_anchor on keys that are anchors of the group's block (not the sink).
        bonus = (layout.k_anchor[g_row[:, None], k_idx] & (kb[g_row[:, None], k_idx] == g_blk[:, None])
                 & (g_blk[:, None] >= 1) & (kpos != layout.sink[g_row][:, None])).float() * beta_anchor
        additive = bonus[:, None, :] if additive is None else additive + bonus[:, None, :]
    if additive is None:
        mask = allowed[:, None]  # (G, 1, Qm, Km) bool
    else:
        mask = additive.masked_fill(~allowed, float("-inf")).masked_fill(empty[:, :, None] & allowed, 0.0)
        mask = mask[:, None].to(query.dtype)
    og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout, scale=scaling)  # (G,H,Qm,D)

    # Scatter the valid rows back to (B * T, H, D).
    og = og.transpose(1, 2)[q_valid]  # (n_valid, H, D)
    flat = (g_row[:, None] * t + q_idx)[q_valid]  # (n_valid,)
    out = og.new_zeros(b * t, h, d).index_copy(0, flat, og)
    return out.view(b, t, h, d), None


_COMPILED_FLEX = None


def flex_attention_hard(query, key, value, attention_mask, layout: Layout, scaling: float, compile_kernel: bool):
    """Hard-mode attention with flex_attention: the block rule as a ``mask_mod`` closed over the layout tensors."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _COMPILED_FLEX
    b, h, t, _ = query.shape
    s = key.shape[2]
    qb, kb, qpos, kpos, sink = layout.q_blocks, layout.k_blocks, layout.q_pos, layout.k_pos, layout.sink
    base = None
    if attention_mask is not None:
        base = attention_mask[..., :s].expand(b, 1, t, s)
        base = base if base.dtype == torch.bool else ~torch.isneginf(base)
    causal = layout.causal

    def mask_mod(bi, hi, qi, ki):
        q_blk, k_blk = qb[bi, qi], kb[bi, ki]
        visible = (k_blk == q_blk) | (k_blk == 0) | (q_blk == 0) | (kpos[ki] == sink[bi])
        if base is not None:
            visible = visible & base[bi, 0, qi, ki]
        elif causal:
            visible = visible & (kpos[ki] <= qpos[qi])
        return visible

    block_mask = create_block_mask(mask_mod, b, None, t, s, device=query.device)
    fn = flex_attention
    if compile_kernel:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        fn = _COMPILED_FLEX
    gqa = key.shape[1] != h
    out = fn(query, key, value, block_mask=block_mask, scale=scaling, enable_gqa=gqa)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None
