"""The paper's bounds as executable functions, plus the tensor measurements they are checked against.

All quantities are in nats.  Notation: ``N`` valid key positions, anchor set size ``A`` (1 <= A <= N),
margin ``delta`` = min anchor logit - max logit outside the anchors (before temperature, may be negative)
and temperature ``tau > 0`` (``tau = 1 / scaling``).

The bound functions accept Python numbers, numpy arrays or torch tensors (elementwise, with broadcasting)
and return the same kind: a ``float`` for scalars, an ``ndarray`` for numpy input, a tensor (on the first
tensor's device, in its floating dtype) when any argument is a tensor.  Everything is computed in log /
logistic form so that huge margins give exactly 0 and never NaN, and without numpy floating-point warnings.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from hf_localist.errors import LocalistConfigError

__all__ = [
    "leak",
    "leak_upper",
    "pointer_fidelity_bound",
    "entropy_bound",
    "binary_entropy",
    "lambda_threshold",
    "p_max",
    "margin",
    "attention_entropy",
    "pointer_fidelity",
]


# --------------------------------------------------------------------------------------------------
# Array-kind plumbing: one implementation per formula, run on torch or numpy through a tiny namespace.
# --------------------------------------------------------------------------------------------------


def _np_sigmoid(x: np.ndarray) -> np.ndarray:
    # exp(-|x|) never overflows, so both branches are finite; sigmoid(+-inf) is exactly 1 / 0.
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def _np_xlogy(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # x * log(y) with the convention 0 * log(0) = 0; the inner `where` keeps log() off zeros (no warning).
    return np.where(x == 0, 0.0, x * np.log(np.where(x == 0, 1.0, y)))


_TORCH_OPS = SimpleNamespace(
    log=torch.log, exp=torch.exp, sqrt=torch.sqrt, where=torch.where, sigmoid=torch.sigmoid,
    xlogy=torch.special.xlogy, isnan=torch.isnan, relu=torch.relu,
)
_NUMPY_OPS = SimpleNamespace(
    log=np.log, exp=np.exp, sqrt=np.sqrt, where=np.where, sigmoid=_np_sigmoid,
    xlogy=_np_xlogy, isnan=np.isnan, relu=lambda x: np.maximum(x, 0.0),
)


def _convert(*values: Any) -> tuple[str, SimpleNamespace, list[Any]]:
    """Bring all arguments to one array kind: ``"torch"``, ``"numpy"`` or ``"scalar"`` (0-d float64 numpy)."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if tensors:
        floating = [t.dtype for t in tensors if t.is_floating_point()]
        dtype = floating[0] if floating else torch.get_default_dtype()
        for d in floating[1:]:
            dtype = torch.promote_types(dtype, d)
        device = tensors[0].device
        return "torch", _TORCH_OPS, [torch.as_tensor(v, dtype=dtype, device=device) for v in values]
    kind = "numpy" if any(isinstance(v, (np.ndarray, list, tuple)) for v in values) else "scalar"
    # float64 for numpy/scalars: these are analysis functions, precision matters more than memory.
    return kind, _NUMPY_OPS, [np.asarray(v, dtype=np.float64) for v in values]


def _finish(kind: str, result: Any) -> Any:
    if kind == "scalar":
        return float(result)
    if kind == "numpy":
        return np.asarray(result)
    return result


def _first(value: Any, bad: Any) -> Any:
    """The first entry of ``value`` (broadcast to ``bad``'s shape) where ``bad`` is True, as a Python number."""
    broadcast = torch.broadcast_to if isinstance(bad, torch.Tensor) else np.broadcast_to
    return broadcast(value, bad.shape)[bad].reshape(-1)[0].item()


def _require(name: str, value: Any, ok: Any, requirement: str, fix: str) -> None:
    """Raise :class:`LocalistConfigError` naming ``name`` and its first bad entry unless ``ok`` holds everywhere."""
    bad = ~ok
    if not bool(bad.any()):
        return
    first = _first(value, bad)
    total = bad.numel() if isinstance(bad, torch.Tensor) else bad.size
    where = f" ({int(bad.sum())} of {total} entries are bad)" if total > 1 else ""
    raise LocalistConfigError(f"{name} must be {requirement}, got {first!r}{where}. {fix}")


def _check_tau(tau: Any) -> None:
    _require("tau", tau, tau > 0, "> 0 (tau = 1/scaling)", "Pass a positive temperature, e.g. tau=1.0.")


