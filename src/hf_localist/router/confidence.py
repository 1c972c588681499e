"""Route only when confident: a calibrated threshold on the router's top probability (docs/router.md).

As in RouteLLM's calibrated routers, the threshold is chosen on labelled data for a target: here the accuracy of
the inputs that are routed. With ``p_i = max_m pi_m(x_i)`` and ``correct_i = [argmax_m pi_m(x_i) = y_i]``, the
threshold is the smallest ``tau`` among the observed ``p_i`` such that

    accuracy(tau) = sum_i correct_i [p_i >= tau] / sum_i [p_i >= tau] >= target_accuracy,

the largest coverage that meets the target. Inputs below it run on the base model alone (``chosen = BASE``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch

from ..errors import LocalistConfigError
from .recruit import check_labels, encode_inputs, features

logger = logging.getLogger(__name__)

#: ``RoutingDecision.chosen`` of an input that runs on the base model (its top probability below the threshold).
BASE = -1


def threshold_for_accuracy(top_prob: torch.Tensor, correct: torch.Tensor, target_accuracy: float) \
        -> tuple[float, float, float]:
    """(threshold, coverage, accuracy of the covered inputs) of the formula in the module docstring.

    If no threshold reaches the target, the threshold is just above the largest probability (coverage 0)."""
    order = top_prob.argsort(descending=True)
    p, c = top_prob[order], correct[order].float()
    acc = c.cumsum(0) / torch.arange(1, len(c) + 1, dtype=torch.float32)  # accuracy of the k most confident
    # Ties: a threshold p[k] covers every input with p >= p[k]; keep the last index of each run of equal values.
    last = torch.ones_like(p, dtype=torch.bool)
    last[:-1] = p[1:] != p[:-1]
    ok = ((acc >= target_accuracy) & last).nonzero().squeeze(1)
    if len(ok) == 0:
        return float(torch.nextafter(p[0], torch.tensor(2.0))), 0.0, float("nan")
    k = int(ok[-1])
    return float(p[k]), (k + 1) / len(p), float(acc[k])


def calibrate_confidence(router, data: Any, *, target_accuracy: float = 0.95, batch_size: int = 32) \
        -> dict[str, Any]:
    """Set ``router.config.confidence_threshold`` so that the routed inputs of ``data`` (texts or token ids with
    labels naming specialists; held out from the router's fit) reach ``target_accuracy``. Returns the numbers."""
    if not isinstance(target_accuracy, (int, float)) or not 0 < target_accuracy <= 1:
        raise LocalistConfigError(f"target_accuracy={target_accuracy!r} must be in (0, 1]")
    if not int(router.router_fitted):
        raise LocalistConfigError("calibrate_confidence needs a fitted router: call fit_router or "
                                  "init_router_from_prompts first")
    seqs, labels = encode_inputs(router, data, need_labels=True)
    y = torch.tensor(check_labels(router, labels, "the calibration data"))
    with torch.no_grad():
        probs = router.router_logits_from_features(features(router, seqs, batch_size)).softmax(-1)
    top = probs.max(-1)
    tau, coverage, accuracy = threshold_for_accuracy(top.values, top.indices == y, float(target_accuracy))
    router.config.confidence_threshold = min(tau, 1.0)
    result = {"event": "calibrate_confidence", "n": len(y), "target_accuracy": float(target_accuracy),
              "threshold": router.config.confidence_threshold, "coverage": coverage, "accuracy": accuracy,
              "accuracy_all": float((top.indices == y).float().mean())}
    logger.info(json.dumps(result))
    return result
