"""``apply_localist`` and ``LocalistHandle``: patch an existing Hugging Face model, and undo it exactly.

The patch touches no weight. It (1) registers the ``"localist"`` key and switches the model's attention
implementation to it, (2) tags each attention module with the shared :class:`LocalistState` and its layer index,
(3) wraps the model's ``forward`` (an instance attribute, so peft's ``self.model.forward(...)`` reaches it too)
to turn ``block_ids`` / anchor tokens into the call's block layout and keep the block ids of cached positions
with the KV cache, and (4) wraps ``save_pretrained`` so the localist settings are written with the model,
atomically. ``handle.revert()`` undoes all four.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import tempfile
from typing import Any, Iterator

import torch
import torch.nn as nn

from .attention import ATTENTION_KEY, CallContext, LocalistState, register_attention_key
from .blocks import anchor_flags, segment_block_ids, validate_block_ids
from .config import MODEL_CONFIG_KEY, LocalistConfig
from .errors import BlockIdsError, LocalistConfigError, LocalistStateError, UnsupportedArchitectureError
from .centroid import make_centroid_hook
from .persistence import save_localist_state
from .qk import projection_module
from .recorder import DiagnosticsRecorder
from .registry import ArchSpec, get_arch_spec, supported_architectures
from .utils import move_tree_contents

_MISSING = object()


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class LocalistHandle:
    """What ``apply_localist`` returns: the dial, diagnostics, and the exact undo."""

    def __init__(self, model: nn.Module, base: nn.Module, spec: ArchSpec, state: LocalistState,
                 attention_modules: list[nn.Module], original_impl: str, previous_config_entry: Any):
        self.model = model
        self.base = base
        self.spec = spec
        self.state = state
        self.attention_modules = attention_modules
        self._original_impl = original_impl
        self._previous_config_entry = previous_config_entry
        self._active = True

    # ------------------------------------------------------------------ settings
    @property
    def config(self) -> LocalistConfig:
        return self.state.config

    @property
    def active(self) -> bool:
        return self._active

    def _check_active(self) -> None:
        if not self._active:
            raise LocalistStateError("this LocalistHandle was reverted: call apply_localist again to re-patch")

    def set_dial(self, alpha: float) -> None:
        """Set the dial (validated, in [0, 1]); takes effect on the next forward, no retraining."""
        self._check_active()
        self.state.config.alpha = alpha

    @contextlib.contextmanager
    def dial(self, alpha: float) -> Iterator[LocalistHandle]:
        """``with handle.dial(0.3): ...`` sets the dial for the block and restores it afterwards."""
        previous = self.state.config.alpha
        self.set_dial(alpha)
        try:
            yield self
        finally:
            self.state.config.alpha = previous

    def update(self, **fields: Any) -> None:
        """Change several config fields at once (validated together)."""
        self._check_active()
        self.state.config.update(**fields)

    def layer_alphas(self) -> list[float]:
        return [self.state.layer_alpha(layer) for layer in range(self.state.num_layers)]

    @contextlib.contextmanager
    def record(self) -> Iterator[DiagnosticsRecorder]:
        """Collect H_t, PF_t and BM_t of every localised layer for the forwards inside the block."""
        self._check_active()
        recorder = DiagnosticsRecorder()
        previous, self.state.recorder = self.state.recorder, recorder
        try:
            yield recorder
        finally:
            self.state.recorder = previous

    # ------------------------------------------------------------------ blocks
    def blocks(self) -> list[dict]:
        """Active blocks: slot, name, anchor, centroid, enabled, and how and when each was recruited."""
        from .centroid import describe_blocks

        return describe_blocks(self)

    def activate_block(self, slot: int, centroid: torch.Tensor | None = None, subspace: torch.Tensor | None = None,
                       enabled: bool = True, info: dict | None = None) -> None:
        """Activate a dormant slot (buffers only: no parameter changes shape). See centroid.activate_block."""
        self._check_active()
        from .centroid import activate_block

        activate_block(self, slot, centroid, subspace, enabled, info)

    # ------------------------------------------------------------------ undo
    def revert(self) -> nn.Module:
        """Restore the exact original model: attention implementation, forward, save_pretrained, config."""
        self._check_active()
        base = self.base
        for module in self.attention_modules:
            for attr in ("_localist_state", "_localist_layer"):
                if attr in module.__dict__:
                    delattr(module, attr)
        for attr in ("forward", "generate", "save_pretrained", "localist_handle"):
            base.__dict__.pop(attr, None)
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        base.set_attn_implementation(self._original_impl)
        if self._previous_config_entry is _MISSING:
            if MODEL_CONFIG_KEY in base.config.__dict__:
                delattr(base.config, MODEL_CONFIG_KEY)
        else:
            setattr(base.config, MODEL_CONFIG_KEY, self._previous_config_entry)
        self._active = False
        return self.model


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
        raise LocalistStateError("the model is already localist: use model.localist_handle (update, set_dial) or revert()")
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
    elif overrides:
        config.update(**overrides)
    if config.model_type is not None and config.model_type != spec.model_type:
        raise LocalistConfigError(
            f"LocalistConfig.model_type={config.model_type!r} but the model is {spec.model_type!r}: "
            "build the config for this model (LocalistConfig.from_pretrained(model_path))"
        )
    # Validated together (first_local_layer < number of layers); a rejected config is left unchanged.
    config.update(model_type=spec.model_type, num_layers=len(modules))

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
    previous = base.config.__dict__.get(MODEL_CONFIG_KEY, _MISSING)
    handle = LocalistHandle(model, base, spec, state, modules, original_impl, previous)
    setattr(base.config, MODEL_CONFIG_KEY, config.to_dict())
    # Centroid assignment reads the input of layer l0's Q projection (see centroid.py); one hook per layer, each
    # active only while its layer is the current first_local_layer.
    handle._hooks = [
        projection_module(m, spec.q_proj).register_forward_pre_hook(_layer_hook(state, i, make_centroid_hook(state)))
        for i, m in enumerate(modules)
    ]
    base.forward = _wrap_forward(base, state)
    base.save_pretrained = _wrap_save(base, state)
    if callable(getattr(base, "generate", None)):
        base.generate = _wrap_generate(base, state)
    base.localist_handle = handle
    return handle


# ---------------------------------------------------------------------- forward: block layout of each call
def _wrap_forward(base: nn.Module, state: LocalistState):
    original = base.forward  # bound method of the class
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any):
        block_ids = kwargs.pop("block_ids", None)
        target_block_ids = kwargs.pop("target_block_ids", None)
        bound = signature.bind_partial(*args, **kwargs).arguments
        state.ctx = _call_context(state, bound, block_ids, target_block_ids)
        try:
            out = original(*args, **kwargs)
        finally:
            state.ctx.mask_cache.clear()  # do not hold a (B, 1, T, S) mask between calls
        if state.config.penalty == "loss" and base.training and torch.is_grad_enabled() \
                and not isinstance(out, tuple) and getattr(out, "loss", None) is not None:
            from .penalty import add_penalty_to_output

            out = add_penalty_to_output(base.localist_handle, out, bound.get("labels"), kwargs.get("num_items_in_batch"))
        cache = _output_cache(out)
        if cache is None:
            cache = _cache_arg(bound)
        if cache is not None and not isinstance(cache, (tuple, list)):
            _track_cache(cache)
            cache._localist_block_ids = state.ctx.block_ids
            cache._localist_sink = state.ctx.sink
        return out

    # generate() validates model kwargs against the forward signature: advertise block_ids/target_block_ids.
    params = list(signature.parameters.values())
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("block_ids", "target_block_ids")]
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    forward.__signature__ = signature.replace(parameters=rest + extra + var_kw)
    return forward


def _wrap_generate(base: nn.Module, state: LocalistState):
    """Mark the forwards of a generate() call: there, block_ids describe the prompt (see _call_context)."""
    original = base.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any):
        state.generating += 1
        try:
            return original(*args, **kwargs)
        finally:
            state.generating -= 1

    return generate


# transformers renamed the KV cache argument and output field from ``past_key_values`` to ``cache`` (5.24); read both.
_CACHE_NAMES = ("cache", "past_key_values")


def _cache_arg(bound: dict) -> Any:
    """The KV cache passed to forward, by either name, also when it arrived through ``**kwargs``."""
    extra = bound.get("kwargs") if isinstance(bound.get("kwargs"), dict) else {}
    for name in _CACHE_NAMES:
        value = bound.get(name, extra.get(name))
        if value is not None:
            return value
    return None


def _output_cache(out: Any) -> Any:
    if isinstance(out, tuple):
        return None
    for name in _CACHE_NAMES:
        value = getattr(out, name, None)
        if value is not None and not isinstance(value, torch.Tensor):
            return value
    return None


def _cache_length(cache: Any) -> int:
    if cache is None or isinstance(cache, (tuple, list)):
        return 0
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0


def _call_context(state: LocalistState, bound: dict, block_ids: Any, target_block_ids: Any) -> CallContext:
    cfg = state.config
    input_ids = bound.get("input_ids")
    embeds = bound.get("inputs_embeds")
    ref = input_ids if input_ids is not None else embeds
    if ref is None:
        raise BlockIdsError("forward needs input_ids or inputs_embeds to lay out blocks")
    batch, new_len = ref.shape[0], ref.shape[1]
    device = ref.device
    cache = _cache_arg(bound)
    past_len = _cache_length(cache)
    prev = getattr(cache, "_localist_block_ids", None) if past_len > 0 else None
    if prev is not None:
        if prev.shape[1] < past_len:
            prev = None
        else:
            prev = prev[:, :past_len]
            if prev.shape[0] != batch:
                raise BlockIdsError(f"the cache holds block ids for batch {prev.shape[0]} but the input has batch {batch}")
    total = past_len + new_len

    full = None
    centroid_from = None
    known = prev  # block ids of the first positions, before those computed below
    if block_ids is not None and state.generating and isinstance(block_ids, torch.Tensor) and block_ids.dim() == 2 \
            and 0 < block_ids.shape[1] < total:
        # Inside generate(), block_ids are the prompt's, handed again at every step while the sequence grows (with
        # or without a cache): positions after the prompt continue the current block / follow the anchor tokens.
        n = block_ids.shape[1]
        prompt = validate_block_ids(block_ids, "block_ids", batch, (n,), cfg.max_blocks).to(device)
        if past_len > 0 and prev is None:
            raise BlockIdsError(
                f"the KV cache holds {past_len} positions without block ids: run the prefill through the patched model"
            )
        if n > past_len:
            known = prompt if prev is None else torch.cat([prev.to(device), prompt[:, past_len:]], dim=1)
        block_ids = None
    if block_ids is not None:
        if prev is not None and block_ids.shape[-1] < total and block_ids.shape[-1] != new_len \
                and block_ids.shape[-1] <= past_len and torch.equal(block_ids.to(prev.device).long(), prev[:, :block_ids.shape[-1]]):
            block_ids = None  # generate() hands the prompt's block ids again at every step: new tokens continue
        else:
            block_ids = validate_block_ids(block_ids, "block_ids", batch, (new_len, total), cfg.max_blocks).to(device)
            if block_ids.shape[1] == total:
                full = block_ids
            elif prev is None and past_len > 0:
                raise BlockIdsError(
                    f"the KV cache holds {past_len} positions without block ids: pass block_ids for the whole "
                    f"sequence (shape ({batch}, {total}))"
                )
            else:
                full = block_ids if prev is None else torch.cat([prev.to(device), block_ids], dim=1)
    if full is None:
        if past_len > 0 and prev is None:
            raise BlockIdsError(
                f"the KV cache holds {past_len} positions without block ids: run the prefill through the patched model"
            )
        k = known.shape[1] if known is not None else 0  # positions [k, total) are laid out here
        last = known[:, -1].to(device) if k > 0 else torch.zeros(batch, dtype=torch.long, device=device)
        rest = total - k
        if cfg.block_assignment == "centroid":
            # Placeholder: the layer-l0 hook assigns positions [k, total) from their hidden states.
            new = torch.zeros(batch, rest, dtype=torch.long, device=device)
            centroid_from = k
        elif cfg.block_assignment == "segment":
            if input_ids is None:
                raise BlockIdsError("block_assignment='segment' reads anchor tokens from input_ids: pass input_ids or block_ids")
            new = segment_block_ids(input_ids[:, new_len - rest:], cfg.anchor_token_ids, cfg.general_token_id,
                                    start=last)
        elif k > 0:
            new = last[:, None].expand(batch, rest)  # generated tokens continue the current block
        else:
            raise BlockIdsError(
                "block_assignment='explicit' needs block_ids of shape (batch, seq) in the forward call; or use "
                "block_assignment='segment' with anchor tokens (add_block_tokens)"
            )
        full = new if k == 0 else torch.cat([known.to(device), new], dim=1)

    if target_block_ids is not None:
        n = target_block_ids.shape[-1] if isinstance(target_block_ids, torch.Tensor) else 0
        if state.generating and 0 < n < total and target_block_ids.dim() == 2:  # the prompt's, as for block_ids
            target = validate_block_ids(target_block_ids, "target_block_ids", batch, (n,), cfg.max_blocks)
            target_block_ids = torch.cat([target.to(device), full[:, n:]], dim=1)
        target = validate_block_ids(target_block_ids, "target_block_ids", batch, (new_len, total), cfg.max_blocks)
        target = target.to(device)
        if target.shape[1] == new_len and past_len:
            target = torch.cat([full[:, :past_len], target], dim=1)
    else:
        target = full

    mask2d = bound.get("attention_mask")
    if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 and mask2d.shape[1] == total:
        valid = mask2d.to(device).bool()
        sink = valid.long().argmax(dim=1)  # first non-padding position
    else:
        valid = torch.ones(batch, total, dtype=torch.bool, device=device)
        sink = getattr(cache, "_localist_sink", None) if past_len else None
        sink = sink.to(device) if sink is not None and sink.shape[0] == batch else torch.zeros(batch, dtype=torch.long, device=device)
    return CallContext(block_ids=full, target_ids=target, anchors=anchor_flags(full), sink=sink, query_valid=valid,
                       centroid_from=centroid_from)


def _layer_hook(state: LocalistState, layer: int, hook):
    def run(module, args):
        if layer == state.config.first_local_layer:
            return hook(module, args)
        return None

    return run


def _track_cache(cache: Any) -> None:
    """Keep the block ids stored on a cache in step when generate() reorders, expands, selects or crops it."""
    if cache.__dict__.get("_localist_tracked"):
        return

    def wrap(name: str, transform):
        original = getattr(cache, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def method(*args, **kwargs):
            result = original(*args, **kwargs)
            for attr in ("_localist_block_ids", "_localist_sink"):
                value = cache.__dict__.get(attr)
                if value is not None:
                    setattr(cache, attr, transform(value, *args, **kwargs))
            return result

        setattr(cache, name, method)

    wrap("reorder_cache", lambda v, beam_idx: v.index_select(0, beam_idx.to(v.device)))
    wrap("batch_repeat_interleave", lambda v, repeats: v.repeat_interleave(repeats, dim=0))
    wrap("batch_select_indices", lambda v, indices: v[indices.to(v.device)])
    # crop(n): n < 0 removes the last -n positions, n > 0 keeps the first n (older caches), n == 0 is a no-op.
    wrap("crop", lambda v, n: v if v.dim() == 1 or n == 0 else v[:, :n])
    cache._localist_tracked = True


# ---------------------------------------------------------------------- save: settings travel with the model
def _wrap_save(base: nn.Module, state: LocalistState):
    original = base.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        save_directory = os.fspath(save_directory)
        push = kwargs.pop("push_to_hub", False)
        hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "token", "private") if k in kwargs}
        setattr(base.config, MODEL_CONFIG_KEY, state.config.to_dict())
        parent = os.path.dirname(os.path.abspath(save_directory))
        os.makedirs(parent, exist_ok=True)
        # Write aside, then move into place: a failed save leaves the previous files untouched.
        tmp = tempfile.mkdtemp(prefix=".localist-save-", dir=parent)
        try:
            original(tmp, *args, **kwargs)
            state.config.save_pretrained(tmp)
            save_localist_state(base.localist_handle, tmp)
            move_tree_contents(tmp, save_directory)
        finally:
            if os.path.isdir(tmp):
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        if push:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            base.push_to_hub(repo_id, **hub_kwargs)

    return save_pretrained
