"""The architecture registry: data, not code per model.

Each entry says where an architecture keeps its query/key projections and how they are laid out, which config
attributes give the head counts, and whether its self-attention is causal. One generic patcher
(:mod:`hf_localist.patch.apply`) and one generic head-slice accessor read these entries; supporting a new model is a
call to :func:`register_localist_arch`, not new code.

Layouts (weights as stored by the module):

- ``linear``: separate ``nn.Linear`` projections, weight ``(H*D, E)`` (out, in); Llama, Mistral, Qwen2, Gemma, OPT,
  Phi, BERT.
- ``conv1d_fused``: GPT-2's fused ``Conv1D`` ``c_attn`` with weight ``(E, 3E)`` (in, out): Q = ``[:, :E]``,
  K = ``[:, E:2E]``.
- ``fused_qkv``: one ``nn.Linear`` whose rows are ``[Q (H*D) | K (H_kv*D) | V (H_kv*D)]``; Phi-3.
- ``neox_interleaved``: one ``nn.Linear`` whose rows are grouped per head as ``(H, 3, D)``: GPT-NeoX.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ..errors import LocalistConfigError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

LAYOUTS = ("linear", "conv1d_fused", "fused_qkv", "neox_interleaved")


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture's attention lives and how its Q/K weights are laid out."""

    model_type: str
    q_proj: str  # child name, on the attention module, of the Q projection (or of the fused QKV projection)
    k_proj: str | None  # child name of the K projection; None when fused into q_proj
    layout: str  # one of LAYOUTS
    num_heads_attr: str = "num_attention_heads"
    num_kv_heads_attr: str | None = "num_key_value_heads"  # None: same as num heads (no GQA)
    num_layers_attr: str = "num_hidden_layers"
    hidden_size_attr: str = "hidden_size"
    causal: bool = True  # decoder self-attention (False for BERT-style encoders)
    qk_norm: str | None = None  # 'head' (q_norm/k_norm over head_dim, Qwen3) or 'full' (OLMo2): informational
    auto_detected: bool = False

    def num_layers_from_config(self, data: dict[str, Any] | Any) -> int | None:
        value = _cfg_get(data, self.num_layers_attr)
        return int(value) if value is not None else None

    def num_heads(self, config: Any) -> int:
        return int(_cfg_get(config, self.num_heads_attr))

    def num_kv_heads(self, config: Any) -> int:
        value = _cfg_get(config, self.num_kv_heads_attr) if self.num_kv_heads_attr else None
        return int(value) if value is not None else self.num_heads(config)

    def head_dim(self, config: Any) -> int:
        value = _cfg_get(config, "head_dim")
        if value is not None:
            return int(value)
        return int(_cfg_get(config, self.hidden_size_attr)) // self.num_heads(config)

    def is_attention_module(self, module: nn.Module) -> bool:
        children = dict(module.named_children())
        if self.q_proj not in children:
            return False
        return self.k_proj is None or self.k_proj in children


def _cfg_get(config: Any, name: str | None) -> Any:
    if name is None:
        return None
    if isinstance(config, dict):
        return config.get(name)
    return getattr(config, name, None)


_REGISTRY: dict[str, ArchSpec] = {}


def register_localist_arch(
    model_type: str,
    *,
    q_proj: str,
    k_proj: str | None,
    layout: str,
    num_heads_attr: str = "num_attention_heads",
    num_kv_heads_attr: str | None = "num_key_value_heads",
    num_layers_attr: str = "num_hidden_layers",
    hidden_size_attr: str = "hidden_size",
    causal: bool = True,
    qk_norm: str | None = None,
    overwrite: bool = False,
) -> ArchSpec:
    """Register an architecture (by ``config.model_type``) so that ``apply_localist`` supports it.

    The model's attention must go through transformers' ``AttentionInterface`` (``ALL_ATTENTION_FUNCTIONS``).
    Example, for a model whose attention module has ``wq``/``wk`` linear projections::

        register_localist_arch("my_model", q_proj="wq", k_proj="wk", layout="linear")
    """
    if not isinstance(model_type, str) or not model_type:
        raise LocalistConfigError(f"register_localist_arch: model_type={model_type!r} must be a non-empty string")
    if layout not in LAYOUTS:
        raise LocalistConfigError(f"register_localist_arch: layout={layout!r} is not one of {list(LAYOUTS)}")
    if layout == "linear" and not k_proj:
        raise LocalistConfigError("register_localist_arch: layout='linear' needs k_proj (the K projection's name)")
    if layout != "linear" and k_proj is not None:
        raise LocalistConfigError(f"register_localist_arch: layout={layout!r} is fused: pass k_proj=None")
    if qk_norm not in (None, "head", "full"):
        raise LocalistConfigError(f"register_localist_arch: qk_norm={qk_norm!r} must be None, 'head' or 'full'")
    if model_type in _REGISTRY and not overwrite:
        raise LocalistConfigError(
            f"register_localist_arch: {model_type!r} is already registered; pass overwrite=True to replace it"
        )
    spec = ArchSpec(
        model_type=model_type, q_proj=q_proj, k_proj=k_proj, layout=layout, num_heads_attr=num_heads_attr,
        num_kv_heads_attr=num_kv_heads_attr, num_layers_attr=num_layers_attr, hidden_size_attr=hidden_size_attr,
        causal=causal, qk_norm=qk_norm,
    )
    _REGISTRY[model_type] = spec
    return spec


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_arch_spec(model_type: str | None, model: nn.Module | None = None) -> ArchSpec:
    """The registry entry for ``model_type``; for an unregistered type, try to detect the layout from ``model``."""
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    if model is not None:
        spec = _detect(model_type or "unknown", model)
        if spec is not None:
            logger.warning(
                "hf_localist: model_type %r is not registered; detected q_proj=%r k_proj=%r layout=%r. "
                "Call register_localist_arch to make this explicit.", model_type, spec.q_proj, spec.k_proj, spec.layout,
            )
            return spec
    raise UnsupportedArchitectureError(
        f"model_type={model_type!r} is not supported by hf_localist. Supported: {supported_architectures()}. "
        "If its modeling code uses transformers' AttentionInterface, register it with "
        "hf_localist.register_localist_arch(model_type, q_proj=..., k_proj=..., layout=...)."
    )


