"""Tensors of the localist state (calibrated subspaces, threshold lambdas) saved next to the model.

Settings live in ``localist_config.json`` / ``config.json``; tensors that cannot be derived from the settings
go to ``localist_state.safetensors`` (safetensors only: no pickle on load), written atomically. Block records
(recruitment) go to ``localist_blocks.json``: ``{"active_blocks", "subspace_rank", "blocks": {slot: record},
"recruitment_status"}``;
loading it restores those two config fields too, so a checkpoint brings back which slots are blocks.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import LocalistLoadError
from ..utils import atomic_write_text

STATE_FILE = "localist_state.safetensors"
_TENSORS = ("subspaces", "lambda_threshold", "centroids", "block_enabled")
_PER_LAYER = ("subspaces", "lambda_threshold")  # first dimension = attention layers
_PER_SLOT = ("centroids", "block_enabled")  # first dimension = max_blocks + 1
BLOCKS_FILE = "localist_blocks.json"


def save_localist_state(handle, directory: str) -> str | None:
    """Write the state tensors of ``handle`` into ``directory``; returns the path, or None when there are none."""
    tensors = {name: getattr(handle.state, name).detach().cpu().contiguous()
               for name in _TENSORS if getattr(handle.state, name, None) is not None}
    if "block_enabled" in tensors:
        tensors["block_enabled"] = tensors["block_enabled"].to(torch.uint8)  # safetensors stores bool, but be explicit
    cfg = handle.config
    if handle.state.block_info or getattr(cfg, "recruitment", None) is not None or handle.state.recruitment_status:
        # Which slots are blocks is part of the model: a checkpoint resumed into a freshly built config gets them back.
        record = {"active_blocks": cfg.active_blocks, "subspace_rank": cfg.subspace_rank,
                  "blocks": {str(k): v for k, v in handle.state.block_info.items()},
                  "recruitment_status": handle.state.recruitment_status}
        atomic_write_text(os.path.join(directory, BLOCKS_FILE), json.dumps(record, indent=2, default=float))
    if not tensors:
        return None
    path = os.path.join(directory, STATE_FILE)
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return path


def load_localist_state(handle, directory: str) -> bool:
    """Load state tensors and block records from ``directory`` into ``handle`` where their files exist; returns
    whether it loaded anything."""
    loaded = _load_tensors(handle, os.path.join(os.fspath(directory), STATE_FILE))
    return _load_block_records(handle, directory) or loaded


def _load_tensors(handle, path: str) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LocalistLoadError(f"{path!r} is not a readable safetensors file ({e}): re-save the model") from e
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise LocalistLoadError(f"{path!r} holds unknown tensors {unknown}; expected a subset of {list(_TENSORS)}")
    n_layers = len(handle.attention_modules)
    n_slots = handle.config.max_blocks + 1
    for name, value in tensors.items():
        expected, what = ((n_layers, "attention layers") if name in _PER_LAYER
                          else (n_slots, "block slots (max_blocks + 1)"))
        if value.dim() < 1 or value.shape[0] != expected:
            raise LocalistLoadError(
                f"{path!r}: {name} has shape {tuple(value.shape)} but the model has {expected} {what}"
            )
        setattr(handle.state, name, value.bool() if name == "block_enabled" else value.to(torch.float32))
    return True


def _load_block_records(handle, directory: str) -> bool:
    blocks_path = os.path.join(os.fspath(directory), BLOCKS_FILE)
    if os.path.isfile(blocks_path):
        try:
            with open(blocks_path, encoding="utf-8") as fh:
                record = json.load(fh)
            if "blocks" not in record:  # older files: {slot: info}
                record = {"blocks": record}
            handle.state.block_info = {int(k): v for k, v in record["blocks"].items()}
            status = record.get("recruitment_status")
            if status is not None and not isinstance(status, dict):
                raise TypeError(f"recruitment_status must be an object, got {type(status).__name__}")
            handle.state.recruitment_status = status
            restored = {k: record[k] for k in ("active_blocks", "subspace_rank") if k in record}
        except (ValueError, OSError, AttributeError, TypeError) as e:
            raise LocalistLoadError(f"{blocks_path!r} is corrupt ({e}): re-save the model") from e
        if restored:
            handle.config.update(**restored)
        return True
    return False
