"""``apply_localist`` and ``LocalistHandle``: patch an existing Hugging Face model, and undo it exactly.

The patch touches no weight. It (1) registers the ``"localist"`` key and switches the model's attention
implementation to it, (2) tags each attention module with the shared :class:`LocalistState` (settings and block
slots; nothing about any one call) and its layer index, (3) replaces the model's ``forward`` (an instance
attribute, so peft's ``self.model.forward(...)`` reaches it too) by a
:class:`~hf_localist.patch.forward.LocalistForward` that builds each call's block layout and passes it down with the
call, and its backbone's ``forward`` by a :class:`~hf_localist.patch.forward.LocalistBackboneForward` (which passes
that layout on, or builds one when the backbone is called directly, as TRL's trainers do), and (4) wraps
``save_pretrained`` so the localist settings are written with the model, atomically (and, when ``model`` is a peft
wrapper, the wrapper's ``save_pretrained`` too: :mod:`hf_localist.patch.adapters`).
``handle.revert()`` undoes all four. Every patch is an instance of a small class, so a patched model can be
deep-copied and pickled.

The dial of a call and its scopes: see :mod:`hf_localist.patch.handle`.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from typing import Any

import torch.nn as nn

from ..arch.registry import get_arch_spec, supported_architectures
from ..attention.function import ATTENTION_KEY, register_attention_key
from ..attention.state import LocalistState
from ..config.localist import MODEL_CONFIG_KEY, LocalistConfig
from ..errors import LocalistConfigError, LocalistStateError, UnsupportedArchitectureError
from ..savedir import check_save_target, commit_directory, model_file, staging_directory
from .adapters import bind_wrapper
from .forward import LocalistBackboneForward, LocalistForward, LocalistGenerate, PatchedMethod
from .handle import LocalistHandle, check_token_ids, vocabulary_size
from .persistence import write_localist_files
from .slots import CentroidAssignHook


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model



def apply_localist(model: nn.Module, config: LocalistConfig | None = None, **overrides: Any) -> LocalistHandle:
    """Make ``model`` localist. Returns a :class:`LocalistHandle` (also at ``model.localist_handle``).

    ``config`` defaults to ``LocalistConfig.for_model_config(model.config)``; keyword arguments override fields.
    Works on a transformers ``PreTrainedModel`` or a peft model wrapping one.
    """
    base = _unwrap(model)
    if not hasattr(base, "config") or not hasattr(base, "set_attn_implementation"):
        raise UnsupportedArchitectureError(
            f"apply_localist needs a transformers PreTrainedModel (or a peft model around one), got "
            f"{type(model).__name__}. Supported model types: {supported_architectures()}; other transformers models "
            "whose modeling code uses AttentionInterface can be added with hf_localist.register_localist_arch(...)"
        )
    if isinstance(getattr(base, "localist_handle", None), LocalistHandle):
        raise LocalistStateError(
            "the model is already localist: use model.localist_handle (update, set_dial) or revert()")
    spec = get_arch_spec(getattr(base.config, "model_type", None), base)
    modules = [m for m in base.modules() if spec.is_attention_module(m)]
    if not modules:
        raise UnsupportedArchitectureError(
            f"no attention module with {spec.q_proj!r}/{spec.k_proj!r} projections found in {type(base).__name__}: "
            "check the register_localist_arch entry for this model_type"
        )
    if config is None:
        # Defaults for this model (model_type and num_layers are set below). Not for_model_config: that looks the
        # type up in the registry again, without the model, and so rejects auto-detected architectures.
        config = LocalistConfig.from_dict({}, **overrides)
    elif not isinstance(config, LocalistConfig):
        raise LocalistConfigError(f"apply_localist: config must be a LocalistConfig, got {type(config).__name__}")
    else:
        # The model gets its own copy: one config given to two models must not make set_dial on one move the other.
        config = copy.deepcopy(config)
        if overrides:
            config.update(**overrides)
    if config.model_type is not None and config.model_type != spec.model_type:
        raise LocalistConfigError(
            f"LocalistConfig.model_type={config.model_type!r} but the model is {spec.model_type!r}: "
            "build the config for this model (LocalistConfig.from_pretrained(model_path))"
        )
    # Validated together (first_local_layer < number of layers); a rejected config is left unchanged. Bound: a
    # later handle.update(model_type=..., num_layers=...) that contradicts the model is refused.
    config.bind_to_model(spec.model_type, len(modules))
    check_token_ids(config, vocabulary_size(base))
    _warn_if_no_block_can_start(config)

    register_attention_key()
    original_impl = base.config._attn_implementation
    base.set_attn_implementation(ATTENTION_KEY)
    if base.config._attn_implementation != ATTENTION_KEY:
        base.set_attn_implementation(original_impl)
        raise UnsupportedArchitectureError(
            f"{type(base).__name__} refused attn_implementation='localist' (it stayed {original_impl!r}): its modeling "
            "code does not dispatch through transformers' AttentionInterface. Supported model types: "
            f"{supported_architectures()} (register_localist_arch only helps models that use AttentionInterface)"
        )
    state = LocalistState(config=config, num_layers=len(modules), original_impl=original_impl, causal=spec.causal)
    for i, module in enumerate(modules):
        module._localist_state = state
        module._localist_layer = i
    # (the entry before the patch,) or None when there was none: a tuple, so that None can be an entry too.
    previous = (base.config.__dict__[MODEL_CONFIG_KEY],) if MODEL_CONFIG_KEY in base.config.__dict__ else None
    handle = LocalistHandle(model, base, spec, state, modules, original_impl, previous)
    setattr(base.config, MODEL_CONFIG_KEY, config.to_dict())
    # Centroid assignment reads the input of layer l0's attention (= its Q projection's input; see blocks/centroid.py)
    # and the call's layout from the attention kwargs; one hook per layer, each active only while its layer is the
    # current first_local_layer.
    handle._hooks = [m.register_forward_pre_hook(CentroidAssignHook(state, i), with_kwargs=True)
                     for i, m in enumerate(modules)]
    base.forward = LocalistForward(base, state, base.__dict__.get("forward"))
    backbone = _backbone(base, modules)
    if backbone is not None:
        backbone.forward = LocalistBackboneForward(backbone, state, backbone.__dict__.get("forward"))
    handle._backbone = backbone
    base.save_pretrained = LocalistSave(base, state, base.__dict__.get("save_pretrained"))
    if callable(getattr(base, "generate", None)):
        base.generate = LocalistGenerate(base, state, base.__dict__.get("generate"))
    base.localist_handle = handle
    bind_wrapper(model)  # a peft wrapper saves the localist files next to its adapter (patch/adapters.py)
    return handle


def _backbone(base: nn.Module, modules: list[nn.Module]) -> nn.Module | None:
    """The model's backbone (``base.base_model``, e.g. ``LlamaModel``) when it is a sub-module holding every attention
    module, else None. Libraries call it directly (TRL's fused LM head): its forward is patched too."""
    backbone = getattr(base, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is base:
        return None
    inside = {id(m) for m in backbone.modules()}
    return backbone if all(id(m) in inside for m in modules) else None


def _warn_if_no_block_can_start(config: LocalistConfig) -> None:
    """The defaults (segment assignment, no anchor tokens) change nothing: say so, and how to give the blocks."""
    if config.block_assignment == "segment" and not config.anchor_token_ids:
        warnings.warn(
            "apply_localist: block_assignment='segment' with anchor_token_ids=[] (the defaults): no token starts a "
            "block, so every position stays in block 0 and the model is unchanged at every dial, alpha=1 included, "
            "unless each call passes block_ids=. Give the blocks: anchor_token_ids=[...] (add_block_tokens(tokenizer, "
            "model, names) returns a config with them), or block_assignment='explicit' and pass block_ids=(batch, "
            "seq) to every call, or block_assignment='centroid'",
            UserWarning, stacklevel=3,
        )


# ---------------------------------------------------------------------- save: settings travel with the model
class LocalistSave(PatchedMethod):
    """``model.save_pretrained`` that writes the localist settings and state with the model, atomically."""

    name = "save_pretrained"

    def __call__(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        base, state = self.base, self.state
        save_directory = check_save_target(os.fspath(save_directory))
        push = kwargs.pop("push_to_hub", False)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "token", "private") if k in kwargs}
        setattr(base.config, MODEL_CONFIG_KEY, state.config.to_dict())
        # Write aside, then commit under a checksummed manifest (savedir.py): a failed or killed save never leaves
        # a mix of two saves that loads, and files of an earlier save that this one does not write are removed.
        tmp = staging_directory(save_directory)
        try:
            self.original()(tmp, *args, **kwargs)
            write_localist_files(base.localist_handle, tmp)
            commit_directory(tmp, save_directory, model_file)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        if push:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            base.push_to_hub(repo_id, **hub_kwargs)