# Projection names seen across transformers' modeling files, tried in order for unregistered models.
_CANDIDATES = (
    ("q_proj", "k_proj", "linear"),
    ("query", "key", "linear"),
    ("q_lin", "k_lin", "linear"),
    ("c_attn", None, "conv1d_fused"),
    ("qkv_proj", None, "fused_qkv"),
    ("Wqkv", None, "fused_qkv"),
    ("query_key_value", None, "neox_interleaved"),
)


def _detect(model_type: str, model: nn.Module) -> ArchSpec | None:
    # Only models whose modeling code dispatches through AttentionInterface can take the "localist" key.
    if not getattr(model, "_supports_attention_backend", False):
        return None
    for q, k, layout in _CANDIDATES:
        probe = ArchSpec(model_type=model_type, q_proj=q, k_proj=k, layout=layout)
        if any(probe.is_attention_module(m) for m in model.modules()):
            config = getattr(model, "config", None)
            causal = bool(getattr(config, "is_decoder", False)) or bool(getattr(config, "is_causal", True)) and not (
                getattr(config, "is_encoder_decoder", False)
            )
            return dataclasses.replace(probe, causal=causal, auto_detected=True)
    return None


for _entry in (
    dict(model_type="llama", q_proj="q_proj", k_proj="k_proj", layout="linear"),
    dict(model_type="mistral", q_proj="q_proj", k_proj="k_proj", layout="linear"),
    dict(model_type="mixtral", q_proj="q_proj", k_proj="k_proj", layout="linear"),
    dict(model_type="qwen2", q_proj="q_proj", k_proj="k_proj", layout="linear"),
    dict(model_type="qwen3", q_proj="q_proj", k_proj="k_proj", layout="linear", qk_norm="head"),
    dict(model_type="olmo2", q_proj="q_proj", k_proj="k_proj", layout="linear", qk_norm="full"),
    dict(model_type="gemma", q_proj="q_proj", k_proj="k_proj", layout="linear"),
    # Gemma 2: attention logit softcapping (eager only: transformers refuses sdpa for it) and sliding-window layers
    # (the window arrives in the mask transformers builds for those layers).
    dict(model_type="gemma2", q_proj="q_proj", k_proj="k_proj", layout="linear"),
    # Gemma 3 (text; the multimodal "gemma3" wrapper also holds a SigLIP vision tower with q_proj/k_proj): sliding
    # windows, scaling = query_pre_attn_scalar ** -0.5, q_norm/k_norm over head_dim.
    dict(model_type="gemma3_text", q_proj="q_proj", k_proj="k_proj", layout="linear", qk_norm="head"),
    # OPT: learned absolute positions; q_proj has a bias and its output is scaled by head_dim ** -0.5 before the
    # attention function (called with scaling=1.0).
    dict(model_type="opt", q_proj="q_proj", k_proj="k_proj", layout="linear", num_kv_heads_attr=None),
    dict(model_type="phi", q_proj="q_proj", k_proj="k_proj", layout="linear"),
    dict(model_type="gpt2", q_proj="c_attn", k_proj=None, layout="conv1d_fused", num_kv_heads_attr=None,
         num_layers_attr="n_layer", hidden_size_attr="n_embd", num_heads_attr="n_head"),
    dict(model_type="phi3", q_proj="qkv_proj", k_proj=None, layout="fused_qkv"),
    dict(model_type="gpt_neox", q_proj="query_key_value", k_proj=None, layout="neox_interleaved",
         num_kv_heads_attr=None),
    dict(model_type="bert", q_proj="query", k_proj="key", layout="linear", num_kv_heads_attr=None, causal=False),
    dict(model_type="roberta", q_proj="query", k_proj="key", layout="linear", num_kv_heads_attr=None, causal=False),
):
    register_localist_arch(**_entry)
del _entry
