"""Tensors of the localist state (calibrated subspaces, threshold lambdas) saved next to the model.

Settings live in ``localist_config.json`` / ``config.json``; tensors that cannot be derived from the settings
go to ``localist_state.safetensors`` (safetensors only: no pickle on load), written atomically. Block records
(recruitment) go to ``localist_blocks.json``: ``{"active_blocks", "subspace_rank", "blocks": {slot: record},
"recruitment_status"}``;
loading it restores those two config fields too, so a checkpoint brings back which slots are blocks.

:func:`save_localist_state` / :func:`load_localist_state` are public (``hf_localist.save_localist_state``): they take
a model (also a peft or DDP wrapper) or its handle, e.g. to add the localist files to an adapter directory written by
plain peft. Model and adapter saves call :func:`write_localist_files` on their staging directory instead.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config.localist import LOCALIST_CONFIG_NAME
from ..errors import LocalistLoadError, LocalistStateError
from ..savedir import update_manifest
from ..utils import atomic_write_text

STATE_FILE = "localist_state.safetensors"
_TENSORS = ("subspaces", "lambda_threshold", "centroids", "block_enabled")
_PER_LAYER = ("subspaces", "lambda_threshold")  # first dimension = attention layers
_PER_SLOT = ("centroids", "block_enabled")  # first dimension = max_blocks + 1
BLOCKS_FILE = "localist_blocks.json"
#: Every file the localist side of a save writes (settings, state tensors, block records).
LOCALIST_FILES = (LOCALIST_CONFIG_NAME, STATE_FILE, BLOCKS_FILE)


def handle_of(model_or_handle):
    """The ``LocalistHandle`` of a handle or of a (possibly peft-, DDP- or accelerate-wrapped) localist model."""
    seen = model_or_handle
    for _ in range(5):
        if hasattr(seen, "state") and hasattr(seen, "attention_modules"):  # a LocalistHandle (duck-typed: no cycle)
            if not seen.active:
                raise LocalistStateError("this LocalistHandle was reverted: call apply_localist again to re-patch")
            return seen
        handle = getattr(seen, "localist_handle", None)
        if handle is not None and hasattr(handle, "state"):
            seen = handle
        elif callable(getattr(seen, "get_base_model", None)):
            seen = seen.get_base_model()
        elif getattr(seen, "module", None) is not None:
            seen = seen.module
        else:
            break
    raise LocalistStateError(
        f"{type(model_or_handle).__name__} is not localist: pass a model patched with hf_localist.apply_localist "
        "(or a peft model around one), or its LocalistHandle")


def save_localist_state(model_or_handle, directory: str | os.PathLike) -> str | None:
    """Write the localist files of a localist model (or its handle) into ``directory``: ``localist_config.json``,
    the state tensors (``localist_state.safetensors``: calibrated subspaces, threshold lambdas, centroids) and the
    block records (``localist_blocks.json``) where there are any. Each file is replaced atomically; a state file or
    block record of an earlier save that the model no longer has is removed; a directory saved by hf_localist gets
    its manifest updated, so it still verifies. Returns the path of the state tensors file, or None when the model
    has none."""
    handle = handle_of(model_or_handle)
    directory = os.fspath(directory)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise LocalistLoadError(f"save_localist_state: {directory!r} is not a directory: pass a directory (it is "
                                "created when missing)")
    path = write_localist_files(handle, directory)
    stale = ([STATE_FILE] if path is None else []) + ([] if _has_block_record(handle) else [BLOCKS_FILE])
    removed = [n for n in stale if os.path.lexists(os.path.join(directory, n))]
    for name in removed:
        os.unlink(os.path.join(directory, name))
    written = [n for n in LOCALIST_FILES if n not in stale]
    update_manifest(directory, written, removed)
    return path


def load_localist_state(model_or_handle, directory: str | os.PathLike) -> bool:
    """Load the state tensors and block records in ``directory`` into a localist model (or its handle), where
    their files exist; returns whether it loaded anything. The settings (``localist_config.json``) are not read:
    ``apply_localist(model, LocalistConfig.from_pretrained(directory))`` applies them. A file that is corrupt or does
    not fit the model raises ``LocalistLoadError`` and changes nothing."""
    handle = handle_of(model_or_handle)
    directory = os.fspath(directory)
    path = os.path.join(directory, STATE_FILE)
    expected = _expected_tensors(os.path.join(directory, BLOCKS_FILE))
    loaded = _load_tensors(handle, path, expected)
    return _load_block_records(handle, directory) or loaded


def write_localist_files(handle, directory: str) -> str | None:
    """``localist_config.json``, the state tensors and the block records of ``handle`` into ``directory`` (a save's
    staging directory); returns the path of the state tensors file, or None when there are none."""
    handle.config.save_pretrained(directory)
    return _write_state(handle, directory)


def _has_block_record(handle) -> bool:
    return bool(handle.state.block_info or getattr(handle.config, "recruitment", None) is not None
                or handle.state.recruitment_status)


def _write_state(handle, directory: str) -> str | None:
    """Write the state tensors of ``handle`` into ``directory``; returns the path, or None when there are none."""
    tensors = {name: getattr(handle.state, name).detach().cpu().contiguous()
               for name in _TENSORS if getattr(handle.state, name, None) is not None}
    if "block_enabled" in tensors:
        tensors["block_enabled"] = tensors["block_enabled"].to(torch.uint8)  # safetensors stores bool, but be explicit
    cfg = handle.config
    if _has_block_record(handle):
        # Which slots are blocks is part of the model: a checkpoint resumed into a freshly built config gets them back.
        # state_tensors: which tensors the state file holds, so that a load notices a missing or truncated one
        # (blocks without their centroids would load silently and never take a token).
        record = {"active_blocks": cfg.active_blocks, "subspace_rank": cfg.subspace_rank,
                  "blocks": {str(k): v for k, v in handle.state.block_info.items()},
                  "recruitment_status": handle.state.recruitment_status, "state_tensors": sorted(tensors)}
        atomic_write_text(os.path.join(directory, BLOCKS_FILE), json.dumps(record, indent=2, default=float))
    if not tensors:
        return None
    path = os.path.join(directory, STATE_FILE)
    tmp = path + ".tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return path


def _expected_tensors(blocks_path: str) -> list[str]:
    """The tensors the block record says the state file holds ([] for records written before it said so)."""
    if not os.path.isfile(blocks_path):
        return []
    record = _read_record(blocks_path)
    names = record.get("state_tensors", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LocalistLoadError(f"{blocks_path!r} is corrupt (state_tensors={names!r}): re-save the model")
    return names


def _load_tensors(handle, path: str, expected: list[str]) -> bool:
    if not os.path.isfile(path):
        if os.path.lexists(path):
            raise LocalistLoadError(f"{path!r} is not a regular file: remove it, or re-save the model")
        if expected:
            raise LocalistLoadError(
                f"{path!r} is missing, but {BLOCKS_FILE} says the checkpoint has state tensors {expected} (block "
                "centroids, subspaces): restore the file, or re-save the model")
        return False
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise LocalistLoadError(f"{path!r} is not a readable safetensors file ({e}): re-save the model") from e
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise LocalistLoadError(f"{path!r} lacks the tensors {missing} that {BLOCKS_FILE} lists: re-save the model")
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise LocalistLoadError(f"{path!r} holds unknown tensors {unknown}; expected a subset of {list(_TENSORS)}")
    n_layers = len(handle.attention_modules)
    n_slots = handle.config.max_blocks + 1
    for name, value in tensors.items():
        size, what = ((n_layers, "attention layers") if name in _PER_LAYER
                      else (n_slots, "block slots (max_blocks + 1)"))
        if value.dim() < 1 or value.shape[0] != size:
            raise LocalistLoadError(
                f"{path!r}: {name} has shape {tuple(value.shape)} but the model has {size} {what}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise LocalistLoadError(f"{path!r}: {name} holds NaN or infinite values: the file is corrupt; re-save "
                                    "the model from a state without them")
    for name, value in tensors.items():  # only once every tensor is checked: a refused file changes nothing
        setattr(handle.state, name, value.bool() if name == "block_enabled" else value.to(torch.float32))
    return True


def _load_block_records(handle, directory: str) -> bool:
    blocks_path = os.path.join(os.fspath(directory), BLOCKS_FILE)
    if os.path.lexists(blocks_path):
        record = _read_record(blocks_path)
        try:
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


def _read_record(path: str) -> dict:
    """The JSON object in ``path``, or a ``LocalistLoadError`` naming the file (also for a directory, a file nested
    too deeply to parse, or anything but an object)."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (ValueError, OSError, RecursionError) as e:
        raise LocalistLoadError(f"{path!r} is corrupt or unreadable ({type(e).__name__}: {e}): re-save the model") \
            from None
    if not isinstance(record, dict):
        raise LocalistLoadError(f"{path!r} is corrupt (a JSON {type(record).__name__}, not an object): re-save the "
                                "model")
    return record