def _check_counts(N: Any, A: Any) -> None:
    _require("N", N, N >= 1, ">= 1 (the number of visible key positions)", "Pass the count of valid keys.")
    _require("A", A, A >= 1, ">= 1 (the anchor set size)", "Every query needs at least one anchor key.")
    too_big = A > N
    if bool(too_big.any()):
        # Name both values of the first offending pair: "A=5 with N=3" says more than "A=5".
        raise LocalistConfigError(
            f"A must be <= N (the anchors are a subset of the N visible keys), got A={_first(A, too_big)!r} "
            f"with N={_first(N, too_big)!r}. Count only anchors among the visible keys, or raise N."
        )


def _check_delta(delta: Any, ops: SimpleNamespace) -> None:
    _require("delta", delta, ~ops.isnan(delta), "a number (not NaN)",
             "Check the logits the margin was measured on; +-inf margins are allowed.")


def _log_odds(tau: Any, delta: Any, N: Any, A: Any, ops: SimpleNamespace) -> Any:
    """``x = ln((N-A)/A) - delta/tau`` so that ``leak = sigmoid(x)``; ``-inf`` where ``N == A`` (nothing leaks)."""
    has_outside = N > A
    # log() only sees N-A > 0 where it is used; the placeholder 1 keeps ln(0) (and its warning/NaN grad) out.
    log_ratio = ops.log(ops.where(has_outside, N - A, 1.0)) - ops.log(A)
    return ops.where(has_outside, log_ratio - delta / tau, -math.inf)


def _prepare_bound(tau: Any, delta: Any, N: Any, A: Any) -> tuple[str, SimpleNamespace, list[Any]]:
    kind, ops, (tau, delta, N, A) = _convert(tau, delta, N, A)
    _check_tau(tau)
    _check_counts(N, A)
    _check_delta(delta, ops)
    return kind, ops, [tau, delta, N, A]


# --------------------------------------------------------------------------------------------------
# Bounds.
# --------------------------------------------------------------------------------------------------


def leak(tau: Any, delta: Any, N: Any, A: Any) -> Any:
    """Worst-case softmax mass outside the anchors given the margin (exact, attained when ties are tight).

    ``leak = (N-A) e^(-delta/tau) / (A + (N-A) e^(-delta/tau)) = sigmoid(ln((N-A)/A) - delta/tau)``.
    The logistic form is what we evaluate: it is 0.0 (not NaN) for huge margins and 1.0 for ``delta = -inf``.
    """
    kind, ops, (tau, delta, N, A) = _prepare_bound(tau, delta, N, A)
    return _finish(kind, ops.sigmoid(_log_odds(tau, delta, N, A, ops)))


def leak_upper(tau: Any, delta: Any, N: Any, A: Any) -> Any:
    """The looser closed form ``((N-A)/A) e^(-delta/tau) >= leak`` (may be ``inf`` for very negative margins)."""
    kind, ops, (tau, delta, N, A) = _prepare_bound(tau, delta, N, A)
    with np.errstate(over="ignore"):  # a vacuous bound overflowing to +inf is the correct answer, not a warning
        return _finish(kind, ops.exp(_log_odds(tau, delta, N, A, ops)))


def pointer_fidelity_bound(tau: Any, delta: Any, N: Any, A: Any) -> Any:
    """Lower bound on the anchor mass: ``PF_t >= 1 - leak = sigmoid(delta/tau - ln((N-A)/A))``.

    Evaluated as the complementary logistic rather than ``1 - leak`` to keep precision when leak ~ 1.
    """
    kind, ops, (tau, delta, N, A) = _prepare_bound(tau, delta, N, A)
    return _finish(kind, ops.sigmoid(-_log_odds(tau, delta, N, A, ops)))


