"""Shared computation of the shipped metric modules (imported by them as ``hf_localist.metrics._common``)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .. import theory
from ..errors import LocalistConfigError

KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): attention probabilities, one row per query over the keys it sees
        (rows may differ in length, e.g. the causal prefix of each query). Rows need not sum to 1.
    {references}
    sink_index (`int` or `None`, default 0): key position of the attention sink in every row; it is dropped and the
        rest renormalised (as the localist recorder does). `None` keeps every key.
Returns:
    `{name}` (`float`): mean over the queries where it is defined (NaN when none is), and `num_queries`, the
    number of queries averaged (a row whose only mass is on the sink is undefined and skipped).
"""


def _row(values: Sequence[float], name: str, i: int) -> torch.Tensor:
    row = torch.as_tensor(list(values), dtype=torch.float64)
    if row.numel() == 0:
        raise LocalistConfigError(f"{name}[{i}] is empty: every query row needs at least one key")
    return row


def _exclude(n: int, sink_index: int | None, i: int) -> torch.Tensor | None:
    if sink_index is None:
        return None
    if isinstance(sink_index, bool) or not isinstance(sink_index, int) or not -n <= sink_index < n:
        raise LocalistConfigError(f"sink_index={sink_index!r} is not a key position of row {i} (length {n})")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[sink_index] = True
    return mask


def _mask(values: Sequence[Any], n: int, i: int) -> torch.Tensor:
    mask = torch.as_tensor([bool(v) for v in values], dtype=torch.bool)
    if mask.numel() != n:
        raise LocalistConfigError(f"references[{i}] has {mask.numel()} entries but predictions[{i}] has {n} keys")
    return mask


def _finish(name: str, values: list[float]) -> dict[str, Any]:
    kept = [v for v in values if not math.isnan(v)]
    return {name: (sum(kept) / len(kept)) if kept else float("nan"), "num_queries": len(kept)}


def entropy(predictions, sink_index: int | None = 0) -> dict[str, Any]:
    out = []
    for i, values in enumerate(predictions):
        row = _row(values, "predictions", i)
        out.append(float(theory.attention_entropy(row, exclude=_exclude(row.numel(), sink_index, i))))
    return _finish("attention_entropy", out)


def mass(name: str, predictions, references, sink_index: int | None = 0) -> dict[str, Any]:
    """Mass on the True keys of ``references`` (anchors: pointer fidelity; whole target block: block mass)."""
    if len(predictions) != len(references):
        raise LocalistConfigError(f"{len(predictions)} prediction rows but {len(references)} reference rows")
    out = []
    for i, (values, ref) in enumerate(zip(predictions, references)):
        row = _row(values, "predictions", i)
        mask = _mask(ref, row.numel(), i)
        out.append(float(theory.pointer_fidelity(row, mask, exclude=_exclude(row.numel(), sink_index, i))))
    return _finish(name, out)
