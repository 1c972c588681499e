"""The three ways to compute localist attention once the per-layer dial is known.

- :func:`dense_attention`: the reference. Builds the additive bias of docs/design.md section 3 as a float mask over
  all (query, key) pairs and runs SDPA, or an explicit softmax when the weights are needed.
- :func:`segment_attention`: hard mode (``alpha_l = 1``). Gathers each (row, block) group's queries and the keys
  they may see into the batch dimension and runs one SDPA call, so the work grows with the sum of squared block
  sizes instead of ``N^2``.
- :func:`hf_localist.attention.flex.flex_attention_hard`: hard mode with ``torch.nn.attention.flex_attention`` and
  a ``BlockMask`` (in its own module).

All take ``query`` (B, H, T, D), ``key``/``value`` (B, H_kv, S, D) and a :class:`Layout` describing blocks and
positions, and return ``(out (B, T, H, D), weights (B, H, T, S) or None)``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


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
    # False (LocalistConfig.unassigned_visible=False): queries of blocks >= 1 do not see block-0 keys (the sink stays)
    general_visible: bool = True

    def key_is_sink(self) -> torch.Tensor:  # (B, S)
        return self.k_pos[None, :] == self.sink[:, None]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * n_rep, S, D), head h reading kv head h // n_rep (transformers' convention)."""
    if n_rep == 1:
        return x
    b, h_kv, s, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def block_bias(layout: Layout, alpha: float, beta_anchor: float, general_bias: float = 0.0) -> torch.Tensor:
    """The additive bias of docs/design.md section 3, shape (B, 1, T, S), float32.

    z'_ts = z_ts + log(1 - alpha)        key in another block j != b(t), j != 0 (or j = 0 when
                                          ``layout.general_visible`` is False), not the sink
    z'_ts = z_ts + alpha * beta_anchor    key is an anchor of b(t) (not the sink)
    z'_ts = z_ts + alpha * general_bias   query in block 0, key in a block j >= 1 (not the sink)
    other queries in block 0 are unbiased. log(1 - 1) = -inf: the hard block mask.
    """
    qb = layout.q_blocks[:, :, None]  # (B, T, 1)
    kb = layout.k_blocks[:, None, :]  # (B, 1, S)
    not_sink = ~layout.key_is_sink()[:, None, :]
    biased_query = qb >= 1
    hidden = (kb >= 1) & (kb != qb)  # keys of other blocks
    if not layout.general_visible:
        hidden = hidden | (kb == 0)  # the 'rest' group: unassigned tokens are another block to a block query
    other = biased_query & hidden & not_sink
    bias = torch.zeros(other.shape, dtype=torch.float32, device=other.device)
    bias = bias.masked_fill(other, math.log1p(-alpha) if alpha < 1.0 else float("-inf"))
    if beta_anchor > 0.0 and alpha > 0.0:
        own_anchor = biased_query & (kb == qb) & layout.k_anchor[:, None, :] & not_sink
        bias = bias + own_anchor.float() * (alpha * beta_anchor)
    if general_bias != 0.0 and alpha > 0.0:
        # APE-style rescaling (Yang et al., 2025): a general query's weight on every block key times exp(a * g).
        bias = bias + (~biased_query & (kb >= 1) & not_sink).float() * (alpha * general_bias)
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


def soft_mask(attention_mask, layout: Layout, alpha: float, beta_anchor: float, t: int, s: int,
              general_bias: float = 0.0) -> torch.Tensor:
    """(B, 1, T, S) float32: base mask + block bias. A row without any visible key (a padding query) would give NaN:
    it sees key 0 alone instead (its output is unused; one key, not all, so that its chunk can still skip keys)."""
    mask = base_mask_as_float(attention_mask, layout, t, s) + block_bias(layout, alpha, beta_anchor,
                                                                         general_bias)  # (B, 1, T, S)
    dead = torch.isneginf(mask).all(dim=-1, keepdim=True)  # (B, 1, T, 1)
    first = torch.zeros(s, dtype=torch.bool, device=mask.device)
    first[0] = True
    return mask.masked_fill(dead & first, 0.0)


