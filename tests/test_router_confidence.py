"""Route only when confident (hf_localist.router.confidence): the calibrated threshold and the base fallback."""

from __future__ import annotations

import pytest
import torch
from helpers import make_router, random_ids

from hf_localist import LocalistConfigError
from hf_localist.router.confidence import BASE, threshold_for_accuracy


def test_threshold_is_the_largest_coverage_that_meets_the_target():
    p = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([1, 1, 0, 1, 0, 0]).bool()
    # accuracies of the k most confident: 1, 1, 2/3, 3/4, 3/5, 1/2; the tie at 0.8 cannot be split
    assert threshold_for_accuracy(p, correct, 0.75) == pytest.approx((0.7, 4 / 6, 0.75))
    assert threshold_for_accuracy(p, correct, 1.0) == pytest.approx((0.9, 1 / 6, 1.0))
    assert threshold_for_accuracy(p, correct, 0.5) == pytest.approx((0.5, 1.0, 0.5))
    tau, coverage, _ = threshold_for_accuracy(p, torch.zeros(6, dtype=torch.bool), 0.9)
    assert tau > 0.9 and coverage == 0.0  # nothing is accurate enough: every input goes to the base


def test_below_threshold_inputs_run_on_the_base_alone(zoo):
    router = make_router(zoo)
    x = random_ids(6, 8, seed=4)
    with torch.no_grad():
        probs = router(x).router_probs
        top = probs.max(-1).values
        tau = float(top.median())
        out = router(x, confidence_threshold=tau)
        low = top < tau
        assert bool(low.any()) and bool((~low).any())
        assert out.chosen[low, 0].tolist() == [BASE] * int(low.sum())
        with router.base_only() as base:
            base_logits = base(input_ids=x[low]).logits
        torch.testing.assert_close(out.logits[low], base_logits, atol=1e-9, rtol=0)
        routed = router(x, confidence_threshold=0.0)
        torch.testing.assert_close(out.logits[~low], routed.logits[~low], atol=1e-9, rtol=0)
        # generate follows the same decision: the base's own greedy continuation for the low-confidence inputs
        gen = router.generate(x, confidence_threshold=tau, max_new_tokens=3)
        with router.base_only() as base:
            ref = base.generate(input_ids=x[low], attention_mask=torch.ones_like(x[low]), max_new_tokens=3,
                                do_sample=False)
        assert torch.equal(gen[low, : ref.shape[1]], ref)


def test_calibrate_confidence_sets_the_config_and_refuses_bad_input(zoo):
    router = make_router(zoo)
    names = router.specialist_names
    data = []
    for i, n in enumerate(names):
        for j in range(4):
            ids = random_ids(1, 8, seed=50 + 4 * i + j)[0]
            ids[1::2] = 10 + 30 * i  # each domain shares content: the router can tell them apart
            data.append((ids.tolist(), n))
    router.fit_router(data, steps=100)
    result = router.calibrate_confidence(data, target_accuracy=0.9)
    assert result["threshold"] == router.config.confidence_threshold
    assert result["coverage"] > 0 and result["accuracy"] >= 0.9
    with pytest.raises(LocalistConfigError, match="target_accuracy"):
        router.calibrate_confidence(data, target_accuracy=1.5)
    with pytest.raises(LocalistConfigError, match="confidence_threshold"):
        router(random_ids(1, 8, seed=1), confidence_threshold=-0.1)
    with pytest.raises(LocalistConfigError, match="name no specialist"):
        router.calibrate_confidence([(data[0][0], "nobody")])
