"""One accessor for the per-head query/key weights ``W^(l,h)`` of any registered architecture.

``qk_head_weights(handle, layer)`` returns ``(W_Q (H, D, E), W_K (H_kv, D, E))``: for every query head ``h`` the
``D x E`` matrix that maps the layer input ``x`` (E) to the head's query (``q_h = W_Q[h] @ x``, before any
q_norm/RoPE), and likewise for key heads. They are *views* of the parameters, so autograd reaches the weights
through them and in-place writes (the proximal step) change the model. The layout comes from the registry:

- ``linear``      ``weight (H*D, E)``                 -> ``weight.view(H, D, E)``
- ``conv1d_fused`` GPT-2 ``c_attn.weight (E, 3E)`` (in, out) -> Q = ``weight[:, :H*D].T``, K =
``weight[:, E:E+H_kv*D].T``
- ``fused_qkv``   rows ``[Q (H*D) | K (H_kv*D) | V]``   -> row slices, then ``view``
- ``neox_interleaved`` rows grouped ``(H, 3, D)``        -> ``weight.view(H, 3, D, E)[:, 0 / 1]``

Adapters (peft): the frozen weight of a wrapped projection lives at ``base_layer.weight``. ``effective=True`` reads
``W_eff = W_0 + sum_a delta_a`` (every active, unmerged adapter's ``get_delta_weight``, in the base weight's
layout), a new tensor that is differentiable with respect to the adapter factors only, so a penalty on it trains the
adapters and never the frozen base. ``pick`` views any per-parameter tensor of the weight's shape (an optimizer's
second moment, say) in the same per-head layout.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..distributed import full_tensor, is_dtensor, write_full_
from ..errors import UnsupportedArchitectureError

_SHAPES: dict = {}  # sentinel for ``gathered``: shapes only (meta tensors), nothing is gathered


def _weight(module: nn.Module, name: str, grad: bool = False, gathered: dict | None = None,
            pick: Callable[[nn.Parameter], torch.Tensor | None] | None = None,
            effective: bool = False) -> torch.Tensor | None:
    # peft wraps the projection: the frozen weight lives at base_layer.weight.
    weight = projection_module(module, name).weight
    if effective:
        return effective_weight(getattr(module, name))
    t = pick(weight) if pick is not None else (weight.grad if grad else weight)
    if gathered is _SHAPES and t is not None:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    if not is_dtensor(t):
        return t
    # Sharded (FSDP2 / DTensor): work on the full weight; ``gathered`` lets a writer put it back (prox_step).
    if gathered is not None and weight in gathered:
        return gathered[weight]
    full = full_tensor(t)
    if gathered is not None:
        gathered[weight] = full
    return full


def input_size(handle) -> int:
    """E: the input size of the Q/K projections, read from the weights' shapes (sharded weights are not gathered)."""
    return int(qk_head_weights(handle, 0, gathered=_SHAPES)[0].shape[-1])


def projection_module(module: nn.Module, name: str) -> nn.Module:
    proj = getattr(module, name)
    return getattr(proj, "base_layer", proj)


def active_adapters(proj: nn.Module) -> list[str]:
    """Names of the adapters of a peft-wrapped projection that change its output now (active, not merged)."""
    if not hasattr(proj, "base_layer") or getattr(proj, "disable_adapters", False):
        return []
    merged = set(getattr(proj, "merged_adapters", []) or [])
    names = getattr(proj, "active_adapters", []) or []
    names = [names] if isinstance(names, str) else list(names)
    return [a for a in names if a not in merged]


def effective_weight(proj: nn.Module) -> torch.Tensor:
    """``W_0 + sum_a delta_a``: the weight a (possibly peft-wrapped) projection applies, in the base weight's layout.

    LoRA-family layers give their delta through ``get_delta_weight(adapter)`` (``scaling * B @ A``, transposed for
    ``fan_in_fan_out``); it is differentiable with respect to the factors. Adapters whose effect is not an additive
    delta of the weight (DoRA's magnitude, IA3's scaling) are refused: a penalty on ``W_0`` would not be the penalty
    on the weight the model applies.
    """
    base = getattr(proj, "base_layer", proj)
    w = full_tensor(base.weight) if is_dtensor(base.weight) else base.weight
    for name in active_adapters(proj):
        if (getattr(proj, "use_dora", {}) or {}).get(name, False) or not hasattr(proj, "get_delta_weight"):
            kind = "DoRA" if (getattr(proj, "use_dora", {}) or {}).get(name, False) else type(proj).__name__
            raise UnsupportedArchitectureError(
                f"adapter {name!r} on {type(base).__name__} is a {kind} layer: the group-lasso penalty needs an "
                "additive weight delta (LoRA, LoHa, LoKr); merge the adapter or use plain LoRA on the Q/K projections"
            )
        w = w + proj.get_delta_weight(name).to(w.dtype)
    return w