def _cached_soft_mask(cache: dict | None, attention_mask, layout: Layout, alpha: float, beta_anchor: float, t: int,
                      s: int, general_bias: float = 0.0) -> torch.Tensor:
    """``soft_mask`` through the per-call ``cache`` (one entry). Within one forward call the layout is a function of
    (T, S, causal, device), so a hit needs those, alpha, beta and the very same base-mask tensor at the same version."""
    if cache is None:
        return soft_mask(attention_mask, layout, alpha, beta_anchor, t, s, general_bias)
    key = (alpha, beta_anchor, general_bias, t, s, layout.causal, layout.q_pos.device,
           torch.is_inference_mode_enabled())
    try:
        version = None if attention_mask is None else attention_mask._version
    except RuntimeError:  # an inference tensor: no version counter, no caching
        return soft_mask(attention_mask, layout, alpha, beta_anchor, t, s, general_bias)
    hit = cache.get("soft")
    if hit is not None and hit[0] == key and hit[1] is attention_mask and hit[2] == version:
        return hit[3]
    mask = soft_mask(attention_mask, layout, alpha, beta_anchor, t, s, general_bias)
    cache["soft"] = (key, attention_mask, version, mask)
    return mask


_SOFT_CHUNK = 256  # queries per SDPA call when the trailing keys of a chunk are all masked (causal layers)


def key_extents(mask: torch.Tensor, t: int, s: int) -> list[tuple[int, int, int]] | None:
    """Query chunks ``(a, b, e)``: rows ``a:b`` of ``mask`` (B, 1, T, S) see no key at or after column ``e``.

    SDPA with an additive mask cannot skip the masked upper triangle of a causal layer: it costs about twice causal
    SDPA. Calling it per chunk of 256 queries over keys ``:e`` skips that work and gives the same result (the
    skipped keys have weight exp(-inf) = 0). None when nothing can be skipped (short or non-causal sequences).
    """
    if t < 2 * _SOFT_CHUNK:
        return None
    visible = ~torch.isneginf(mask)  # (B, 1, T, S)
    extents = []
    for a in range(0, t, _SOFT_CHUNK):
        b = min(a + _SOFT_CHUNK, t)
        cols = visible[:, :, a:b].any(dim=2).flatten(0, 1).any(dim=0).nonzero()  # (n, 1) visible key columns
        extents.append((a, b, int(cols[-1]) + 1 if cols.numel() else 1))
    return None if all(e == s for _, _, e in extents) else extents


def _cached_key_extents(cache: dict | None, mask: torch.Tensor, t: int, s: int):
    hit = None if cache is None else cache.get("extents")
    if hit is not None and hit[0] is mask:
        return hit[1]
    extents = key_extents(mask, t, s)
    if cache is not None:
        cache["extents"] = (mask, extents)
    return extents


def dense_attention(query, key, value, attention_mask, layout: Layout, alpha: float, beta_anchor: float,
                    scaling: float, dropout: float = 0.0, need_weights: bool = False, softcap: float | None = None,
                    mask_cache: dict | None = None, general_bias: float = 0.0):
    """Reference localist attention: SDPA (or an explicit softmax) with base mask + block bias.

    ``mask_cache``: a per-call dict (``CallContext.mask_cache``) through which the layers of one forward call share
    the additive mask."""
    b, h, t, _ = query.shape
    s = key.shape[2]
    n_rep = h // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    mask = _cached_soft_mask(mask_cache, attention_mask, layout, alpha, beta_anchor, t, s,
                             general_bias)  # (B, 1, T, S)
    if not need_weights and softcap is None:
        extents = _cached_key_extents(mask_cache, mask, t, s)
        m = mask.to(query.dtype)
        if extents is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=m, dropout_p=dropout, scale=scaling)
        else:  # query chunks, each over the keys up to its last visible one (the causal triangle is skipped)
            out = torch.cat([F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, :e], value[:, :, :e],
                                                            attn_mask=m[..., a:b, :e], dropout_p=dropout, scale=scaling)
                             for a, b, e in extents], dim=2)  # (B, H, T, D)
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


