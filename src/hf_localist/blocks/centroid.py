"""Centroid block assignment (docs/design.md section 2): which enabled block's centroid a hidden state is nearest to.

In ``block_assignment='centroid'`` mode a position joins the enabled active block whose centroid is nearest (by
cosine similarity) to its hidden state at the input of layer ``l0 = first_local_layer`` (the input of that layer's
attention module, which is its Q projection's input), if the similarity is at least ``assign_threshold``;
otherwise it stays in block 0. The ids are computed during the forward by a pre-hook on that attention module
(:class:`hf_localist.patch.slots.CentroidAssignHook`), before any localised layer reads them (layers below ``l0`` are
never biased); the slot buffers live in :mod:`hf_localist.patch.slots` too.
"""

from __future__ import annotations

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
