"""peft adapters of a localist model: the adapter directory carries the localist settings and state.

``PeftModel.save_pretrained`` writes ``adapter_config.json`` and ``adapter_model.safetensors`` and never calls the
base model's ``save_pretrained`` (where the localist patch of :mod:`hf_localist.patch.apply` sits), and
``Trainer.save_model`` / ``push_to_hub`` of a peft model go through it. So the peft wrapper gets its own patched
``save_pretrained``: an instance attribute (peft's class is left alone, as transformers' is), installed by
:func:`bind_wrapper` when the localist side sees the wrapper: ``apply_localist(peft_model)``, ``LocalistTrainer``,
``LocalistCallback`` (at ``on_init_end`` / ``on_train_begin``) and ``AutoLocalistModel.from_pretrained(adapter_dir)``.
``handle.revert()`` removes it. A wrapper made around an already-patched model and saved without any of these
(``apply_localist(model); get_peft_model(model, ...).save_pretrained(d)``) writes a plain adapter: add the localist
files with ``hf_localist.save_localist_state(model, d)``.

The patched save writes the adapter (peft's own ``save_pretrained``), ``localist_config.json`` and the state files
(:mod:`hf_localist.patch.persistence`) into a staging directory and commits them under the checksummed manifest of
:mod:`hf_localist.savedir`, like a model save. peft's model card (``README.md``) is kept out of the manifest, so that
a card edited later (``Trainer.create_model_card``) never makes the checkpoint refuse to load.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from ..savedir import check_save_target, commit_directory, staging_directory
from .forward import PatchedMethod
from .persistence import LOCALIST_FILES, write_localist_files

ADAPTER_CONFIG_NAME = "adapter_config.json"
#: Files a peft adapter save writes (per adapter directory), besides the model card.
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin")
_CARD = "README.md"
#: Weight files of a full model: a directory that has them is a model, not an adapter (see is_adapter_directory).
_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a peft ``PeftModel`` (duck-typed: peft is imported only where it is used)."""
    return isinstance(getattr(model, "peft_config", None), dict) and callable(getattr(model, "get_base_model", None))


def peft_wrapper_of(model: Any) -> Any:
    """The ``PeftModel`` in ``model`` (itself, or inside DDP / accelerate wrappers: ``.module``), or None."""
    seen = model
    for _ in range(4):
        if is_peft_model(seen):
            return seen
        seen = getattr(seen, "module", None)
        if seen is None:
            return None
    return None


def is_adapter_directory(path: str) -> bool:
    """Whether the local directory ``path`` holds a peft adapter (``adapter_config.json``) and no full model."""
    return (os.path.isfile(os.path.join(path, ADAPTER_CONFIG_NAME))
            and not any(os.path.isfile(os.path.join(path, n)) for n in _MODEL_WEIGHTS))


def adapter_file(rel: str) -> bool:
    """Whether ``rel`` (relative path in a save directory) is a file an adapter save writes: a stale one is removed
    by the next save; other files (tokenizer, optimizer state of a Trainer checkpoint, logs) are kept."""
    name = rel.rsplit("/", 1)[-1]
    return name in ADAPTER_FILES or name in LOCALIST_FILES


def bind_wrapper(model: Any):
    """Give the peft wrapper in ``model`` (if any) the localist ``save_pretrained``, once; returns the handle of its
    localist base model, or None when ``model`` holds no peft wrapper around a localist model."""
    wrapper = peft_wrapper_of(model)
    if wrapper is None:
        return None
    handle = getattr(wrapper.get_base_model(), "localist_handle", None)
    if handle is None or not getattr(handle, "active", False):
        return None
    if not isinstance(wrapper.__dict__.get("save_pretrained"), LocalistAdapterSave):
        wrapper.save_pretrained = LocalistAdapterSave(wrapper, handle.state, wrapper.__dict__.get("save_pretrained"))
        handle.wrappers.append(wrapper)
    return handle


def unbind_wrapper(wrapper: Any) -> None:
    """Remove the patched ``save_pretrained`` of ``wrapper`` (``handle.revert()``)."""
    patched = wrapper.__dict__.pop("save_pretrained", None)
    if isinstance(patched, LocalistAdapterSave) and patched.previous is not None:
        wrapper.__dict__["save_pretrained"] = patched.previous
    elif patched is not None and not isinstance(patched, LocalistAdapterSave):
        wrapper.__dict__["save_pretrained"] = patched  # someone else's: not ours to remove


class LocalistAdapterSave(PatchedMethod):
    """``PeftModel.save_pretrained`` that writes the localist settings and state next to the adapter, atomically."""

    name = "save_pretrained"

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        wrapper = self.base
        if not kwargs.get("is_main_process", True):
            return self.original()(save_directory, *args, **kwargs)  # peft writes nothing there: neither do we
        handle = wrapper.get_base_model().localist_handle
        target = check_save_target(os.fspath(save_directory))
        tmp = staging_directory(target)
        side = None
        try:
            card = os.path.join(target, _CARD)
            if os.path.isfile(card):
                shutil.copy2(card, os.path.join(tmp, _CARD))  # peft updates an existing card rather than replace it
            self.original()(tmp, *args, **kwargs)
            # Adapters other than "default" go to subdirectories named after them: each gets the localist files,
            # so that every adapter directory loads on its own.
            subdirs = sorted(d for d in os.listdir(tmp)
                             if os.path.isfile(os.path.join(tmp, d, ADAPTER_CONFIG_NAME)))
            for directory in [tmp] + [os.path.join(tmp, d) for d in subdirs]:
                write_localist_files(handle, directory)
            if os.path.isfile(os.path.join(tmp, _CARD)):
                side = staging_directory(target)  # a leftover of a killed save is removed like any staging directory
                os.replace(os.path.join(tmp, _CARD), os.path.join(side, _CARD))
            commit_directory(tmp, target, adapter_file, deep=tuple(subdirs))
            if side is not None:
                os.replace(os.path.join(side, _CARD), card)
        finally:
            for d in (tmp, side):
                if d is not None and os.path.isdir(d):
                    shutil.rmtree(d, ignore_errors=True)
        return None
