"""Centroid block assignment (docs/design.md section 2): which enabled block's centroid a position's features are
nearest to.

In ``block_assignment='centroid'`` mode a position joins the enabled active block whose centroid is nearest (by
cosine similarity) to its *assignment features*, if the similarity is at least ``assign_threshold``; otherwise it
stays in block 0. The features are read at the input of layer ``l0 = first_local_layer`` (the input of that layer's
attention module, which is its Q projection's input). The ids are computed during the forward by a pre-hook on that
attention module (:class:`hf_localist.patch.slots.CentroidAssignHook`), before any localised layer reads them
(layers below ``l0`` are never biased); the slot buffers live in :mod:`hf_localist.patch.slots` too.

Assignment from context (``assign_horizon`` > 1, ``assign_min_run`` > 1):

- **features**: with ``assign_horizon = h > 1`` the features of position ``t`` are a causal, exponentially weighted
  running mean of the unit-normalised states, ``f_t = d f_{t-1} + (1 - d) x_t / |x_t|`` with ``d = 1 - 1/h``
  (padding positions leave it unchanged), so a position is assigned by what the segment so far is about, not by
  its own token alone. ``h = 1`` is the plain per-position state (the default).
- **continuity**: with ``assign_min_run = m > 1`` a position's block changes only after ``m`` consecutive positions
  whose nearest block (from the features) is the same new block; until then positions stay in the current block.

Both are causal: position ``t`` depends on positions ``<= t`` only. Their running state (:class:`AssignState`, per
batch row) is what a KV cache carries from call to call (:mod:`hf_localist.patch.cache`), so incremental decoding
assigns exactly as the full forward does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch


def centroid_block_ids(x: torch.Tensor, centroids: torch.Tensor, candidates: torch.Tensor,
                       threshold: float) -> torch.Tensor:
    """(B, T, E) hidden states -> (B, T) block ids among ``candidates`` (slots), 0 below ``threshold``."""
    if candidates.numel() == 0:
        return torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    c = torch.nn.functional.normalize(centroids[candidates].to(x.device, torch.float32), dim=-1)  # (n, E)
    sims = torch.nn.functional.normalize(x.float(), dim=-1) @ c.T  # (B, T, n)
    best, idx = sims.max(dim=-1)
    ids = candidates.to(x.device)[idx]
    return torch.where(best >= threshold, ids, torch.zeros_like(ids))


def candidate_slots(state) -> torch.Tensor:
    """Active, enabled slots that have a centroid."""
    active = [s for s in state.config.active_block_list() if s <= state.config.max_blocks]
    if state.centroids is None or not active:
        return torch.zeros(0, dtype=torch.long)
    slots = torch.tensor(active, dtype=torch.long)
    ok = state.block_enabled[slots] & (state.centroids[slots].norm(dim=-1) > 0)
    return slots[ok]


def is_contextual(config) -> bool:
    """Whether assignment keeps a running state (``assign_horizon > 1`` or ``assign_min_run > 1``)."""
    return config.block_assignment == "centroid" and (config.assign_horizon > 1 or config.assign_min_run > 1)


@dataclass
class AssignState:
    """The running state of contextual assignment after ``length`` positions, per batch row.

    ``ema`` (B, E) float32: the running mean of the unit states (``assign_horizon > 1``, else None). ``current``,
    ``candidate``, ``count`` (B,) long: the block in force, the block that is challenging it (-1: none) and for how
    many consecutive positions (``assign_min_run > 1``, else None).
    """

    length: int
    ema: torch.Tensor | None = None
    current: torch.Tensor | None = None
    candidate: torch.Tensor | None = None
    count: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> AssignState:
        """The state with ``fn`` applied to every per-row tensor (a cache's reorder / repeat / select of rows)."""
        return replace(self, **{k: None if getattr(self, k) is None else fn(getattr(self, k))
                                for k in ("ema", "current", "candidate", "count")})


def context_features(x: torch.Tensor, valid: torch.Tensor, horizon: float,
                     ema: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T, E) states, (B, T) bool validity -> ((B, T, E) assignment features, (B, E) running mean after T).

    ``horizon == 1``: the states themselves (no running mean). Otherwise the causal running mean of the unit states
    (module docstring), continued from ``ema`` (zeros when None); padding positions (``valid`` False) leave it
    unchanged, so left padding never leaks into it. Cosine similarity ignores the scale of ``f_t``, so no bias
    correction of the early positions is needed.
    """
    if horizon <= 1:
        return x, None
    b, t, e = x.shape
    decay = 1.0 - 1.0 / float(horizon)
    u = torch.nn.functional.normalize(x.detach().float(), dim=-1)  # (B, T, E)
    run = torch.zeros(b, e, dtype=torch.float32, device=x.device) if ema is None else ema.to(x.device, torch.float32)
    ok = valid.to(x.device)[:, :, None]  # (B, T, 1)
    feats = torch.empty(b, t, e, dtype=torch.float32, device=x.device)
    for i in range(t):  # a scan: each step depends on the previous one (exactly as the incremental path runs it)
        run = torch.where(ok[:, i], decay * run + (1.0 - decay) * u[:, i], run)
        feats[:, i] = run
    return feats, run


def hold_runs(raw: torch.Tensor, valid: torch.Tensor, fixed: torch.Tensor | None, min_run: int,
              current: torch.Tensor | None = None, candidate: torch.Tensor | None = None,
              count: torch.Tensor | None = None):
    """Continuity: (B, T) nearest blocks -> (B, T) assigned blocks, a switch only after ``min_run`` positions in a row.

    ``fixed`` (B, T): block ids given for some positions (>= 0; -1 where assigned here), which set the block in
    force. Padding positions leave the state unchanged. Returns ``(ids, current, candidate, count)``.
    """
    b, t = raw.shape
    dev = raw.device
    cur = torch.zeros(b, dtype=torch.long, device=dev) if current is None else current.to(dev)
    cand = torch.full((b,), -1, dtype=torch.long, device=dev) if candidate is None else candidate.to(dev)
    cnt = torch.zeros(b, dtype=torch.long, device=dev) if count is None else count.to(dev)
    out = torch.empty_like(raw)
    valid = valid.to(dev)
    for i in range(t):
        r, v = raw[:, i], valid[:, i]
        same = r == cur
        n = torch.where(same, torch.zeros_like(cnt), torch.where(r == cand, cnt + 1, torch.ones_like(cnt)))
        c = torch.where(same, torch.full_like(cand, -1), r)
        switch = ~same & (n >= min_run)
        new_cur = torch.where(switch, r, cur)
        n = torch.where(switch, torch.zeros_like(n), n)
        c = torch.where(switch, torch.full_like(c, -1), c)
        if fixed is not None:
            f = fixed[:, i].to(dev)
            given = f >= 0
            new_cur = torch.where(given, f, new_cur)
            n = torch.where(given, torch.zeros_like(n), n)
            c = torch.where(given, torch.full_like(c, -1), c)
        cur = torch.where(v, new_cur, cur)
        cnt = torch.where(v, n, cnt)
        cand = torch.where(v, c, cand)
        out[:, i] = torch.where(v, cur, r)
    return out, cur, cand, cnt


def contextual_block_ids(x: torch.Tensor, valid: torch.Tensor, centroids: torch.Tensor, candidates: torch.Tensor,
                         threshold: float, horizon: float, min_run: int, state: AssignState | None,
                         fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, AssignState]:
    """Contextual assignment of T new positions: (B, T) block ids and the running state after them.

    ``x`` (B, T, E) states at the input of layer l0; ``valid`` (B, T) not padding; ``state`` the running state
    after the earlier (cached) positions, or None at the start of the sequences; ``fixed`` (B, T) block ids given
    for some positions (-1 elsewhere): they are kept, and set the block in force for the continuity rule.
    """
    past = 0 if state is None else state.length
    feats, ema = context_features(x, valid, horizon, None if state is None else state.ema)
    raw = centroid_block_ids(feats, centroids, candidates, threshold)  # (B, T)
    if min_run > 1:
        ids, cur, cand, cnt = hold_runs(raw, valid, fixed, min_run, *(
            (None, None, None) if state is None else (state.current, state.candidate, state.count)))
    else:
        ids, cur, cand, cnt = raw, None, None, None
    if fixed is not None:
        ids = torch.where(fixed >= 0, fixed.to(ids.device), ids)
    return ids, AssignState(length=past + x.shape[1], ema=ema, current=cur, candidate=cand, count=cnt)