# ---------------------------------------------------------------------------------------------------------------
# segment: the layout-only work (which queries and keys form each group, and where each output goes) is a *plan*,
# computed once per forward call and reused by every layer (the layout and the base mask are the same for all
# layers of one call).


@dataclass
class _Rows:
    """A row gather ``x.index_select(dim, index)`` and how to send gradients back with gathers, not scatters.

    Backward: ``dx = g.index_select(dim, slot)`` (placed at rows ``dst`` of a zero tensor when ``dst`` is given,
    else ``slot`` lists one slot per row, in row order), rows ``zero`` cleared, then ``g``'s ``extra_slot`` rows
    added to rows ``extra_dst`` (rows gathered more than once: the sink, block-0 keys). Slots left out of the
    backward carry exactly zero gradient (outputs that are dropped, padding that no kept query can see).
    """

    index: torch.Tensor
    slot: torch.Tensor
    dst: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    extra_dst: torch.Tensor | None = None
    extra_slot: torch.Tensor | None = None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, rows: _Rows):
        ctx.dim, ctx.rows, ctx.size = dim, rows, x.shape[dim]
        return x.index_select(dim, rows.index)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        dim, rows = ctx.dim, ctx.rows
        vals = g.index_select(dim, rows.slot)
        if rows.dst is None:
            dx = vals
        else:
            shape = list(g.shape)
            shape[dim] = ctx.size
            dx = g.new_zeros(shape).index_copy_(dim, rows.dst, vals)
        if rows.zero is not None:
            dx.index_fill_(dim, rows.zero, 0)
        if rows.extra_dst is not None:
            dx.index_add_(dim, rows.extra_dst, g.index_select(dim, rows.extra_slot))
        return dx, None, None


def _rows_backward(index: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, n: int) -> _Rows:
    """A :class:`_Rows` gathering ``index``, whose gradient flows back from slots ``slots`` (holding rows ``rows``;
    a row may appear in several slots) to ``n`` rows."""
    order = torch.argsort(rows, stable=True)
    r, sl = rows[order], slots[order]
    first = torch.ones_like(r, dtype=torch.bool)
    first[1:] = r[1:] != r[:-1]
    dst, slot = r[first], sl[first]
    extra_dst = extra_slot = None
    if not bool(first.all()):
        extra_dst, extra_slot = r[~first], sl[~first]
    if dst.numel() == n:
        dst = None  # every row has a slot, in row order: the backward is a plain gather
    return _Rows(index, slot, dst, None, extra_dst, extra_slot)


@dataclass
class _Part:
    """One SDPA call of a plan: ``groups`` groups of ``q_len`` query slots and ``k_len`` key slots."""

    q: _Rows  # gathers (B * T) query rows into (groups * q_len) slots
    k: _Rows  # gathers (B * S) key/value rows into (groups * k_len) slots
    groups: int
    q_len: int
    k_len: int
    is_causal: bool  # the group's queries and keys are the same position sequence: SDPA's own is_causal suffices
    mask: torch.Tensor | None  # (G, 1, Qm or 1, Km): bool, or float32 additive; None on the is_causal parts


@dataclass
class _Plan:
    parts: list[_Part]
    out: _Rows  # gathers each query's output row from the concatenated slots of the parts


def _ranks(member: torch.Tensor):
    """For a (G, N) bool membership matrix: the (g, n) pairs of members (row-major, so in position order within
    each group), each member's rank within its group, and the (G, N) rank matrix."""
    rank = member.long().cumsum(dim=1) - 1  # (G, N)
    gi, ni = member.nonzero(as_tuple=True)
    return gi, ni, rank[gi, ni], rank


def _fill_slots(gi, ri, values, groups: int, length: int, fill: torch.Tensor) -> torch.Tensor:
    """A (groups, length) tensor: ``values`` at (gi, ri), ``fill[g]`` elsewhere (padding slots)."""
    out = fill[:, None].expand(groups, length).clone()
    out[gi, ri] = values
    return out