def entropy_bound(tau: Any, delta: Any, N: Any, A: Any) -> Any:
    """Upper bound on the attention entropy: ``H_t <= h_b(l) + (1 - l) ln A + l ln(N - A)``.

    ``h_b`` is the binary entropy (nats, 0 ln 0 = 0); the last term is 0 when ``N == A``.  Here
    ``l = leak(tau, max(delta, 0), N, A)``.  Why the clamp: the right-hand side, as a function of the anchor
    mass ``s = 1 - l``, peaks at ``s = A/N`` with value ``ln N``.  For ``delta >= 0`` the worst-case anchor mass
    is ``>= A/N`` and the expression is decreasing on the feasible range, so the paper's formula holds as is.
    For ``delta < 0`` the feasible range contains ``A/N`` and the unclamped formula can be exceeded (see the
    tests); clamping gives the tight-over-the-range value ``ln N`` there.
    """
    kind, ops, (tau, delta, N, A) = _prepare_bound(tau, delta, N, A)
    x = _log_odds(tau, ops.relu(delta), N, A, ops)
    leak_mass, s = ops.sigmoid(x), ops.sigmoid(-x)  # s = 1 - leak_mass computed without cancellation
    h_b = -(ops.xlogy(leak_mass, leak_mass) + ops.xlogy(s, s))
    outside = ops.where(N > A, leak_mass * ops.log(ops.where(N > A, N - A, 1.0)), 0.0)
    return _finish(kind, h_b + s * ops.log(A) + outside)


def binary_entropy(p: Any) -> Any:
    """``h_b(p) = -p ln p - (1-p) ln(1-p)`` in nats, with ``0 ln 0 = 0`` (so ``h_b(0) = h_b(1) = 0``)."""
    kind, ops, (p,) = _convert(p)
    _require("p", p, (p >= 0) & (p <= 1), "a probability in [0, 1]", "Clamp or renormalise the input.")
    return _finish(kind, -(ops.xlogy(p, p) + ops.xlogy(1.0 - p, 1.0 - p)))


def lambda_threshold(L_l: Any, R_x: Any, sigma_X: Any, X_size: Any, tau: Any, rho_max: Any, delta: Any) -> Any:
    """``lambda* = 2 L_l R_x sigma_X sqrt(X_size) / (tau (1 - rho_max)) * exp(-delta/tau)``.

    Decreasing in ``delta`` (a bigger margin needs less regularisation), increasing in ``X_size`` and ``rho_max``.
    """
    kind, ops, (L_l, R_x, sigma_X, X_size, tau, rho_max, delta) = _convert(
        L_l, R_x, sigma_X, X_size, tau, rho_max, delta
    )
    for name, value in (("L_l", L_l), ("R_x", R_x), ("sigma_X", sigma_X), ("X_size", X_size)):
        _require(name, value, value >= 0, ">= 0", f"{name} is a size/Lipschitz constant; pass a non-negative value.")
    _check_tau(tau)
    _require("rho_max", rho_max, (rho_max >= 0) & (rho_max < 1), "in [0, 1)",
             "rho_max is a contraction factor; values >= 1 make the bound vacuous.")
    _check_delta(delta, ops)
    prefactor = 2.0 * L_l * R_x * sigma_X * ops.sqrt(X_size) / (tau * (1.0 - rho_max))
    with np.errstate(over="ignore", invalid="ignore"):  # inf for delta -> -inf is the right answer
        value = prefactor * ops.exp(-delta / tau)
    # A zero prefactor means no regularisation is needed whatever the margin (avoid 0 * inf = NaN).
    return _finish(kind, ops.where(prefactor == 0, 0.0, value))


def p_max(N: Any, H_min: Any, theta_H: Any) -> Any:
    """``p_max = max(0, ceil((ln N - H_min) / theta_H))``: an ``int`` (integer array/tensor for array input).

    Computed in float64; a relative slack of 1e-12 is removed before the ceiling so that quotients that are
    integers in exact arithmetic (e.g. ``ln 8 / ln 2``) are not bumped up by round-off.
    """
    kind, ops, (N, H_min, theta_H) = _convert(N, H_min, theta_H)
    if kind == "torch":
        N, H_min, theta_H = N.double(), H_min.double(), theta_H.double()
    _require("N", N, N >= 1, ">= 1 (the number of visible key positions)", "Pass the count of valid keys.")
    _require("H_min", H_min, H_min >= 0, ">= 0 (an entropy in nats)", "Pass a non-negative entropy floor.")
    _require("theta_H", theta_H, theta_H > 0, "> 0 (the entropy drop per step)", "Pass a positive theta_H.")
    q = (ops.log(N) - H_min) / theta_H
    q = q - 1e-12 * ops.where(abs(q) > 1, abs(q), 1.0)
    if kind == "torch":
        return torch.ceil(q).clamp_min(0).to(torch.int64)
    result = np.maximum(np.ceil(q), 0).astype(np.int64)
    return int(result) if kind == "scalar" else result


# --------------------------------------------------------------------------------------------------
# Measurements on attention logits / probabilities (last dim = keys; leading dims = queries, heads, batch).
# --------------------------------------------------------------------------------------------------


