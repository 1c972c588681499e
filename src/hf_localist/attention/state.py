"""``LocalistState``: what a patched model keeps between calls (settings, block slots, calibrated tensors).

Nothing about any one forward call lives here: the layout of a call rides the call (:mod:`hf_localist.attention.call`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config.localist import LocalistConfig
from .function import register_attention_key


@dataclass
class LocalistState:
    """Everything the attention function needs about one patched model, shared by its attention modules."""

    config: LocalistConfig
    num_layers: int
    original_impl: str
    causal: bool
    backend_counts: dict[str, int] = field(default_factory=dict)  # which backend ran, for tests and benchmarks
    subspaces: torch.Tensor | None = None  # (L, n_active, E, r) calibrated block subspaces (pca)
    centroids: torch.Tensor | None = None  # (max_blocks + 1, E) block centroids (centroid assignment, recruitment)
    block_enabled: torch.Tensor | None = None  # (max_blocks + 1,) bool: a disabled block takes no token
    block_info: dict = field(default_factory=dict)  # slot -> recruitment record (step, size, dL, ...)
    # Where block recruitment stands: {"done", "stop_reason", "passes", "step"}; None before any pass. Saved with the
    # model, so that a router can tell that a specialist's block recruitment is exhausted (docs/design.md section 7).
    recruitment_status: dict | None = None
    lambda_threshold: torch.Tensor | None = None  # (L, H, n_active) from estimate_constants(...).threshold()
    last_prox: Any = None  # ProxStats of the latest proximal step

    def layer_alpha(self, layer: int, alpha: float | None = None) -> float:
        """alpha_l of ``layer`` for the dial ``alpha`` (default: the model-wide ``config.alpha``)."""
        return self.config.layer_alpha(layer, self.num_layers, alpha=alpha)

    def __setstate__(self, state: dict) -> None:
        # A model unpickled in a fresh process (torch.load) needs the "localist" key registered before it runs.
        self.__dict__.update(state)
        register_attention_key()