def head_counts(handle) -> tuple[int, int, int]:
    """(H, H_kv, D) of the patched model, from its config through the registry entry."""
    cfg = handle.base.config
    spec = handle.spec
    return spec.num_heads(cfg), spec.num_kv_heads(cfg), spec.head_dim(cfg)


def qk_head_weights(handle, layer: int, grad: bool = False, gathered: dict | None = None,
                    pick: Callable[[nn.Parameter], torch.Tensor | None] | None = None, effective: bool = False):
    """(W_Q (H, D, E), W_K (H_kv, D, E)) of attention layer ``layer``, as views of the weights.

    With ``grad=True`` the same views of the weights' ``.grad`` (``(None, None)`` before any backward); with
    ``pick`` the same views of ``pick(parameter)`` (a tensor of the parameter's shape, or None); with
    ``effective=True`` views of the effective weights ``W_0 + adapter deltas`` (new tensors: writing to them changes
    nothing).

    Sharded parameters (DTensor, e.g. FSDP2's ``fully_shard``) are all-gathered: the views are then of the full
    weight (differentiable; see ``distributed.full_tensor``), not of the parameter. To write through them, pass a
    dict as ``gathered`` (filled with ``{parameter: full weight}``) and call ``write_back(gathered)`` afterwards.
    """
    spec = handle.spec
    module = handle.attention_modules[layer]
    h, h_kv, d = head_counts(handle)
    if spec.layout not in ("linear", "conv1d_fused", "fused_qkv", "neox_interleaved"):
        raise UnsupportedArchitectureError(f"no Q/K layout {spec.layout!r} for model_type={spec.model_type!r}")
    if spec.layout == "linear":
        wq = _weight(module, spec.q_proj, grad, gathered, pick, effective)
        wk = _weight(module, spec.k_proj, grad, gathered, pick, effective)
        if wq is None or wk is None:
            return None, None
        if wq.dim() != 2 or wq.shape[0] != h * d:
            raise _layout_error(spec, spec.q_proj, wq, f"(H*D, E) = ({h * d}, E)")
        if wk.dim() != 2 or wk.shape[0] != h_kv * d:
            raise _layout_error(spec, spec.k_proj, wk, f"(H_kv*D, E) = ({h_kv * d}, E)")
        return wq.view(h, d, wq.shape[1]), wk.view(h_kv, d, wk.shape[1])
    w = _weight(module, spec.q_proj, grad, gathered, pick, effective)
    if w is None:
        return None, None
    if spec.layout == "conv1d_fused":
        e = w.shape[0]  # Conv1D stores (in, out): columns [Q | K | V], each E = H * D wide
        if w.dim() != 2 or w.shape[1] < e + h_kv * d or h * d > e:
            raise _layout_error(spec, spec.q_proj, w, f"(E, 3E) with E >= H*D = {h * d}")
        q = w[:, : h * d].t().view(h, d, e)
        k = w[:, e: e + h_kv * d].t().view(h_kv, d, e)
        return q, k
    if spec.layout == "fused_qkv":
        if w.dim() != 2 or w.shape[0] < h * d + h_kv * d:
            raise _layout_error(spec, spec.q_proj, w, f"at least H*D + H_kv*D = {h * d + h_kv * d} rows")
        e = w.shape[1]
        return w[: h * d].view(h, d, e), w[h * d: h * d + h_kv * d].view(h_kv, d, e)
    # neox_interleaved
    if w.dim() != 2 or w.shape[0] != 3 * h * d:
        raise _layout_error(spec, spec.q_proj, w, f"3*H*D = {3 * h * d} rows grouped per head as (H, 3, D)")
    e = w.shape[1]
    per_head = w.view(h, 3, d, e)  # rows grouped per head as [q_h | k_h | v_h]
    return per_head[:, 0], per_head[:, 1]


def write_back(gathered: dict) -> None:
    """Put the full weights ``qk_head_weights(..., gathered=...)`` handed out back into their sharded parameters."""
    for param, full in gathered.items():
        write_full_(param, full)


def _layout_error(spec, name: str, weight: torch.Tensor, expected: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"model_type={spec.model_type!r}: {name}.weight has shape {tuple(weight.shape)} but layout={spec.layout!r} "
        f"needs {expected}: check the register_localist_arch entry (layout, projection names, head-count attributes)"
    )


def kv_head_of(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """(H,) the key/value head each query head reads: ``kv(h) = h // (H / H_kv)`` (transformers' repeat_kv)."""
    return torch.arange(num_heads) // (num_heads // num_kv_heads)
