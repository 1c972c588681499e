"""``evaluate`` metric modules for localist attention, shipped with the package and loadable offline by path.

Three modules, each an :class:`evaluate.Metric` over attention probability rows (one row per query, over the
keys it sees), computed with :mod:`hf_localist.theory`:

- ``attention_entropy``: mean ``H = -sum q ln q`` (nats) of the rows, sink dropped and renormalised;
- ``pointer_fidelity``: mean attention mass on the anchor keys (``references`` = anchor mask per row);
- ``block_mass``: mean attention mass on every key of the target block (``references`` = block mask per row).

    from hf_localist import metrics
    pf = metrics.load("pointer_fidelity")          # == evaluate.load(metrics.path("pointer_fidelity"))
    pf.compute(predictions=[[0.5, 0.3, 0.2]], references=[[False, True, False]], sink_index=0)
    # {'pointer_fidelity': 0.6, 'num_queries': 1}

The modules import only ``evaluate``, ``datasets`` and ``hf_localist``: nothing is fetched from the Hub.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import LocalistConfigError

#: The metric modules shipped here (each is ``<name>/<name>.py`` next to this file).
METRIC_NAMES = ("attention_entropy", "pointer_fidelity", "block_mass")

__all__ = ["METRIC_NAMES", "path", "load"]


def path(name: str) -> str:
    """The local path of the metric module ``name`` (a directory ``evaluate.load`` accepts)."""
    if name not in METRIC_NAMES:
        raise LocalistConfigError(f"metric {name!r} is not one of {list(METRIC_NAMES)}")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def load(name: str, **kwargs: Any):
    """``evaluate.load`` of the shipped module ``name`` by its local path (works offline, HF_HUB_OFFLINE=1)."""
    import evaluate

    return evaluate.load(path(name), **kwargs)