def _base_is_causal_padding(attention_mask: torch.Tensor, layout: Layout, b: int, t: int, s: int):
    """``(B, S)`` key validity when the mask transformers gave is exactly causality AND per-key padding (what
    ``sdpa_mask`` builds for a causal model with a 2-D padding mask), else None. Costs one pass over the mask; the
    plan cache runs it once per forward call."""
    base = attention_mask[..., :s]
    if base.dim() != 4 or base.shape[1] != 1 or base.shape[-2:] != (t, s) or base.shape[0] not in (1, b):
        return None
    if base.dtype == torch.bool:
        visible = base[:, 0]
    else:
        visible = ~torch.isneginf(base[:, 0])
        if not bool(((base[:, 0] == 0) | ~visible).all()):
            return None  # a real additive bias (ALiBi-like): keep it on the masked path
    visible = visible.expand(b, t, s)
    key_ok = visible[:, -1, :]  # the last query is the last key: it sees every valid key
    causal = layout.k_pos[None, :] <= layout.q_pos[:, None]  # (T, S)
    if not torch.equal(visible, key_ok[:, None, :] & causal[None]):
        return None
    return key_ok


def _segment_plan(layout: Layout, attention_mask: torch.Tensor | None, beta_anchor: float, b: int, t: int,
                  s: int) -> _Plan:
    """Group the queries by (row, block) and choose, per group, one of two ways to run it.

    *Sequence* groups (causal layers, base mask absent or plain causal + padding, no anchor bonus): the group's
    visible keys, in position order, form one sequence that contains the group's queries; SDPA runs over it with
    ``is_causal=True`` (no mask tensor at all), and the outputs at positions that are not the group's queries
    (keys of block 0, the sink, cached positions) are dropped. Chosen when the group's queries are at least half
    of the sequence. Groups of about the same length share one SDPA call (padding at the end, which no real query
    can see).

    *Masked* groups (everything else: decoding, anchor bonus, other base masks, non-causal layers, padding
    queries): queries padded to Q_max and visible keys padded to K_max, with a mask that keeps causality on
    absolute positions, the mask transformers gave, the anchor bonus and the group padding.
    """
    dev = layout.q_blocks.device
    qb, kb = layout.q_blocks, layout.k_blocks
    is_sink = layout.key_is_sink()  # (B, S)
    nb = int(max(int(qb.max()), int(kb.max()))) + 1
    pos_t = torch.arange(t, device=dev)
    pos_s = torch.arange(s, device=dev)
    shift = s - t  # query i is key i + shift when the positions line up
    aligned = (t <= s and layout.causal
               and torch.equal(layout.k_pos, layout.k_pos[:1] + pos_s)
               and torch.equal(layout.q_pos, layout.k_pos[shift:])
               and torch.equal(qb, kb[:, shift:]))
    key_ok = None
    if aligned and attention_mask is not None:
        key_ok = _base_is_causal_padding(attention_mask, layout, b, t, s)
        aligned = key_ok is not None

    parts: list[_Part] = []
    q_dst, q_slot = [], []  # per part: query rows and their slot within the part
    masked_q = torch.ones(b, t, dtype=torch.bool, device=dev)
    if aligned:
        seq_q = torch.ones(b, t, dtype=torch.bool, device=dev) if key_ok is None else key_ok[:, shift:].clone()
        if beta_anchor > 0.0:
            seq_q &= qb == 0  # the anchor bonus needs an additive mask: block >= 1 queries go the masked way
        counts = torch.zeros(b, nb, dtype=torch.long, device=dev).scatter_add_(1, qb, seq_q.long())
        g_row, g_blk = (counts > 0).nonzero(as_tuple=True)
        if g_row.numel():
            q_sel = (qb[g_row] == g_blk[:, None]) & seq_q[g_row]  # (G, T)
            g_kb = kb[g_row]
            member = ((g_kb == g_blk[:, None]) | ((g_kb == 0) & layout.general_visible) | (g_blk[:, None] == 0)
                      | is_sink[g_row])  # (G, S)
            if key_ok is not None:
                member &= key_ok[g_row]
            last = torch.where(q_sel, pos_t, -1).max(dim=1).values + shift
            member &= pos_s[None, :] <= last[:, None]
            length = member.sum(dim=1)
            use = 2 * counts[g_row, g_blk] >= length  # else most of the sequence would be wasted rows
            if not bool(use.all()):
                back = torch.zeros(b, t, dtype=torch.long, device=dev)
                back.index_put_((g_row[~use],), q_sel[~use].long(), accumulate=True)
                seq_q &= back == 0
                g_row, q_sel, member, length = g_row[use], q_sel[use], member[use], length[use]
            masked_q = ~seq_q
            # Buckets of similar length: one SDPA call each, padded to the longest member.
            lengths = length.tolist()
            buckets: list[list[int]] = []
            for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
                if buckets and 5 * lengths[i] >= 4 * lengths[buckets[-1][0]]:
                    buckets[-1].append(i)
                else:
                    buckets.append([i])
            for bucket in buckets:
                idx = torch.tensor(bucket, dtype=torch.long, device=dev)
                rows, m_b, sel_b = g_row[idx], member[idx], q_sel[idx]
                n_g, n_l = len(bucket), lengths[bucket[0]]
                gi, si, ri, rank = _ranks(m_b)
                k_index = _fill_slots(gi, ri, rows[gi] * s + si, n_g, n_l, rows * s).view(-1)
                q_index = _fill_slots(gi, ri, rows[gi] * t + (si - shift).clamp(min=0), n_g, n_l, rows * t).view(-1)
                # Key gradients: every sequence slot (trailing padding slots are seen by no kept query).
                k_rows = _rows_backward(k_index, rows[gi] * s + si, gi * n_l + ri, b * s)
                qg, qt = sel_b.nonzero(as_tuple=True)
                q_dst.append(rows[qg] * t + qt)
                q_slot.append(qg * n_l + rank[qg, qt + shift])
                parts.append(_Part(_Rows(q_index, q_slot[-1]), k_rows, n_g, n_l, n_l, True, None))

    if bool(masked_q.any()):
        part, dst, slot = _masked_part(layout, attention_mask, beta_anchor, masked_q, nb, b, t, s, is_sink)
        parts.append(part)
        q_dst.append(dst)
        q_slot.append(slot)

    # Query gradients: each query's one kept slot. Outputs: each query row gathers its slot.
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + part.groups * part.q_len)
    src = torch.empty(b * t, dtype=torch.long, device=dev)
    for part, dst, slot, off in zip(parts, q_dst, q_slot, offsets):
        src[dst] = slot + off
        if len(parts) == 1:
            part.q.slot = src  # every query row is in this part
        else:
            part.q.dst = dst
    total = offsets[-1]
    inverse = torch.zeros(total, dtype=torch.long, device=dev)
    inverse[src] = torch.arange(b * t, device=dev)
    dropped = torch.ones(total, dtype=torch.bool, device=dev)
    dropped[src] = False
    zero = dropped.nonzero().view(-1)
    out = _Rows(src, inverse, zero=zero if zero.numel() else None)
    return _Plan(parts, out)


