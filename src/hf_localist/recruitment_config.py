"""``RecruitmentConfig``: the settings of block recruitment (DESIGN.md section 6), typed and validated."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import LocalistConfigError

CODE_LENGTHS = ("bic", "fixed")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class RecruitmentConfig:
    """When and how new blocks are recruited. Every threshold is in nats."""

    every: int = field(default=1000, metadata=_help(
        "Run a recruitment pass every this many optimizer steps (>= 1). A pass costs about 2 * budget_steps training "
        "steps plus clustering and held-out scoring (~80-120 steps of a small model, see docs/benchmarks.md): keep "
        "every >= 10x that for passes to take <= 10% of training time."))
    epsilon: float = field(
        default=0.2, metadata=_help("Confusion margin: token t is confused if H_t > ln max(|A_b(t)|, 1) + epsilon (>= 0).")
    )
    theta_block: float = field(
        default=50.0, metadata=_help("Accept a block iff dL_total = dL_data + dL_model <= -theta_block (nats, >= 0).")
    )
    theta_H: float = field(
        default=0.1, metadata=_help("Entropy drop per block in p_max = ceil((ln N - H_min) / theta_H) (> 0).")
    )
    H_min: float = field(default=0.0, metadata=_help("Lowest attainable mean entropy H_min in p_max (nats, >= 0)."))
    min_cluster_tokens: int = field(
        default=64, metadata=_help("Clusters of confused tokens smaller than this are dropped (>= 2).")
    )
    max_clusters: int = field(default=8, metadata=_help("Upper bound on k for k-means (also bounded by free slots)."))
    code_length: str = field(
        default="bic", metadata=_help("Model code length: 'bic' (k/2 ln n) or 'fixed' (k * bits * ln 2).")
    )
    bits: int = field(default=16, metadata=_help("Bits per parameter for code_length='fixed' (>= 1)."))
    budget_steps: int = field(
        default=20, metadata=_help("Training steps given equally to the model with and without a proposed block (>= 1).")
    )
    budget_lr: float = field(default=1e-3, metadata=_help("Learning rate of the evaluation budget (AdamW, > 0)."))
    replay_fraction: float = field(
        default=0.5, metadata=_help("Share of the budget's batches drawn from general training data, in [0, 1).")
    )
    diagnostic_batches: int = field(default=4, metadata=_help("Training batches scanned for confused tokens (>= 1)."))
    max_tokens: int = field(default=4096, metadata=_help("At most this many confused tokens are clustered (>= 2)."))
    seed: int = field(default=0, metadata=_help("Seed of clustering and budget sampling (a pass at step s uses seed + s)."))
    min_silhouette: float = field(
        default=0.1, metadata=_help("k = 1 rule: when the best silhouette over k = 2..k_max is below this (no cluster "
                                    "structure), all confused tokens form one cluster; in [-1, 1].")
    )
    patience: int = field(
        default=1, metadata=_help("Recruitment stops after this many consecutive passes that accept nothing (>= 1).")
    )
    heldout_batches: int = field(
        default=0, metadata=_help("Score proposals on at most this many held-out batches (0 = all of them).")
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            self._check(f.name, getattr(self, f.name))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in {f.name for f in dataclasses.fields(self)} and "seed" in self.__dict__:
            self._check(name, value)
        object.__setattr__(self, name, value)

    def _check(self, name: str, value: Any) -> None:
        def bad(why: str) -> LocalistConfigError:
            return LocalistConfigError(f"RecruitmentConfig.{name}={value!r} is invalid: {why}")

        ints = {"every": 1, "min_cluster_tokens": 2, "max_clusters": 1, "bits": 1, "budget_steps": 1,
                "diagnostic_batches": 1, "max_tokens": 2, "seed": 0, "patience": 1, "heldout_batches": 0}
        if name in ints:
            if isinstance(value, bool) or not isinstance(value, int) or value < ints[name]:
                raise bad(f"expected an integer >= {ints[name]}")
            return
        if name == "code_length":
            if value not in CODE_LENGTHS:
                raise bad(f"choose one of {list(CODE_LENGTHS)}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("expected a finite number")
        if name in ("epsilon", "theta_block", "H_min") and value < 0:
            raise bad("must be >= 0")
        if name in ("theta_H", "budget_lr") and value <= 0:
            raise bad("must be > 0")
        if name == "replay_fraction" and not 0.0 <= value < 1.0:
            raise bad("must lie in [0, 1)")
        if name == "min_silhouette" and not -1.0 <= value <= 1.0:
            raise bad("a silhouette lies in [-1, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecruitmentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LocalistConfigError(f"unknown RecruitmentConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)
