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
from ..blocks.centroid import candidate_slots, centroid_block_ids, contextual_block_ids, is_contextual
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
        cfg = state.config
        if self.layer != cfg.first_local_layer or cfg.block_assignment != "centroid":
            return None
        call = call_from_kwargs(kwargs)
        if call is None:
            return None
        if is_contextual(cfg):
            return self._contextual(call, args, kwargs)
        if call.centroid_from is None:
            return None
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, E): the new positions of this call
        ids = centroid_block_ids(x.detach(), state.centroids, candidate_slots(state), cfg.assign_threshold)
        full = call.block_ids.clone()
        full[:, call.centroid_from:] = ids[:, ids.shape[1] - (full.shape[1] - call.centroid_from):]
        call.set_block_ids(full)
        return None

    def _contextual(self, call, args, kwargs):
        """Assignment from context: runs on every call (also one with given block ids), because the running state
        must advance over every position for the next call of a KV cache to continue it."""
        state, cfg = self.state, self.state.config
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, E): the new positions of this call
        total, new = call.block_ids.shape[1], x.shape[1]
        past = total - new
        prev = call.assign_state
        if past > 0 and (prev is None or prev.length != past):
            raise LocalistStateError(
                f"the KV cache holds {past} positions but no running state of the assignment from context "
                f"(assign_horizon={cfg.assign_horizon}, assign_min_run={cfg.assign_min_run}) for them (a cache filled "
                "before these settings, or cropped): run the whole sequence through the patched model from an empty "
                "cache"
            )
        start = total if call.centroid_from is None else call.centroid_from
        fixed = call.block_ids[:, past:].clone()  # (B, T): given ids before ``start``, -1 where assigned here
        fixed[:, max(start - past, 0):] = -1
        valid = call.query_valid[:, past:]
        ids, after = contextual_block_ids(x.detach(), valid, state.centroids, candidate_slots(state),
                                          cfg.assign_threshold, cfg.assign_horizon, cfg.assign_min_run,
                                          prev if past > 0 else None, fixed)
        call.assign_state = after
        if call.centroid_from is not None:
            full = call.block_ids.clone()
            full[:, past:] = ids
            call.set_block_ids(full)
        return None


def ensure_slots(state, hidden: int) -> None:
    if state.centroids is None or state.centroids.shape[1] != hidden:
        n = state.config.max_blocks + 1
        state.centroids = torch.zeros(n, hidden)
        state.block_enabled = torch.ones(n, dtype=torch.bool)


def activate_block(handle, slot: int, centroid: torch.Tensor | None = None, subspace: torch.Tensor | None = None,
                   enabled: bool = True, info: dict | None = None) -> None:
    """Make ``slot`` an active block: centroid (E,), optional per-layer subspace basis (L, E, r), metadata.

    Every argument is checked before anything changes: a refused call leaves the slots, the centroids and the
    config as they were (a wrong-size centroid used to reallocate the centroid buffer, wiping the other blocks).
    """
    cfg = handle.config
    state = handle.state
    if isinstance(slot, bool) or not isinstance(slot, int) or not 1 <= slot <= cfg.max_blocks:
        raise LocalistConfigError(f"activate_block: slot={slot!r} must be in 1..max_blocks={cfg.max_blocks}")
    active = cfg.active_block_list()
    if slot in active and slot in state.block_info:
        raise LocalistStateError(f"activate_block: slot {slot} is already active")
    if not isinstance(enabled, bool):
        raise LocalistConfigError(f"activate_block: enabled={enabled!r} must be True or False")
    if info is not None and not isinstance(info, dict):
        raise LocalistConfigError(f"activate_block: info must be a dict or None, got {type(info).__name__}")
    if centroid is not None:
        centroid = _checked_tensor("centroid", centroid, (_hidden_size(handle),))
    new_active = sorted(set(active) | {slot})
    if subspace is not None:
        stored = state.subspaces
        if stored is None:
            raise LocalistStateError("activate_block with a subspace needs calibrated subspaces for the active blocks")
        subspace = _checked_tensor("subspace", subspace, (stored.shape[0], stored.shape[2], stored.shape[3]))
    cfg.update(active_blocks=new_active)  # validated (e.g. against max_blocks) before any buffer changes
    if centroid is not None:
        ensure_slots(state, int(centroid.shape[-1]))
        state.centroids[slot] = centroid
        state.block_enabled[slot] = enabled
    if subspace is not None:
        bases = {s: stored[:, i] for i, s in enumerate(active)}
        bases[slot] = subspace
        state.subspaces = torch.stack([bases[s] for s in new_active], dim=1)
    state.block_info[slot] = dict(info or {})


def _hidden_size(handle) -> int | None:
    """The width of the features a centroid is compared with (the input of layer l0's attention)."""
    if handle.state.centroids is not None:
        return int(handle.state.centroids.shape[1])
    get_text = getattr(handle.base.config, "get_text_config", None)
    text = get_text() if callable(get_text) else handle.base.config
    size = getattr(text, "hidden_size", None)
    return size if isinstance(size, int) else None


def _checked_tensor(name: str, value, shape: tuple) -> torch.Tensor:
    """``value`` as a detached float32 CPU tensor of ``shape`` (None entries: any size) with finite entries."""
    if not torch.is_tensor(value) or not value.is_floating_point():
        raise LocalistConfigError(f"activate_block: {name} must be a floating-point tensor, got "
                                  f"{type(value).__name__} {getattr(value, 'dtype', '')}")
    if value.dim() != len(shape) or any(want is not None and got != want for got, want in zip(value.shape, shape)):
        want = tuple("any" if w is None else w for w in shape)
        raise LocalistConfigError(f"activate_block: {name} has shape {tuple(value.shape)}, but the model needs {want}"
                                  + (" (the model's hidden size)" if name == "centroid" else
                                     " (layers, hidden size, subspace rank of the calibrated subspaces)"))
    if not bool(torch.isfinite(value).all()):
        raise LocalistConfigError(f"activate_block: {name} holds NaN or infinite values")
    return value.detach().float().cpu()


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
