"""``RecruitmentConfig``: the settings of block recruitment (docs/design.md section 6), typed and validated.

Each field carries its help text and its rule (``config_fields``): it is validated on construction and on every
later assignment, and an unknown name (``RecruitmentConfig(evry=10)``) raises ``LocalistConfigError``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .fields import ValidatedFields, integer, number, one_of, spec

CODE_LENGTHS = ("bic", "fixed")


@dataclass
class RecruitmentConfig(ValidatedFields):
    """When and how new blocks are recruited. Every threshold is in nats."""

    every: int = field(default=1000, metadata=spec(
        "Run a recruitment pass every this many optimizer steps (>= 1). A pass costs about 2 * budget_steps training "
        "steps plus clustering and held-out scoring (~80-120 steps of a small model, see docs/benchmarks.md): keep "
        "every >= 10x that for passes to take <= 10% of training time.", integer(1)))
    epsilon: float = field(default=0.2, metadata=spec(
        "Confusion margin: token t is confused if H_t > ln max(|A_b(t)|, 1) + epsilon (>= 0).", number(0)))
    theta_block: float = field(default=50.0, metadata=spec(
        "Accept a block iff dL_total = dL_data + dL_model <= -theta_block (nats, >= 0).", number(0)))
    theta_H: float = field(default=0.1, metadata=spec(
        "Entropy drop per block in p_max = ceil((ln N - H_min) / theta_H) (> 0).", number(0, open_low=True)))
    H_min: float = field(default=0.0, metadata=spec(
        "Lowest attainable mean entropy H_min in p_max (nats, >= 0).", number(0)))
    min_cluster_tokens: int = field(default=64, metadata=spec(
        "Clusters of confused tokens smaller than this are dropped (>= 2).", integer(2)))
    max_clusters: int = field(default=8, metadata=spec(
        "Upper bound on k for k-means (also bounded by free slots).", integer(1)))
    code_length: str = field(default="bic", metadata=spec(
        "Model code length: 'bic' (k/2 ln n) or 'fixed' (k * bits * ln 2).", one_of(CODE_LENGTHS)))
    bits: int = field(default=16, metadata=spec("Bits per parameter for code_length='fixed' (>= 1).", integer(1)))
    budget_steps: int = field(default=20, metadata=spec(
        "Training steps given equally to the model with and without a proposed block (>= 1).", integer(1)))
    budget_lr: float = field(default=1e-3, metadata=spec(
        "Learning rate of the evaluation budget (AdamW, > 0).", number(0, open_low=True)))
    replay_fraction: float = field(default=0.5, metadata=spec(
        "Share of the budget's batches drawn from general training data, in [0, 1).", number(0, 1, open_high=True)))
    diagnostic_batches: int = field(default=4, metadata=spec(
        "Training batches scanned for confused tokens (>= 1).", integer(1)))
    max_tokens: int = field(default=4096, metadata=spec(
        "At most this many confused tokens are clustered (>= 2).", integer(2)))
    seed: int = field(default=0, metadata=spec(
        "Seed of clustering and budget sampling (a pass at step s uses seed + s).", integer(0)))
    min_silhouette: float = field(default=0.1, metadata=spec(
        "k = 1 rule: when the best silhouette over k = 2..k_max is below this (no cluster structure), all confused "
        "tokens form one cluster; in [-1, 1].", number(-1, 1, note="a silhouette")))
    patience: int = field(default=1, metadata=spec(
        "Recruitment stops after this many consecutive passes that accept nothing (>= 1).", integer(1)))
    heldout_batches: int = field(default=0, metadata=spec(
        "Score proposals on at most this many held-out batches (0 = all of them).", integer(0)))

    def __post_init__(self) -> None:
        self._finish_init()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecruitmentConfig:
        cls._reject_unknown(sorted(data))  # every unknown name at once, each with its close match
        return cls(**data)
