"""The second trigger of LLM-level recruitment: the chosen specialist's block recruitment is exhausted.

docs/design.md section 7: inputs are clustered for a new specialist when the router is unsure of them
(``H_domain > gamma ln M``) *or* when the specialist they are routed to can no longer recruit blocks for them.

A specialist's block recruitment is *exhausted* when the specialist is localist, has block recruitment configured
(``LocalistConfig.recruitment``), and can recruit no further block:

* its recorded recruitment stopped (``handle.state.recruitment_status``, saved with the model): no free slot,
  ``p_max`` reached, or ``patience`` passes in a row accepted nothing; or, read from its settings,
* no dormant slot is left (slots named in ``block_names`` are reserved for their anchors), or
* its active blocks reached ``p_max = ceil((ln N - H_min) / theta_H)`` for the longest routed input (length N).

An input routed (argmax of the router) to an exhausted specialist is flagged when that specialist is still confused
on it: the share of its tokens that block recruitment's own test calls confused, ``H_t > ln max(|A_b(t)|, 1) +
epsilon`` inside the specialist, is at least ``min_confused_fraction``. A specialist that is not localist, or has no
block recruitment, never flags an input: the trigger is about blocks that cannot grow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from .. import theory
from ..errors import LocalistConfigError
from ..recruitment.ops import confusion
from ..utils import pad_right


@dataclass
class BlockRecruitmentStatus:
    """Where one specialist's block recruitment stands (``reason`` says why it is, or is not, exhausted)."""

    name: str
    exhausted: bool
    reason: str  # not_localist | no_recruitment | recruiting | no_free_slot | p_max_reached | pass_accepted_nothing
    active_blocks: int = 0
    free_slots: int = 0
    p_max: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def block_recruitment_status(model: Any, seq_len: int, name: str = "") -> BlockRecruitmentStatus:
    """Whether ``model``'s block recruitment is exhausted for inputs of up to ``seq_len`` tokens (see module doc)."""
    handle = getattr(model, "localist_handle", None)
    if handle is None:
        return BlockRecruitmentStatus(name, False, "not_localist")
    cfg = handle.config
    rcfg = cfg.recruitment
    if rcfg is None:
        return BlockRecruitmentStatus(name, False, "no_recruitment")
    active = cfg.active_block_list()
    free = sum(1 for s in range(len(cfg.block_names) + 1, cfg.max_blocks + 1) if s not in active)
    p_max = int(theory.p_max(max(int(seq_len), 1), rcfg.H_min, rcfg.theta_H))
    status = handle.state.recruitment_status or {}
    if status.get("done") and status.get("stop_reason"):
        reason = str(status["stop_reason"])
    elif free == 0:
        reason = "no_free_slot"
    elif len(active) >= p_max:
        reason = "p_max_reached"
    else:
        reason = "recruiting"
    return BlockRecruitmentStatus(name, reason != "recruiting", reason, len(active), free, p_max)


def confused_fractions(model: Any, seqs: Sequence[Sequence[int]], pad_id: int, epsilon: float,
                       batch_size: int = 16) -> torch.Tensor:
    """(n,) share of each sequence's tokens that are confused inside the localist ``model``."""

    handle = model.localist_handle
    device = next(handle.base.parameters()).device
    out = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad_right(seqs[i: i + batch_size], pad_id)
            with torch.no_grad(), handle.record() as rec, handle.capture_layouts() as calls:
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
            _, valid, confused = confusion(handle, rec, calls[-1], ids.shape[1], epsilon)
            # Each sequence's first query sees only the sink (undefined entropy): not counted either way.
            defined = valid.clone()
            defined[:, 0] = False
            out.append(confused.sum(1).double() / defined.sum(1).clamp_min(1).double())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def exhausted_inputs(router: Any, seqs: Sequence[Sequence[int]], chosen: torch.Tensor, *, pad_id: int,
                     epsilon: float | None = None, min_confused_fraction: float = 0.5,
                     batch_size: int = 16) -> tuple[list[int], list[dict[str, Any]]]:
    """Indices of ``seqs`` flagged by the exhausted-recruitment trigger, and one record per routed-to specialist.

    ``chosen`` (n,): the specialist index each input is routed to. ``epsilon``: the confusion margin (default: each
    specialist's own ``recruitment.epsilon``).
    """
    if isinstance(min_confused_fraction, bool) or not isinstance(min_confused_fraction, (int, float)) or \
            not 0.0 < min_confused_fraction <= 1.0:
        raise LocalistConfigError(f"min_confused_fraction={min_confused_fraction!r} is invalid: expected a number in "
                                  "(0, 1], the share of an input's tokens that must be confused")
    if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon < 0):
        raise LocalistConfigError(f"epsilon={epsilon!r} is invalid: expected a number >= 0 (or None for each "
                                  "specialist's own recruitment.epsilon)")
    flagged: list[int] = []
    records: list[dict[str, Any]] = []
    names = router.specialist_names
    for m in sorted(set(chosen.tolist())):
        members = [i for i, c in enumerate(chosen.tolist()) if c == m]
        model = router.get_specialist(names[m])
        status = block_recruitment_status(model, max(len(seqs[i]) for i in members), names[m])
        record = {**status.to_dict(), "routed_inputs": len(members), "flagged": 0}
        if status.exhausted:
            eps = model.localist_handle.config.recruitment.epsilon if epsilon is None else float(epsilon)
            frac = confused_fractions(model, [seqs[i] for i in members], pad_id, eps, batch_size)
            hit = [i for i, f in zip(members, frac.tolist()) if f >= min_confused_fraction and math.isfinite(f)]
            flagged.extend(hit)
            record.update(flagged=len(hit), epsilon=eps, mean_confused_fraction=float(frac.mean()))
        records.append(record)
    return sorted(flagged), records