def _masked_part(layout: Layout, attention_mask, beta_anchor: float, queries: torch.Tensor, nb: int, b: int,
                 t: int, s: int, is_sink: torch.Tensor):
    """The masked groups: (row, block) pairs of ``queries`` (B, T) bool, padded, with an explicit mask.
    Returns the part, and the query rows with their slots."""
    dev = queries.device
    qb, kb = layout.q_blocks, layout.k_blocks
    counts = torch.zeros(b, nb, dtype=torch.long, device=dev).scatter_add_(1, qb, queries.long())
    g_row, g_blk = (counts > 0).nonzero(as_tuple=True)  # (G,)
    n_g = g_row.numel()
    zeros = torch.zeros_like(g_row)
    q_member = (qb[g_row] == g_blk[:, None]) & queries[g_row]  # (G, T)
    qgi, qti, qri, _ = _ranks(q_member)
    q_len = int(counts[g_row, g_blk].max())
    q_idx = _fill_slots(qgi, qri, qti, n_g, q_len, zeros)
    q_valid = _fill_slots(qgi, qri, torch.ones_like(qti), n_g, q_len, zeros) > 0
    g_kb = kb[g_row]  # (G, S)
    k_member = ((g_kb == g_blk[:, None]) | ((g_kb == 0) & layout.general_visible) | (g_blk[:, None] == 0)
                | is_sink[g_row])
    if layout.causal:
        # Keys after the group's last query are never visible under a causal mask: skip them.
        last_q = torch.where(q_valid, layout.q_pos[q_idx], torch.full_like(q_idx, -1)).max(dim=1).values
        k_member &= layout.k_pos[None, :] <= last_q[:, None]
    k_count = k_member.sum(dim=1)
    k_len = max(int(k_count.max()), 1)
    kgi, ksi, kri, _ = _ranks(k_member)
    k_idx = _fill_slots(kgi, kri, ksi, n_g, k_len, zeros)
    k_valid = _fill_slots(kgi, kri, torch.ones_like(ksi), n_g, k_len, zeros) > 0

    if not layout.causal and attention_mask is None and beta_anchor == 0.0 and bool((k_count > 0).all()):
        # Only the group padding of the keys to hide: a (G, 1, 1, Km) mask (None when no group is padded).
        mask = None if bool(k_valid.all()) else k_valid[:, None, None, :]
    else:
        qpos, kpos = layout.q_pos[q_idx], layout.k_pos[k_idx]  # (G, Qm), (G, Km)
        allowed = q_valid[:, :, None] & k_valid[:, None, :]  # (G, Qm, Km)
        additive = None
        if attention_mask is None:
            if layout.causal:
                allowed &= kpos[:, None, :] <= qpos[:, :, None]
        else:
            base = attention_mask[..., :s]
            base = base.expand(b, 1, t, s)[g_row[:, None, None], 0, q_idx[:, :, None], k_idx[:, None, :]]
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
            mask = additive.masked_fill(~allowed, float("-inf")).masked_fill(empty[:, :, None] & allowed, 0.0)[:, None]
    k_index = (g_row[:, None] * s + k_idx).view(-1)
    # Key gradients: all slots (a padding slot can be the stand-in key of an empty row).
    k_rows = _rows_backward(k_index, k_index, torch.arange(k_index.numel(), device=dev), b * s)
    q_rows = _Rows((g_row[:, None] * t + q_idx).view(-1), qgi * q_len + qri)
    part = _Part(q_rows, k_rows, n_g, q_len, k_len, False, mask)
    return part, g_row[qgi] * t + qti, qgi * q_len + qri


