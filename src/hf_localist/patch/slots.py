"""Block slots and the centroid-assignment pre-hook of a patched model.

Slots: ``state.centroids`` (max_blocks + 1, E) and ``state.block_enabled`` (max_blocks + 1,) are buffers of fixed
shape: recruiting a block writes into them and adds the slot to ``config.active_blocks``; no parameter changes
shape. A block activated with ``enabled=False`` takes no token, so the model's outputs are unchanged until it is
enabled.

:class:`CentroidAssignHook` runs :func:`~hf_localist.blocks.centroid.centroid_block_ids` at layer ``l0`` during a
forward, on the layout of the call it receives in its keyword arguments.
"""

from __future__ import annotations

import torch

from ..attention.call import call_from_kwargs
from ..blocks.centroid import candidate_slots, centroid_block_ids
from ..errors import LocalistConfigError, LocalistStateError


class CentroidAssignHook:
    """Forward pre-hook (with kwargs) of layer ``layer``'s attention: fills the block ids of the call's new positions.

    A class, not a closure, so that a patched model can be deep-copied and pickled.
    """

    def __init__(self, state, layer: int):
        self.state = state
        self.layer = layer

    def __call__(self, _module, args, kwargs):
        state = self.state
        if self.layer != state.config.first_local_layer or state.config.block_assignment != "centroid":
            return None
        call = call_from_kwargs(kwargs)
        if call is None or call.centroid_from is None:
            return None
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, E): the new positions of this call
        ids = centroid_block_ids(x.detach(), state.centroids, candidate_slots(state), state.config.assign_threshold)
        full = call.block_ids.clone()
        full[:, call.centroid_from:] = ids[:, ids.shape[1] - (full.shape[1] - call.centroid_from):]
        call.set_block_ids(full)
        return None


def ensure_slots(state, hidden: int) -> None:
    if state.centroids is None or state.centroids.shape[1] != hidden:
        n = state.config.max_blocks + 1
        state.centroids = torch.zeros(n, hidden)
        state.block_enabled = torch.ones(n, dtype=torch.bool)


def activate_block(handle, slot: int, centroid: torch.Tensor | None = None, subspace: torch.Tensor | None = None,
                   enabled: bool = True, info: dict | None = None) -> None:
    """Make ``slot`` an active block: centroid (E,), optional per-layer subspace basis (L, E, r), metadata."""
    cfg = handle.config
    state = handle.state
    if not isinstance(slot, int) or not 1 <= slot <= cfg.max_blocks:
        raise LocalistConfigError(f"activate_block: slot={slot!r} must be in 1..max_blocks={cfg.max_blocks}")
    active = cfg.active_block_list()
    if slot in active and slot in state.block_info:
        raise LocalistStateError(f"activate_block: slot {slot} is already active")
    if centroid is not None:
        ensure_slots(state, int(centroid.shape[-1]))
        state.centroids[slot] = centroid.detach().float().cpu()
        state.block_enabled[slot] = bool(enabled)
    new_active = sorted(set(active) | {slot})
    if subspace is not None:
        stored = state.subspaces
        if stored is None:
            raise LocalistStateError("activate_block with a subspace needs calibrated subspaces for the active blocks")
        bases = {s: stored[:, i] for i, s in enumerate(active)}
        bases[slot] = subspace.float()
        state.subspaces = torch.stack([bases[s] for s in new_active], dim=1)
    cfg.update(active_blocks=new_active)
    state.block_info[slot] = dict(info or {})


def set_block_enabled(handle, slot: int, enabled: bool) -> None:
    state = handle.state
    if state.block_enabled is None or slot not in handle.config.active_block_list():
        raise LocalistStateError(f"slot {slot} is not an active block with a centroid")
    state.block_enabled[slot] = bool(enabled)


def describe_blocks(handle) -> list[dict]:
    """Active blocks with their centroid, anchors, name, size and recruitment record."""
    cfg = handle.config
    state = handle.state
    out = []
    for slot in cfg.active_block_list():
        row = {"slot": slot, "name": cfg.block_names[slot - 1] if slot - 1 < len(cfg.block_names) else None,
               "anchor_token_id": cfg.anchor_token_ids[slot - 1] if slot - 1 < len(cfg.anchor_token_ids) else None}
        if state.centroids is not None:
            row["centroid"] = state.centroids[slot].clone()
            row["enabled"] = bool(state.block_enabled[slot])
        row.update(state.block_info.get(slot, {}))
        out.append(row)
    return out
