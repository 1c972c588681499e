"""``AutoLocalistModel``: load a model saved after ``apply_localist`` with its localist state."""

from __future__ import annotations

import json
import os
from typing import Any

import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from ..config.localist import LOCALIST_CONFIG_NAME, MODEL_CONFIG_KEY, LocalistConfig
from ..errors import LocalistLoadError
from ..savedir import verify_directory
from .apply import apply_localist
from .persistence import load_localist_state

_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code")


def has_localist_state(path: str | os.PathLike) -> bool:
    """Whether the local model directory ``path`` was saved after ``apply_localist`` (it carries localist settings)."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, LOCALIST_CONFIG_NAME)):
        return True
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return isinstance(json.load(fh).get(MODEL_CONFIG_KEY), dict)
    except (OSError, ValueError, AttributeError):
        return False


class AutoLocalistModel:
    """Like transformers' Auto classes, for localist models.

    ``AutoLocalistModel.from_pretrained(path)`` reads ``config.json``, picks the model class from its
    ``architectures`` entry (``AutoModelForCausalLM`` when absent), loads the weights and re-applies the saved
    localist settings. The handle is at ``model.localist_handle``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError("AutoLocalistModel is not instantiated: use AutoLocalistModel.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *model_args: Any,
                        localist_config: LocalistConfig | None = None, model_class: Any = None, **kwargs: Any):
        path_or_id = os.fspath(path_or_id)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        if os.path.isdir(path_or_id):
            # Before anything is read: a directory a save was killed in, or whose files were changed or removed
            # since, is refused naming the file (savedir.py), instead of loading a mix of two saves.
            verify_directory(path_or_id)
        try:
            model_config = AutoConfig.from_pretrained(path_or_id, **hub)
        except (OSError, ValueError, RecursionError) as e:
            raise LocalistLoadError(f"cannot read the model config at {path_or_id!r}: {e}") from e
        if localist_config is None:
            if not isinstance(getattr(model_config, MODEL_CONFIG_KEY, None), dict) and not (
                os.path.isdir(path_or_id) and os.path.isfile(os.path.join(path_or_id, LOCALIST_CONFIG_NAME))
            ):
                raise LocalistLoadError(
                    f"{path_or_id!r} holds no localist state (neither {LOCALIST_CONFIG_NAME} nor a 'localist' entry in "
                    "config.json): load it with transformers and call hf_localist.apply_localist(model, config)"
                )
            localist_config = LocalistConfig.from_pretrained(path_or_id, **{k: v for k, v in hub.items()
                                                                            if k != "trust_remote_code"})
        if model_class is None:
            names = getattr(model_config, "architectures", None) or []
            model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)),
                               AutoModelForCausalLM)
        try:
            model = model_class.from_pretrained(path_or_id, *model_args, **kwargs)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            if isinstance(e, LocalistLoadError):
                raise
            raise LocalistLoadError(f"cannot load the model weights at {failing_weights_file(path_or_id)} "
                                    f"({type(e).__name__}: {e}): the checkpoint is corrupt or incomplete; save it "
                                    "again") from e
        handle = apply_localist(model, localist_config)
        if os.path.isdir(path_or_id):
            load_localist_state(handle, path_or_id)
        return model


def failing_weights_file(path: str) -> str:
    """The weight file of a failed load, for the message: the first local safetensors file whose header cannot be
    read, else the directory (or Hub id)."""
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.endswith(".safetensors") and os.path.isfile(full):
                try:
                    with safe_open(full, "pt"):
                        pass
                except (SafetensorError, OSError, ValueError, RuntimeError):
                    return repr(full)
    return repr(path)