class _PlanCache:
    """The plans (or flex BlockMasks) of the last few attention calls, per kind, reused while the call's layout and
    base mask are the same: every layer of one forward call shares them, so the layout work runs once per call (a
    few entries, because models that mix full and sliding-window layers alternate between two masks).

    A hit needs the same shapes, scalars and device, equal layout tensors (compared by value: (B, S)-sized, cheap),
    and the very same base-mask tensor object (held by weak reference) at the same version counter, so that an
    in-place change of the mask is a miss. Inference-mode tensors have no version counter: with such a mask the
    plan is rebuilt on every call. Plans built under inference mode are kept apart from the others (their tensors
    cannot be saved for backward).
    """

    size = 4  # entries per kind

    def __init__(self):
        self._entries: dict[str, list[tuple]] = {}

    @staticmethod
    def _signature(layout: Layout, mask: torch.Tensor | None, scalars: tuple):
        if mask is None:
            mask_sig = None
        else:
            try:
                mask_sig = (weakref.ref(mask), mask._version, mask.shape, mask.dtype)
            except RuntimeError:  # an inference tensor: no version counter to detect in-place changes
                return None
        tensors = (layout.q_blocks, layout.k_blocks, layout.q_pos, layout.k_pos, layout.k_anchor, layout.sink)
        return (scalars + (layout.causal, torch.is_inference_mode_enabled(), layout.q_blocks.device),
                tensors, mask_sig)

    @staticmethod
    def _same(old, new, mask) -> bool:
        if old[0] != new[0] or (old[2] is None) != (new[2] is None):
            return False
        if old[2] is not None and (old[2][0]() is not mask or old[2][1:] != new[2][1:]):
            return False
        return all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(old[1], new[1]))

    def get(self, kind: str, layout: Layout, mask: torch.Tensor | None, scalars: tuple, build):
        sig = self._signature(layout, mask, scalars)
        if sig is None:
            return build()
        entries = self._entries.get(kind, [])
        for entry in entries:
            if self._same(entry[0], sig, mask):
                return entry[1]
        value = build()
        frozen = (sig[0], tuple(x.clone() for x in sig[1]), sig[2])  # by value: callers may reuse their buffers
        self._entries[kind] = [(frozen, value)] + entries[: self.size - 1]
        return value

    def clear(self) -> None:
        self._entries.clear()