def _as_float_tensor(name: str, x: Any) -> tuple[torch.Tensor, bool]:
    was_numpy = isinstance(x, np.ndarray)
    t = torch.as_tensor(x)
    if t.dim() == 0 or t.shape[-1] == 0:
        raise LocalistConfigError(
            f"{name} must have a non-empty last dimension (the keys), got shape {tuple(t.shape)}. "
            "Pass one row of attention per query."
        )
    return (t if t.is_floating_point() else t.to(torch.get_default_dtype())), was_numpy


def _as_mask(name: str, mask: Any, like: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask, device=like.device)
    if m.dtype != torch.bool:
        raise LocalistConfigError(f"{name} must be a bool mask, got dtype {m.dtype}. Pass e.g. `{name}.bool()`.")
    try:
        torch.broadcast_shapes(m.shape, like.shape)
    except RuntimeError:
        raise LocalistConfigError(
            f"{name} must broadcast against shape {tuple(like.shape)}, got shape {tuple(m.shape)}. "
            "Align it with the keys on the last dimension."
        ) from None
    return m


def _back(t: torch.Tensor, was_numpy: bool) -> Any:
    return t.detach().cpu().numpy() if was_numpy else t


def margin(logits: Any, anchor_mask: Any, valid_mask: Any = None) -> Any:
    """``delta = min_{anchors} logits - max_{valid non-anchors} logits`` over the last dim (keys).

    Keys with logit ``-inf`` (already masked additively) count as invalid, as do keys where ``valid_mask`` is
    False; anchors outside the valid keys are ignored.  No valid non-anchor key gives ``+inf`` (nothing can
    leak); no valid anchor gives ``-inf`` (nothing to point at, leak = 1).
    """
    x, was_numpy = _as_float_tensor("logits", logits)
    anchor = _as_mask("anchor_mask", anchor_mask, x)
    valid = _as_mask("valid_mask", valid_mask, x)
    if anchor is None:
        raise LocalistConfigError("anchor_mask must be a bool mask, got None. Mark the anchor keys with True.")
    valid = x != -math.inf if valid is None else valid & (x != -math.inf)
    anchors, others = anchor & valid, ~anchor & valid
    lowest_anchor = torch.where(anchors, x, math.inf).amin(-1)
    highest_other = torch.where(others, x, -math.inf).amax(-1)
    delta = torch.where(others.any(-1), lowest_anchor - highest_other, math.inf)
    return _back(torch.where(anchors.any(-1), delta, -math.inf), was_numpy)


def _kept(p: torch.Tensor, valid_mask: Any, exclude: Any) -> torch.Tensor:
    """Zero the invalid / excluded keys (e.g. the attention sink) so that a later division renormalises."""
    valid = _as_mask("valid_mask", valid_mask, p)
    excl = _as_mask("exclude", exclude, p)
    if valid is not None:
        p = torch.where(valid, p, 0.0)
    if excl is not None:
        p = torch.where(excl, 0.0, p)
    return p


def attention_entropy(probs: Any, valid_mask: Any = None, exclude: Any = None) -> Any:
    """``H = -sum_k q_k ln q_k`` (nats) with ``q = p * keep / sum(p * keep)``, ``keep = valid & ~exclude``.

    ``0 ln 0 = 0``.  A row with no kept mass (all attention on excluded keys) has no defined distribution and
    gives NaN, so that averages must skip it explicitly (``nanmean``) instead of being silently biased.
    """
    p, was_numpy = _as_float_tensor("probs", probs)
    p = _kept(p, valid_mask, exclude)
    q = p / p.sum(-1, keepdim=True)
    return _back(-torch.special.xlogy(q, q).sum(-1), was_numpy)


def pointer_fidelity(probs: Any, anchor_mask: Any, exclude: Any = None) -> Any:
    """``PF = sum_{anchors, not excluded} p / sum_{not excluded} p`` over the last dim (NaN if nothing is kept)."""
    p, was_numpy = _as_float_tensor("probs", probs)
    anchor = _as_mask("anchor_mask", anchor_mask, p)
    if anchor is None:
        raise LocalistConfigError("anchor_mask must be a bool mask, got None. Mark the anchor keys with True.")
    p = _kept(p, None, exclude)
    return _back(torch.where(anchor, p, 0.0).sum(-1) / p.sum(-1), was_numpy)
