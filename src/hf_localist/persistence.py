"""Tensors of the localist state (calibrated subspaces, threshold lambdas) saved next to the model.

Settings live in ``localist_config.json`` / ``config.json``; tensors that cannot be derived from the settings
go to ``localist_state.safetensors`` (safetensors only: no pickle on load), written atomically.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LocalistLoadError

STATE_FILE = "localist_state.safetensors"
_TENSORS = ("subspaces", "lambda_threshold")


def save_localist_state(handle, directory: str) -> str | None:
    """Write the state tensors of ``handle`` into ``directory``; returns the path, or None when there are none."""
    tensors = {name: getattr(handle.state, name).detach().cpu().contiguous()
               for name in _TENSORS if getattr(handle.state, name, None) is not None}
    if not tensors:
        return None
    path = os.path.join(directory, STATE_FILE)
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return path


def load_localist_state(handle, directory: str) -> bool:
    """Load state tensors from ``directory`` into ``handle`` if the file exists; returns whether it did."""
    path = os.path.join(os.fspath(directory), STATE_FILE)
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
    for name, value in tensors.items():
        if value.dim() < 1 or value.shape[0] != n_layers:
            raise LocalistLoadError(
                f"{path!r}: {name} has shape {tuple(value.shape)} but the model has {n_layers} attention layers"
            )
        setattr(handle.state, name, value.to(torch.float32))
    return True
