"""Tests for hf_localist.theory: the bounds hold on real softmaxes, are tight, and validate their inputs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hf_localist import theory as T
from hf_localist.errors import LocalistConfigError, LocalistError

# --------------------------------------------------------------------------------------------------
# Property tests: the bounds hold for the true softmax of random logits.
# --------------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    """Random logits, anchor set and temperature; anchors are lifted by a random shift so both signs of
    the margin (and tight/loose regimes) are exercised."""
    n = draw(st.integers(2, 64))
    a = draw(st.integers(1, n - 1))
    logits = draw(arrays(np.float64, n, elements=st.floats(-30, 30, allow_nan=False, allow_infinity=False)))
    anchors = draw(st.permutations(range(n)))[:a]
    mask = np.zeros(n, dtype=bool)
    mask[list(anchors)] = True
    logits = logits + mask * draw(st.floats(0, 40))
    tau = draw(st.floats(0.05, 20))
    return torch.from_numpy(logits), torch.from_numpy(mask), tau


def _measure(logits, mask, tau):
    probs = torch.softmax(logits / tau, dim=-1)
    return probs, float(T.margin(logits, mask)), logits.numel(), int(mask.sum())


@settings(deadline=None, max_examples=200)
@given(attention_cases())
def test_pointer_fidelity_bound_holds(case):
    logits, mask, tau = case
    probs, delta, n, a = _measure(logits, mask, tau)
    pf = float(T.pointer_fidelity(probs, mask))
    assert pf >= 1 - T.leak(tau, delta, n, a) - 1e-6
    assert pf >= T.pointer_fidelity_bound(tau, delta, n, a) - 1e-6


@settings(deadline=None, max_examples=200)
@given(attention_cases())
def test_entropy_bound_holds(case):
    logits, mask, tau = case
    probs, delta, n, a = _measure(logits, mask, tau)
    assert float(T.attention_entropy(probs)) <= T.entropy_bound(tau, delta, n, a) + 1e-6


@settings(deadline=None, max_examples=200)
@given(attention_cases())
def test_leak_below_leak_upper(case):
    logits, mask, tau = case
    _, delta, n, a = _measure(logits, mask, tau)
    assert T.leak(tau, delta, n, a) <= T.leak_upper(tau, delta, n, a) * (1 + 1e-12)


@settings(deadline=None, max_examples=100)
@given(attention_cases())
def test_measurements_match_naive_formulas(case):
    logits, mask, tau = case
    probs = torch.softmax(logits / tau, dim=-1)
    naive_delta = float(logits[mask].min() - logits[~mask].max())
    assert float(T.margin(logits, mask)) == naive_delta
    p = probs.numpy()
    assert float(T.attention_entropy(probs)) == pytest.approx(-sum(x * math.log(x) for x in p if x > 0), abs=1e-9)
    assert float(T.pointer_fidelity(probs, mask)) == pytest.approx(p[mask.numpy()].sum(), abs=1e-12)


# --------------------------------------------------------------------------------------------------
# Tightness and closed forms.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,a", [(2, 1), (10, 3), (64, 1), (64, 63), (7, 7)])
@pytest.mark.parametrize("delta", [0.0, 0.3, 2.5, 11.0])
@pytest.mark.parametrize("tau", [0.1, 1.0, 4.0])
def test_bounds_attained_by_tied_logits(n, a, delta, tau):
    m = -1.7
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:a] = True
    logits = torch.full((n,), m, dtype=torch.float64)
    logits[mask] = m + delta
    probs = torch.softmax(logits / tau, dim=-1)
    measured = float(T.margin(logits, mask))
    assert measured == pytest.approx(delta, abs=1e-12) or (a == n and measured == math.inf)
    assert float(T.pointer_fidelity(probs, mask)) == pytest.approx(1 - T.leak(tau, delta, n, a), abs=1e-9)
    pf_bound = T.pointer_fidelity_bound(tau, delta, n, a)
    assert float(T.pointer_fidelity(probs, mask)) == pytest.approx(pf_bound, abs=1e-9)
    assert float(T.attention_entropy(probs)) == pytest.approx(T.entropy_bound(tau, delta, n, a), abs=1e-9)


def test_pointer_fidelity_bound_tight_for_negative_margin():
    n, a, delta, tau = 9, 4, -1.3, 0.7
    mask = torch.arange(n) < a
    logits = torch.zeros(n, dtype=torch.float64)
    logits[mask] = delta
    probs = torch.softmax(logits / tau, dim=-1)
    bound = T.pointer_fidelity_bound(tau, delta, n, a)
    assert float(T.pointer_fidelity(probs, mask)) == pytest.approx(bound, abs=1e-12)


def test_entropy_bound_is_log_n_for_negative_margin_and_raw_formula_would_fail():
    # Why entropy_bound clamps delta at 0: with delta < 0 the paper's expression evaluated at the worst-case
    # leak is below the entropy of some configurations with that very margin.
    n, a, delta, tau = 4, 2, -1e-3, 1.0
    assert T.entropy_bound(tau, delta, n, a) == pytest.approx(math.log(n), abs=1e-15)
    logits = torch.tensor([delta, 0.0, 0.0, 0.0], dtype=torch.float64)  # anchors 0, 1; margin = delta
    mask = torch.tensor([True, True, False, False])
    assert float(T.margin(logits, mask)) == delta
    h = float(T.attention_entropy(torch.softmax(logits / tau, -1)))
    lk = T.leak(tau, delta, n, a)
    raw = T.binary_entropy(lk) + (1 - lk) * math.log(a) + lk * math.log(n - a)
    assert raw < h <= T.entropy_bound(tau, delta, n, a)


def test_closed_forms_on_hand_computed_values():
    assert T.leak(1.0, 0.0, 10, 2) == pytest.approx(0.8)
    assert T.leak_upper(1.0, 0.0, 10, 2) == pytest.approx(4.0)
    assert T.leak(2.0, 2.0, 3, 1) == pytest.approx(2 * math.exp(-1) / (1 + 2 * math.exp(-1)))
    assert T.pointer_fidelity_bound(2.0, 2.0, 3, 1) == pytest.approx(1 / (1 + 2 * math.exp(-1)))
    assert T.leak(1.0, 5.0, 4, 4) == 0.0 and T.leak_upper(1.0, -5.0, 4, 4) == 0.0
    assert T.entropy_bound(1.0, 3.0, 6, 6) == pytest.approx(math.log(6))
    assert T.entropy_bound(1.0, 0.0, 6, 2) == pytest.approx(math.log(6))  # zero margin: uniform is feasible
    assert T.binary_entropy(0.5) == pytest.approx(math.log(2))
    assert T.binary_entropy(0.0) == 0.0 and T.binary_entropy(1.0) == 0.0
    assert T.binary_entropy(0.1) == pytest.approx(-0.1 * math.log(0.1) - 0.9 * math.log(0.9))


# --------------------------------------------------------------------------------------------------
# lambda_threshold and p_max.
# --------------------------------------------------------------------------------------------------


def test_lambda_threshold_value():
    # 2 * 1.5 * 2 * 0.5 * sqrt(16) / (0.5 * (1 - 0.25)) * exp(-1 / 0.5) = 12 / 0.375 * e^-2 = 32 e^-2
    got = T.lambda_threshold(L_l=1.5, R_x=2.0, sigma_X=0.5, X_size=16, tau=0.5, rho_max=0.25, delta=1.0)
    assert got == pytest.approx(32 * math.exp(-2), rel=1e-12)


def test_lambda_threshold_monotonicity():
    base = dict(L_l=1.0, R_x=2.0, sigma_X=0.3, X_size=10, tau=0.8, rho_max=0.5, delta=0.0)
    deltas = np.linspace(-5, 20, 101)
    vals = T.lambda_threshold(**{**base, "delta": deltas})
    assert isinstance(vals, np.ndarray) and np.all(np.diff(vals) < 0)
    sizes = np.arange(1, 200)
    assert np.all(np.diff(T.lambda_threshold(**{**base, "X_size": sizes})) > 0)
    rhos = np.linspace(0, 0.99, 100)
    assert np.all(np.diff(T.lambda_threshold(**{**base, "rho_max": rhos})) > 0)
    t = T.lambda_threshold(**{**base, "delta": torch.tensor([0.0, 1.0], dtype=torch.float64)})
    assert isinstance(t, torch.Tensor) and t[0] > t[1]


@pytest.mark.parametrize(
    "n,h_min,theta,expected",
    [
        (8, 0.0, math.log(2), 3),  # ln 8 / ln 2 = 3 exactly: round-off must not give 4
        (8, 0.0, 1.0, 3),  # ceil(2.079)
        (100, 1.0, 0.5, 8),  # ceil((4.605 - 1) / 0.5) = ceil(7.21)
        (1, 0.0, 0.3, 0),  # ln 1 = 0
        (10, math.log(10), 0.1, 0),  # H_min == ln N
        (10, 5.0, 0.1, 0),  # H_min > ln N
        (math.e**2, 0.5, 0.5, 3),  # (2 - 0.5) / 0.5 = 3
    ],
)
def test_p_max_hand_computed(n, h_min, theta, expected):
    got = T.p_max(n, h_min, theta)
    assert got == expected and isinstance(got, int)


def test_p_max_arrays():
    assert T.p_max(np.array([8, 100, 1]), 0.0, 1.0).tolist() == [3, 5, 0]
    t = T.p_max(torch.tensor([8.0, 100.0]), 1.0, 0.5)
    assert t.dtype == torch.int64 and t.tolist() == [3, 8]


# --------------------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------------------

_OK = dict(tau=1.0, delta=0.5, N=8, A=2)
_LAMBDA_OK = dict(L_l=1.0, R_x=1.0, sigma_X=1.0, X_size=4, tau=1.0, rho_max=0.5, delta=0.0)
_BOUNDS = [T.leak, T.leak_upper, T.pointer_fidelity_bound, T.entropy_bound]


@pytest.mark.parametrize(
    "fn,kwargs,name",
    [(fn, {**_OK, **bad}, name) for fn in _BOUNDS for bad, name in [
        ({"tau": 0.0}, "tau"), ({"tau": -1.0}, "tau"), ({"N": 0}, "N"), ({"A": 0}, "A"), ({"A": 9}, "A"),
        ({"delta": float("nan")}, "delta"), ({"tau": np.array([1.0, -2.0])}, "tau"),
        ({"A": torch.tensor([1.0, 20.0])}, "A"),
    ]]
    + [(T.lambda_threshold, {**_LAMBDA_OK, name: value}, name) for name, value in [
        ("rho_max", 1.0), ("rho_max", -0.1), ("rho_max", 1.5), ("L_l", -1.0), ("R_x", -1.0),
        ("sigma_X", -0.5), ("X_size", -1), ("tau", 0.0),
    ]]
    + [
        (T.p_max, dict(N=8, H_min=0.0, theta_H=0.0), "theta_H"),
        (T.p_max, dict(N=8, H_min=0.0, theta_H=-1.0), "theta_H"),
        (T.p_max, dict(N=0, H_min=0.0, theta_H=1.0), "N"),
        (T.p_max, dict(N=8, H_min=-1.0, theta_H=1.0), "H_min"),
        (T.binary_entropy, dict(p=1.5), "p"),
        (T.binary_entropy, dict(p=-0.1), "p"),
    ],
)
def test_validation_errors(fn, kwargs, name):
    with pytest.raises(LocalistConfigError) as info:
        fn(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, LocalistError)
    assert str(info.value).startswith(f"{name} must")
    assert "got" in str(info.value)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: T.margin(torch.zeros(4), torch.zeros(4)), "anchor_mask"),  # not bool
        (lambda: T.margin(torch.zeros(4), torch.zeros(3, dtype=torch.bool)), "anchor_mask"),
        (lambda: T.margin(torch.zeros(4), torch.ones(4, dtype=torch.bool), torch.ones(4)), "valid_mask"),
        (lambda: T.margin(torch.zeros(0), torch.zeros(0, dtype=torch.bool)), "logits"),
        (lambda: T.attention_entropy(torch.ones(4) / 4, exclude=torch.zeros(5, dtype=torch.bool)), "exclude"),
        (lambda: T.pointer_fidelity(torch.ones(4) / 4, None), "anchor_mask"),
    ],
)
def test_measurement_validation(call, name):
    with pytest.raises(LocalistConfigError, match=f"^{name} must"):
        call()


# --------------------------------------------------------------------------------------------------
# Numerical robustness and array kinds.
# --------------------------------------------------------------------------------------------------


def test_huge_margin_gives_exact_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for tau, delta in [(1.0, 1e4), (0.01, 100.0), (1e-3, 10.0)]:
            assert T.leak(tau, delta, 1000, 1) == 0.0
            assert T.leak_upper(tau, delta, 1000, 1) == 0.0
            assert T.pointer_fidelity_bound(tau, delta, 1000, 1) == 1.0
            assert T.entropy_bound(tau, delta, 1000, 1) == 0.0
            assert T.lambda_threshold(1.0, 1.0, 1.0, 4, tau, 0.5, delta) == 0.0
        arr = T.leak(1.0, np.array([1e4, math.inf, -1e4, -math.inf]), 10, 3)
        assert arr.tolist() == [0.0, 0.0, 1.0, 1.0]
        ten = T.leak(torch.tensor(1.0), torch.tensor([1e4, -1e4]), 10, 3)
        assert ten.tolist() == [0.0, 1.0] and torch.isfinite(ten).all()
        assert T.leak_upper(1.0, -1e4, 10, 3) == math.inf  # vacuous, but honest, and no overflow warning
        assert T.entropy_bound(1.0, -1e4, 10, 3) == pytest.approx(math.log(10))


def test_negative_margins():
    lk = T.leak(1.0, -2.0, 5, 1)
    assert lk == pytest.approx(4 * math.exp(2) / (1 + 4 * math.exp(2)))
    assert T.pointer_fidelity_bound(1.0, -2.0, 5, 1) == pytest.approx(1 - lk)
    assert T.leak_upper(1.0, -2.0, 5, 1) == pytest.approx(4 * math.exp(2))
    assert 0 < T.entropy_bound(0.5, -2.0, 5, 1) <= math.log(5) + 1e-12


def test_return_kinds_and_broadcasting():
    assert type(T.leak(1, 1, 4, 1)) is float
    out = T.leak(np.array([0.5, 1.0, 2.0])[:, None], np.array([0.0, 1.0]), 16, 4)
    assert isinstance(out, np.ndarray) and out.shape == (3, 2)
    t = T.entropy_bound(torch.tensor([0.5, 1.0], dtype=torch.float32), 1.0, 16, torch.tensor([[1], [4]]))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (2, 2)
    assert T.binary_entropy(torch.tensor([0.0, 0.5, 1.0])).tolist() == pytest.approx([0.0, math.log(2), 0.0])


def test_margin_masks_and_batches():
    inf = math.inf
    logits = torch.tensor([[1.0, 2.0, -inf, 0.5], [3.0, 0.0, 0.0, 0.0]])
    anchor = torch.tensor([True, False, False, False])
    assert T.margin(logits, anchor).tolist() == [-1.0, 3.0]
    valid = torch.tensor([True, False, True, True])
    assert T.margin(logits, anchor, valid).tolist() == [0.5, 3.0]
    assert T.margin(logits, torch.ones(4, dtype=torch.bool)).tolist() == [inf, inf]  # nothing can leak
    assert T.margin(logits, torch.tensor([False, False, True, False])).tolist() == [-inf, -3.0]  # masked anchor
    out = T.margin(logits.numpy(), anchor.numpy())
    assert isinstance(out, np.ndarray) and out.tolist() == [-1.0, 3.0]


def test_entropy_and_fidelity_exclude_sink():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    sink = torch.tensor([True, False, False, False])
    anchor = torch.tensor([False, True, False, False])
    assert T.attention_entropy(probs, exclude=sink)[0].item() == pytest.approx(math.log(2))
    assert T.attention_entropy(probs)[0].item() == pytest.approx(1.5 * math.log(2))
    assert T.pointer_fidelity(probs, anchor, exclude=sink)[0].item() == pytest.approx(0.5)
    assert T.pointer_fidelity(probs, anchor)[0].item() == pytest.approx(0.25)
    # All mass on the sink: nothing left to renormalise, reported as NaN rather than a silent 0.
    assert math.isnan(T.attention_entropy(probs, exclude=sink)[1].item())
    assert math.isnan(T.pointer_fidelity(probs, anchor, exclude=sink)[1].item())
    valid = torch.tensor([True, True, True, False])
    assert T.attention_entropy(probs, valid_mask=valid)[1].item() == 0.0
