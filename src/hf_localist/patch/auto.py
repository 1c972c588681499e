"""``AutoLocalistModel``: load a model saved after ``apply_localist``, or a peft adapter of one, with its localist
state."""

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
from .adapters import ADAPTER_CONFIG_NAME, is_adapter_directory, is_peft_model
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

    A peft adapter directory (``adapter_config.json``, no model weights) saved from a localist model loads its base
    model (``base_model=``, else the adapter config's ``base_model_name_or_path``), applies the saved localist
    settings, loads the adapter with ``peft.PeftModel.from_pretrained`` and then the localist state; it returns the
    ``PeftModel``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise EnvironmentError("AutoLocalistModel is not instantiated: use AutoLocalistModel.from_pretrained(path)")

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *model_args: Any,
                        localist_config: LocalistConfig | None = None, model_class: Any = None,
                        base_model: Any = None, is_trainable: bool = False, **kwargs: Any):
        path_or_id = os.fspath(path_or_id)
        if base_model is not None or (os.path.isdir(path_or_id) and is_adapter_directory(path_or_id)):
            return _load_adapter(path_or_id, base_model, localist_config, model_class, is_trainable, model_args,
                                 kwargs)
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
        model = _load_weights(path_or_id, model_config, model_class, model_args, kwargs)
        handle = apply_localist(model, localist_config)
        if os.path.isdir(path_or_id):
            load_localist_state(handle, path_or_id)
        return model


def _load_weights(path_or_id: str, model_config: Any, model_class: Any, model_args: tuple, kwargs: dict):
    """The transformers model at ``path_or_id``: ``model_class``, else the class its config's ``architectures``
    names, else ``AutoModelForCausalLM``."""
    if model_class is None:
        names = getattr(model_config, "architectures", None) or []
        model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)),
                           AutoModelForCausalLM)
    try:
        return model_class.from_pretrained(path_or_id, *model_args, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        if isinstance(e, LocalistLoadError):
            raise
        raise LocalistLoadError(f"cannot load the model weights at {failing_weights_file(path_or_id)} "
                                f"({type(e).__name__}: {e}): the checkpoint is corrupt or incomplete; save it "
                                "again") from e


# ---------------------------------------------------------------------- peft adapters of a localist model
def _load_adapter(path: str, base_model: Any, localist_config: LocalistConfig | None, model_class: Any,
                  is_trainable: bool, model_args: tuple, kwargs: dict):
    """See ``AutoLocalistModel``: base model + saved localist settings + adapter (peft) + localist state."""
    from peft import PeftModel

    adapter_config_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    if not os.path.isdir(path) or not os.path.isfile(adapter_config_path):
        raise LocalistLoadError(
            f"AutoLocalistModel.from_pretrained({path!r}, base_model=...): {path!r} is not a local adapter directory "
            f"(no {ADAPTER_CONFIG_NAME}); base_model= is for loading a peft adapter saved from a localist model "
            "(download a Hub adapter first: huggingface_hub.snapshot_download(repo_id))")
    verify_directory(path)  # a save killed half-way, or files changed since, is refused naming the file
    adapter_config = _read_adapter_config(adapter_config_path)
    if localist_config is None:
        if not os.path.isfile(os.path.join(path, LOCALIST_CONFIG_NAME)):
            raise LocalistLoadError(
                f"{path!r} is a peft adapter without {LOCALIST_CONFIG_NAME}: it was saved by plain peft, from a "
                "wrapper the localist patch did not see. Add the localist files from the trained model "
                "(hf_localist.save_localist_state(model, directory)), or pass localist_config=")
        localist_config = LocalistConfig.from_pretrained(path)
    base = _base_model(path, adapter_config_path, adapter_config, base_model, model_class, model_args, kwargs)
    try:
        model = PeftModel.from_pretrained(base, path, is_trainable=is_trainable)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise LocalistLoadError(
            f"peft cannot load the adapter at {path!r} onto the base model ({type(e).__name__}: {e}): is it the "
            "base model the adapter was trained on? Pass that one with base_model=") from e
    handle = apply_localist(model, localist_config)  # also gives the PeftModel the localist save_pretrained
    load_localist_state(handle, path)
    return model


def _read_adapter_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError) as e:
        raise LocalistLoadError(f"{path!r} is not a readable adapter config ({type(e).__name__}: {e}): save the "
                                "adapter again") from None
    if not isinstance(data, dict):
        raise LocalistLoadError(f"{path!r} is corrupt (a JSON {type(data).__name__}, not an object): save the "
                                "adapter again")
    return data


def _base_model(path: str, adapter_config_path: str, adapter_config: dict, base_model: Any, model_class: Any,
                model_args: tuple, kwargs: dict):
    """The (unpatched) base model of the adapter at ``path``: ``base_model`` (a loaded model, a directory or a Hub
    id), else the adapter config's ``base_model_name_or_path``."""
    if base_model is not None and not isinstance(base_model, (str, os.PathLike)):
        if is_peft_model(base_model) or getattr(base_model, "localist_handle", None) is not None:
            raise LocalistLoadError(
                f"base_model= must be the plain transformers model the adapter at {path!r} was trained on; got "
                f"{'a peft model' if is_peft_model(base_model) else 'a localist model'}: pass the model before "
                "get_peft_model / apply_localist (or model.localist_handle.revert())")
        if not hasattr(base_model, "config"):
            raise LocalistLoadError(f"base_model= must be a transformers model, a directory or a Hub id; got "
                                    f"{type(base_model).__name__}")
        return base_model
    if base_model is None:
        name = adapter_config.get("base_model_name_or_path")
        where = f"the base_model_name_or_path of {adapter_config_path!r}"
        if not isinstance(name, str) or not name:
            raise LocalistLoadError(
                f"{adapter_config_path!r} names no base model (base_model_name_or_path={name!r}): pass it with "
                f"AutoLocalistModel.from_pretrained({path!r}, base_model=<directory, Hub id or loaded model>)")
    else:
        name, where = os.fspath(base_model), "base_model="
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        if os.path.isdir(name):
            verify_directory(name)
        model_config = AutoConfig.from_pretrained(name, **hub)
        return _load_weights(name, model_config, model_class, model_args, kwargs)
    except (OSError, ValueError, RecursionError) as e:  # LocalistLoadError is an OSError
        raise LocalistLoadError(
            f"cannot load the base model {name!r} ({where}) of the adapter at {path!r}: {e}. Pass the base model "
            f"with AutoLocalistModel.from_pretrained({path!r}, base_model=<directory, Hub id or loaded model>)"
        ) from e


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
