"""Diagnostics recorder: per-layer attention entropy ``H_t``, pointer fidelity ``PF_t`` and block mass ``BM_t``.

Definitions (docs/design.md section 1), per query ``t`` and head, then averaged over the heads of a layer:

- the sink (first non-padding position) is dropped and the remaining weights renormalised:
``p'_s = p_s / (1 - p_sink)``;
- ``H_t = -sum_s p'_s ln p'_s`` (nats);
- ``PF_t = sum_{s in A_target} p'_s`` with ``A_target`` the anchors of the query's target block;
- ``BM_t = sum_{s in X_target} p'_s`` over every position of the target block.

PF and BM are undefined (not recorded) for queries whose target is block 0, and every metric is undefined for
padding queries and for a query that sees only the sink.

Given the block each query head owns (``head_blocks``, (H,), 0 = general: the group-lasso assignment of
docs/design.md section 4), the recorder also reports ``owned_pointer_fidelity`` and ``owned_block_mass``: the same
quantities averaged over only the heads that own the query's target block (undefined where no head owns it). The
penalty can localise a block's queries only in those heads (docs/training.md, "Does the penalty localise
attention?"); the all-heads mean also averages heads that cannot prefer the block.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..errors import LocalistConfigError

METRICS = ("entropy", "pointer_fidelity", "block_mass")
OWNED_METRICS = ("owned_pointer_fidelity", "owned_block_mass")


class DiagnosticsRecorder:
    """Collects per-query metrics for every localised forward pass while active (``with handle.record() as rec``)."""

    def __init__(self, head_blocks: torch.Tensor | None = None) -> None:
        self.head_blocks = None if head_blocks is None else torch.as_tensor(head_blocks, dtype=torch.long).flatten()
        self._values: dict[int, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        self._per_call: dict[int, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))

    @torch.no_grad()
    def record(self, layer: int, probs: torch.Tensor, q_blocks: torch.Tensor, q_target: torch.Tensor,
               k_blocks: torch.Tensor, k_anchor: torch.Tensor, k_is_sink: torch.Tensor,
               q_valid: torch.Tensor) -> None:
        """probs (B, H, T, S); q_blocks/q_target/q_valid (B, T); k_blocks/k_anchor/k_is_sink (B, S)."""
        p = probs.detach().float()
        keep = (~k_is_sink)[:, None, None, :]  # (B, 1, 1, S)
        p = p * keep
        z = p.sum(dim=-1, keepdim=True)  # (B, H, T, 1): mass outside the sink
        p = p / z.clamp_min(1e-30)
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).mean(dim=1)  # (B, T)
        in_target = k_blocks[:, None, :] == q_target[:, :, None]  # (B, T, S)
        anchors = in_target & k_anchor[:, None, :]
        pf_h = (p * anchors[:, None]).sum(dim=-1)  # (B, H, T)
        bm_h = (p * in_target[:, None]).sum(dim=-1)  # (B, H, T)
        pf, bm = pf_h.mean(dim=1), bm_h.mean(dim=1)  # (B, T)
        seen = q_valid & (z.squeeze(-1).amin(dim=1) > 0)  # a query that sees only the sink has no metric
        targeted = seen & (q_target >= 1)
        per_call = {"entropy": torch.where(seen, ent, torch.nan),
                    "pointer_fidelity": torch.where(targeted, pf, torch.nan),
                    "block_mass": torch.where(targeted, bm, torch.nan)}
        if self.head_blocks is not None:
            if self.head_blocks.numel() != p.shape[1]:
                raise LocalistConfigError(
                    f"DiagnosticsRecorder(head_blocks=...) has {self.head_blocks.numel()} heads but layer {layer} "
                    f"has {p.shape[1]}: pass one block id per query head")
            owns = self.head_blocks.to(p.device)[None, :, None] == q_target[:, None, :]  # (B, H, T)
            n_own = owns.sum(dim=1)  # (B, T)
            owned = targeted & (n_own > 0)
            for name, per_head in (("owned_pointer_fidelity", pf_h), ("owned_block_mass", bm_h)):
                mean = (per_head * owns).sum(dim=1) / n_own.clamp_min(1)  # (B, T)
                per_call[name] = torch.where(owned, mean, torch.nan)
        for name, value in per_call.items():
            value = value.cpu()
            self._per_call[layer][name].append(value)
            self._values[layer][name].append(value[~torch.isnan(value)])

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS + (OWNED_METRICS if self.head_blocks is not None else ())

    @property
    def layers(self) -> list[int]:
        return sorted(self._values)

    def values(self, layer: int, metric: str) -> torch.Tensor:
        """Every recorded value of ``metric`` at ``layer`` (1-D, NaN-free), in recording order."""
        if metric not in self.metrics:
            raise LocalistConfigError(f"metric={metric!r} is not one of {list(self.metrics)}"
                                      + ("" if self.head_blocks is not None or metric not in OWNED_METRICS else
                                         ": the owned_* metrics need handle.record(head_blocks=...)"))
        chunks = self._values.get(layer, {}).get(metric, [])
        return torch.cat(chunks) if chunks else torch.empty(0)

    def per_query(self, layer: int, metric: str, call: int = -1) -> torch.Tensor:
        """The (B, T) tensor of ``metric`` of one recorded forward call (NaN where undefined)."""
        return self._per_call[layer][metric][call]

    def summary(self) -> dict:
        """Plain dict: per layer and overall mean of each metric, and the number of queries it averages."""
        out: dict = {"layers": {}}
        totals = {m: [] for m in self.metrics}
        for layer in self.layers:
            row = {}
            for m in self.metrics:
                v = self.values(layer, m)
                totals[m].append(v)
                row[m] = float(v.mean()) if v.numel() else float("nan")
                row[f"n_{m}"] = int(v.numel())
            out["layers"][layer] = row
        out["mean"] = {m: (float(torch.cat(v).mean()) if v and torch.cat(v).numel() else float("nan"))
                       for m, v in totals.items()}
        return out

    def clear(self) -> None:
        self._values.clear()
        self._per_call.clear()
