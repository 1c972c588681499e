"""Loading a model directory for ``apply`` / ``inspect``, and one command-line flag per scalar LocalistConfig field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Sequence

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..config import localist as cfg_module
from ..config.localist import LOCALIST_CONFIG_NAME, MODEL_CONFIG_KEY, LocalistConfig
from ..errors import LocalistError, LocalistLoadError
from ..patch.apply import apply_localist
from ..patch.auto import AutoLocalistModel, failing_weights_file

#: LocalistConfig fields that ``apply`` / ``inspect`` do not expose as flags (lists, nested configs, and the fields
#: apply_localist fills in itself).
_SKIPPED_FIELDS = ("block_names", "anchor_token_ids", "general_token_id", "recruitment", "active_blocks",
                   "model_type", "num_layers")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_localist_config_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One ``--FIELD`` flag per scalar :class:`LocalistConfig` field, its help from the field's metadata.

    Flags default to "not given" (the namespace lacks the attribute), so that only what the user typed overrides
    the config; the help shows the LocalistConfig default.
    """

    choices = {"schedule": cfg_module.SCHEDULES, "backend": cfg_module.BACKENDS,
               "block_assignment": cfg_module.BLOCK_ASSIGNMENTS, "penalty": cfg_module.PENALTIES,
               "lambda_mode": cfg_module.LAMBDA_MODES, "subspace": cfg_module.SUBSPACES}
    group = parser.add_argument_group("LocalistConfig fields (see LocalistConfig for details)")
    hints = typing.get_type_hints(cfg_module.LocalistConfig)
    for f in dataclasses.fields(cfg_module.LocalistConfig):
        if f.name in _SKIPPED_FIELDS or (only is not None and f.name not in only):
            continue
        # Resolved annotations, not ``f.type``: HfArgumentParser(LocalistConfig) rewrites the fields' string
        # annotations into types in place, so ``str(f.type)`` depends on what ran before.
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint
        annotation = getattr(base, "__name__", "") + ("|None" if base is not hint else "")
        kind = {"float": float, "int": int, "int|None": int, "str": str, "bool": _parse_bool}.get(annotation)
        if kind is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "").replace("%", "%%") + f" [LocalistConfig default: {default}]"
        group.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, choices=choices.get(f.name),
                           metavar=f.name.upper() if f.name not in choices else None, help=text)


def localist_overrides(args: argparse.Namespace, only: Sequence[str] | None = None) -> dict:
    """The LocalistConfig fields given on the command line (see :func:`add_localist_config_arguments`)."""

    names = [f.name for f in dataclasses.fields(LocalistConfig) if f.name not in _SKIPPED_FIELDS]
    return {n: getattr(args, n) for n in names if hasattr(args, n) and (only is None or n in only)}


def _check_model_dir(model_dir: str) -> None:

    if not os.path.isdir(model_dir):
        raise LocalistLoadError(f"--model_dir {model_dir!r} is not a directory: pass a local model directory "
                                "(written by save_pretrained)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise LocalistLoadError(f"--model_dir {model_dir!r} has no config.json: pass a directory written by "
                                "save_pretrained")


def _has_localist_state(model_dir: str) -> bool:


    if os.path.isfile(os.path.join(model_dir, LOCALIST_CONFIG_NAME)):
        return True
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            return isinstance(json.load(fh).get(MODEL_CONFIG_KEY), dict)
    except (OSError, ValueError):
        return False


def load_model_and_tokenizer(model_dir: str, overrides: dict, localist: bool = True):
    """Load ``model_dir`` (the class in ``config.architectures``, else AutoModelForCausalLM) and its tokenizer
    (None when the directory has none), and make the model localist: its saved localist state when it has one
    (then ``overrides`` update it), else ``apply_localist`` with a LocalistConfig built from ``overrides``.
    Returns ``(model, handle, tokenizer, loaded_state)``."""
    _check_model_dir(model_dir)
    try:
        model_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LocalistLoadError(f"cannot read the model config in {model_dir!r}: {e}") from e
    names = getattr(model_config, "architectures", None) or []
    model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), AutoModelForCausalLM)
    loaded_state = localist and _has_localist_state(model_dir)
    try:
        if loaded_state:
            model = AutoLocalistModel.from_pretrained(model_dir, model_class=model_class)
        else:
            model = model_class.from_pretrained(model_dir)
    except LocalistError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt weights raise the reader's own errors (SafetensorError, ...)
        raise LocalistLoadError(f"cannot load the model at {failing_weights_file(model_dir)} with "
                                f"{model_class.__name__} ({type(e).__name__}: {e})") from e
    if loaded_state:
        handle = model.localist_handle
        if overrides:
            handle.update(**overrides)
    else:
        handle = apply_localist(model, LocalistConfig.from_dict({}, **overrides))
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None  # a model directory without tokenizer files
    return model, handle, tokenizer, loaded_state