_PLANS = _PlanCache()


def clear_plan_cache() -> None:
    """Forget the cached segment plan and flex BlockMask (benchmarks use it to time the layout work too)."""
    _PLANS.clear()


def _gather(x: torch.Tensor, rows: _Rows, groups: int, length: int) -> torch.Tensor:
    """Rows of ``x`` (B, H, N, D) at flat indices ``rows.index`` (b * N + n) as (groups, H, length, D), one copy."""
    b, h, n, d = x.shape
    xt = x.transpose(1, 2)  # (B, N, H, D): contiguous for the q/k/v that models produce
    if xt.is_contiguous() or b > 1:
        g = _GatherRows.apply(xt.reshape(b * n, h, d), 0, rows)
        return g.view(groups, length, h, d).transpose(1, 2)
    g = _GatherRows.apply(x[0], 1, rows)  # (H, N, D) memory: gather along N
    return g.view(h, groups, length, d).transpose(0, 1)


def _group_attention(q, k, v, mask, is_causal: bool, scaling: float, dropout: float, gqa: bool,
                     softcap: float | None):
    """SDPA over the gathered groups; with a logit ``softcap`` (Gemma 2), which SDPA cannot apply, the same
    computation written out: ``softcap * tanh(scaling * q k^T / softcap)``, then the mask, then softmax (the order
    of transformers' eager attention and of :func:`dense_attention`)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                              scale=scaling, enable_gqa=gqa)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = (torch.tanh(scores / softcap) * softcap).float()
    if is_causal:  # SDPA's is_causal: top-left aligned (the groups' queries and keys are the same sequence)
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, v)


def segment_attention(query, key, value, attention_mask, layout: Layout, beta_anchor: float, scaling: float,
                      dropout: float = 0.0, softcap: float | None = None):
    """Hard-mode attention with block-sparse work (alpha_l = 1).

    Groups are (row r, block k) pairs present among the queries. Group (r, k >= 1) sees keys of block k, of block
    0 (unless ``layout.general_visible`` is False) and the sink; group (r, 0) sees every key; always within
    causality and the mask transformers gave. Each group's queries and visible keys are gathered into the batch
    dimension of an SDPA call (see :func:`_segment_plan`: causal groups run with ``is_causal=True`` and no mask
    tensor), and the outputs are gathered back to (B, T, H, D). The plan is computed once per forward call and
    shared by the layers; the gathers' backward passes are gathers too. A logit ``softcap`` (Gemma 2) is applied
    before the mask, as the model's own attention does (then each group runs as an explicit softmax instead of
    SDPA).
    """
    b, h, t, d = query.shape
    s = key.shape[2]
    if b * t == 0:
        return query.new_zeros(b, t, h, d), None
    plan = _PLANS.get("segment", layout, attention_mask, ("segment", b, t, s, beta_anchor, layout.general_visible),
                      lambda: _segment_plan(layout, attention_mask, beta_anchor, b, t, s))
    gqa = key.shape[1] != h
    outs = []
    for part in plan.parts:
        qg = _gather(query, part.q, part.groups, part.q_len)
        kg = _gather(key, part.k, part.groups, part.k_len)
        vg = _gather(value, part.k, part.groups, part.k_len)
        mask = part.mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        og = _group_attention(qg, kg, vg, mask, part.is_causal, scaling, dropout, gqa, softcap)  # (G, H, L, D)
        del qg, kg, vg  # without grad, free the gathered copies before the next part and the output gather
        outs.append(og.transpose(1, 2).reshape(part.groups * part.q_len, h, d))
    rows = outs[0] if len(outs) == 1 else torch.cat(outs)
    return _GatherRows.apply(rows, 0, plan.out).view(b, t, h, d), None
