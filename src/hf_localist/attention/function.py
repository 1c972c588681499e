"""The ``"localist"`` attention key: the function transformers calls in every attention layer, and its state.

transformers calls ``localist_attention(module, query, key, value, attention_mask, dropout=..., scaling=...,
**kwargs)`` with ``query`` (B, H, T, D) and ``key``/``value`` (B, H_kv, S, D). The per-model
:class:`LocalistState` (settings and block slots, nothing about any one call) is reached through
``module._localist_state`` (set by ``apply_localist``); the layout of the current call arrives with the call, as the
keyword argument ``localist_call`` (:class:`hf_localist.attention.call.CallContext`, built by the model's patched
``forward``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..config.localist import LocalistConfig
from ..errors import BackendError, LocalistStateError
from .backends import Layout, dense_attention, segment_attention
from .call import CALL_KWARG, CallContext, call_from_kwargs
from .flex import flex_attention_hard

if TYPE_CHECKING:  # annotations only: state.py imports this module (register_attention_key on unpickling)
    from .state import LocalistState

ATTENTION_KEY = "localist"


def _passthrough_fn(state: LocalistState, module: torch.nn.Module) -> Callable:
    """The model's own attention (bit-identical at alpha_l = 0): sdpa, or the modeling file's eager function."""
    impl = state.original_impl
    if impl == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is not None:
            return fn
    if impl in ALL_ATTENTION_FUNCTIONS and impl != ATTENTION_KEY:
        return ALL_ATTENTION_FUNCTIONS[impl]
    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def _layout(ctx: CallContext, q_len: int, kv_len: int, causal: bool, device: torch.device):
    """Slice the call's block layout to this layer's queries and keys.

    Queries are the last ``q_len`` positions. Keys are the last ``kv_len`` positions when the cache holds the
    whole sequence (or a sliding window of it); a static cache longer than the sequence has its extra slots
    padded with block 0 (the mask transformers gives hides them).
    """
    ids, total = ctx.block_ids, ctx.block_ids.shape[1]
    if total >= kv_len:
        k_slice = slice(total - kv_len, total)
        k_blocks, k_anchor = ids[:, k_slice], ctx.anchors[:, k_slice]
        k_pos = torch.arange(total - kv_len, total, device=device)
    else:
        pad = kv_len - total
        k_blocks = torch.nn.functional.pad(ids, (0, pad))
        k_anchor = torch.nn.functional.pad(ctx.anchors, (0, pad))
        k_pos = torch.arange(kv_len, device=device)
    q_pos = torch.arange(total - q_len, total, device=device)
    layout = Layout(q_blocks=ids[:, total - q_len:], k_blocks=k_blocks, q_pos=q_pos, k_pos=k_pos, k_anchor=k_anchor,
                    sink=ctx.sink, causal=causal)
    return layout


def _attentions_requested(kwargs: dict) -> bool:
    """Whether the caller asked for attention weights.

    Most models pass ``output_attentions`` down to the attention function, but some consume it in the attention
    module (GPT-2) and transformers v5 collects the weights with output-capturing hooks instead: check the active
    collector too (it also covers ``config.output_attentions=True``).
    """
    if kwargs.get("output_attentions", False):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older/newer transformers without the collector
        return False
    collected = _active_collector.get()
    return isinstance(collected, dict) and "attentions" in collected


def _additive_mask_for_eager(module, state: LocalistState, query: torch.Tensor, key: torch.Tensor,
                             attention_mask: torch.Tensor | None, kwargs: dict) -> torch.Tensor | None:
    """The mask an eager attention function expects (additive, 0 / finfo.min), from what the "localist" key got.

    The key's mask function is ``sdpa_mask``: it gives a boolean mask, or ``None`` where SDPA's ``is_causal`` would
    do. Eager functions add the mask and apply no causality of their own, so ``None`` must become an explicit
    causal mask (the values transformers' ``eager_mask`` uses), or the layer would attend to future positions.
    """
    min_value = torch.finfo(query.dtype).min
    if attention_mask is None:
        is_causal = kwargs.get("is_causal")
        causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", state.causal))
        q_len, kv_len = query.shape[2], key.shape[2]
        if not causal or q_len == 1:
            return None
        q_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)
        k_pos = torch.arange(kv_len, device=query.device)
        future = k_pos[None, :] > q_pos[:, None]
        return torch.zeros(future.shape, dtype=query.dtype, device=query.device).masked_fill(
            future, min_value)[None, None]
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, min_value)
    return attention_mask


def _pick_backend(cfg: LocalistConfig, alpha_l: float, need_weights: bool, query: torch.Tensor, module,
                  dropout: float = 0.0) -> str:
    hard = alpha_l >= 1.0
    requested = cfg.backend
    if need_weights:
        return "dense"  # weights (output_attentions, diagnostics) need the full probability matrix
    if requested in ("segment", "flex", "auto") and (not hard or cfg.general_block_bias != 0.0):
        # block-sparse backends compute the hard mask only: soft layers and the general-query bias need the additive one
        return "dense"
    if requested == "flex":
        if query.device.type == "cpu" and torch.is_grad_enabled() and query.requires_grad:
            raise BackendError(
                "LocalistConfig.backend='flex' cannot run with gradients on CPU (torch has no flex_attention backward "
                "on CPU): use backend='segment' (trainable) or 'auto', or run under torch.no_grad()"
            )
        return "flex"
    if requested == "auto":
        if not hard:
            return "dense"
        window = getattr(module, "sliding_window", None)
        if window is not None and query.shape[2] > 1:
            return "dense"  # the mask transformers gives carries the window; dense honours it exactly
        # flex_attention has no dropout: a layer that asks for attention dropout (training) runs segment
        return "flex" if query.device.type == "cuda" and dropout == 0.0 else "segment"
    return requested


def localist_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       **kwargs: Any):
    """Attention with the locality dial: ``z'_ts = z_ts + bias_ts`` as docs/design.md section 3.

    ``kwargs[CALL_KWARG]`` is the :class:`CallContext` of the call (layout, dial, recorder), passed down by the
    patched forward; it is removed before the model's own attention function is called.
    """
    state: LocalistState | None = getattr(module, "_localist_state", None)
    if state is None:
        raise LocalistStateError(
            f"{type(module).__name__} uses attn_implementation='localist' but was not patched by apply_localist "
            "(or was reverted): call hf_localist.apply_localist(model, config) or set_attn_implementation('sdpa')"
        )
    layer = module._localist_layer
    ctx = call_from_kwargs(kwargs)
    kwargs.pop(CALL_KWARG, None)  # the model's own attention functions do not take it
    if ctx is None:
        raise LocalistStateError(
            f"no block layout for this call of layer {layer}: call the patched model itself (model(...), "
            "model.generate) or its backbone (model.base_model), not an inner sub-module such as a decoder layer, "
            "so that block ids are computed for the sequence"
        )
    alpha_l = state.layer_alpha(layer, ctx.alpha)
    recorder = ctx.recorder
    want_weights = _attentions_requested(kwargs)
    need_weights = want_weights or recorder is not None or bool(ctx.probes)
    if alpha_l == 0.0 and not need_weights:
        state.backend_counts["passthrough"] = state.backend_counts.get("passthrough", 0) + 1
        fn = _passthrough_fn(state, module)
        if fn is not ALL_ATTENTION_FUNCTIONS.get("sdpa"):
            attention_mask = _additive_mask_for_eager(module, state, query, key, attention_mask, kwargs)
        return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    q_len, kv_len = query.shape[2], key.shape[2]
    if ctx.block_ids.shape[0] != query.shape[0] or ctx.block_ids.shape[1] < q_len:
        raise LocalistStateError(
            f"the block layout of this call has shape {tuple(ctx.block_ids.shape)} but layer {layer} got queries of "
            f"batch {query.shape[0]} and length {q_len}: call the patched model itself, not an inner sub-module"
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    is_causal = kwargs.get("is_causal")
    causal = bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", state.causal))
    layout = _layout(ctx, q_len, kv_len, causal, query.device)
    backend = _pick_backend(state.config, alpha_l, need_weights, query, module, dropout)
    state.backend_counts[backend] = state.backend_counts.get(backend, 0) + 1
    beta = state.config.beta_anchor
    # Gemma 2's attention logit softcap: every backend applies it (SDPA cannot: segment then runs explicit softmax).
    # Sliding windows need nothing here: transformers puts the window into the mask of those layers.
    softcap = kwargs.get("softcap")
    if backend == "segment":
        return segment_attention(query, key, value, attention_mask, layout, beta, scaling, dropout, softcap=softcap)
    if backend == "flex":
        if beta > 0.0:
            raise BackendError(
                f"LocalistConfig.backend='flex' has no anchor bonus (beta_anchor={beta}): use 'segment' or 'dense'"
            )
        if dropout > 0.0:
            raise BackendError(
                f"LocalistConfig.backend='flex' has no attention dropout (the layer asks for dropout={dropout} in "
                "training mode): use 'segment' or 'dense', or set the model's attention dropout to 0"
            )
        return flex_attention_hard(query, key, value, attention_mask, layout, scaling, state.config.flex_compile,
                                   softcap=softcap)
    out, weights = dense_attention(query, key, value, attention_mask, layout, alpha_l, beta, scaling, dropout,
                                   need_weights=need_weights, softcap=softcap, mask_cache=ctx.mask_cache,
                                   general_bias=state.config.general_block_bias)
    for probe in ctx.probes:
        probe(layer, module, query, key, attention_mask, layout, scaling, alpha_l, out, ctx)
    if recorder is not None:
        total = ctx.block_ids.shape[1]
        recorder.record(layer, weights, layout.q_blocks, ctx.target_ids[:, total - q_len:], layout.k_blocks,
                        layout.k_anchor, layout.key_is_sink(), ctx.query_valid[:, total - q_len:])
    return out, (weights if want_weights else None)


def register_attention_key() -> None:
    """Register ``"localist"`` with transformers' attention and mask interfaces (idempotent).

    The mask function is transformers' own ``sdpa_mask``: without a mask function under the same key the
    attention function would receive ``attention_mask=None`` and padding would be lost.
    """
    AttentionInterface.register(ATTENTION_KEY, localist_attention)
    AttentionMaskInterface.register(ATTENTION_KEY, sdpa_mask)
