"""Block recruitment (docs/design.md section 6, Algorithm 1) with a penalized-likelihood criterion.

One *pass* (:func:`run_pass`):

1. run diagnostic batches with the recorder; a token is *confused* if ``H_t > ln max(|A_b(t)|, 1) + epsilon``
   (``H_t`` averaged over the localised layers, ``|A_b(t)|`` the anchors of its block visible to it);
2. cluster the confused tokens' states at the input of layer ``l0`` (k-means on unit vectors, k by silhouette in
   2..min(free slots, max_clusters), k = 1 when the best silhouette is below ``min_silhouette``); drop clusters
   smaller than ``min_cluster_tokens``;
3. propose one block per cluster in the lowest dormant slots: centroid (normalised mean), subspace (top-r PCA per
   layer orthogonalised against the other blocks, or the slot's coordinate group), lambda from the config;
4. train the model *without* the proposals and *with* all of them for the same budget (same batches, optimizer,
   seed), in place from one weight snapshot, and score per-token NLL on held-out tokens. A block's
   ``dL_data`` is the change (with minus without) of the summed NLL of the held-out tokens it takes (whose query
   is assigned to it); ``dL_total = dL_data + dL_model``; a block passes iff ``dL_total <= -theta_block``;
5. the passing blocks are kept (with the trained weights) iff, on *all* held-out tokens, their set pays too:
   ``sum dL + sum dL_model <= -theta_block * |passing|``. When only some proposals pass, the passing subset gets
   its own budget (a confirm arm) and must pass again; otherwise the pass accepts nothing;
6. accepting never makes the model worse: the held-out NLL after the pass must not exceed the NLL before it. If
   the trained weights are worse, the blocks are kept with the pre-pass weights when that is not worse, else the
   pass accepts nothing (``worse_than_before``).

Proposals are scored together, not one at a time, because a single block next to the general block changes no
attention (block 0 is visible to every query and its queries see everything): a block's value only shows next to
other blocks. Recruitment stops when ``patience`` passes in a row accept nothing, when no slot is free, or when the
number of active blocks reaches ``p_max = theory.p_max(N, H_min, theta_H)`` (N = longest diagnostic sequence).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .. import distributed, theory
from ..arch.qk import input_size
from ..config.recruitment import RecruitmentConfig
from ..errors import LocalistConfigError, LocalistError
from ..patch.slots import activate_block, ensure_slots, set_block_enabled
from ..training.callback import localist_handle_of, merge_pending_logs
from ..training.subspaces import complement_basis, layer_subspaces
from .ops import (
    BatchSource,
    Proposal,
    batches_of,
    choose_clusters,
    clean_batch,
    code_length,
    collate_rows,
    collect_confused,
    coordinate_group,
    count_params,
    restore_state,
    restore_weights,
    score_tokens,
    snapshot_state,
    snapshot_weights,
    specific_basis,
    train_budget,
    write_log,
)

LOG_FILE = "recruitment_log.jsonl"


@dataclass
class PassResult:
    decisions: list[dict] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    stop_reason: str | None = None  # set when no further pass can recruit (no free slot, p_max reached)
    metrics: dict[str, float] = field(default_factory=dict)


def _hidden(handle) -> int:
    return input_size(handle)


def prepare(handle) -> None:
    """Check the settings and fix the state recruitment relies on (idempotent).

    - centroid assignment is required (recruited blocks have no anchor text);
    - ``active_blocks=None`` (every slot "active") becomes the slots that have a centroid (usually none);
    - ``subspace_rank`` is fixed (``hidden // (max_blocks + 1)`` when unset) so no block's subspace moves later;
    - the subspaces in use are stored (coordinate groups included), so a new block only appends its own.
    """
    cfg, state = handle.config, handle.state
    if cfg.block_assignment != "centroid":
        raise LocalistConfigError(
            f"block recruitment needs LocalistConfig.block_assignment='centroid' (got {cfg.block_assignment!r}): "
            "recruited blocks have no anchor token, tokens join them by their hidden state"
        )
    hidden = _hidden(handle)
    ensure_slots(state, hidden)
    if cfg.active_blocks is None:
        have = [s for s in cfg.active_block_list() if s <= cfg.max_blocks and float(state.centroids[s].norm()) > 0]
        cfg.update(active_blocks=have)
    n_active = len(cfg.active_block_list())
    stored = state.subspaces
    if cfg.subspace_rank is None:
        rank = (int(stored.shape[-1]) if stored is not None and stored.shape[1] > 0
                else max(1, hidden // (cfg.max_blocks + 1)))
        cfg.update(subspace_rank=rank)
    n_layers = len(handle.attention_modules)
    if stored is None or stored.shape[1] != n_active:
        if n_active == 0:
            state.subspaces = torch.zeros(n_layers, 0, hidden, cfg.subspace_rank)
        elif cfg.subspace == "pca":
            raise LocalistError("subspace='pca' with active blocks needs calibrated subspaces: call "
                                "calibrate_subspaces(handle, loader) before recruiting")
        else:
            state.subspaces = layer_subspaces(handle).detach().clone().contiguous()


def _decision(step: int, pass_index: int, **kw: Any) -> dict:
    row = {"step": step, "pass": pass_index, "slot": None, "cluster": None, "cluster_size": None, "dL_data": None,
           "dL_model": None, "dL_total": None, "accepted": False, "reason": None}
    row.update(kw)
    return row


def _lambda_for(handle) -> Any:
    cfg = handle.config
    if cfg.lambda_mode == "fixed":
        return cfg.penalty_lambda
    return "threshold: per (layer, head), the largest threshold of the existing blocks"


def _extend_threshold(handle, slot: int) -> None:
    """lambda_mode='threshold': give the new slot a column of lambda_threshold (largest existing one per head)."""
    thr = handle.state.lambda_threshold
    if handle.config.lambda_mode != "threshold" or thr is None:
        return
    active = handle.config.active_block_list()  # already includes slot
    col = thr.max(dim=-1, keepdim=True).values if thr.shape[-1] else torch.zeros(*thr.shape[:2], 1)
    i = active.index(slot)
    handle.state.lambda_threshold = torch.cat([thr[..., :i], col, thr[..., i:]], dim=-1)


def _activate(handle, proposals: Sequence[Proposal]) -> None:
    """Activate the proposals disabled (outputs unchanged), then enable them for their budget."""
    for p in proposals:
        activate_block(handle, p.slot, p.centroid, p.subspace, enabled=False, info=dict(p.info))
        _extend_threshold(handle, p.slot)
    for p in proposals:
        set_block_enabled(handle, p.slot, True)


def _propose(handle, rcfg: RecruitmentConfig, conf, labels: torch.Tensor, clusters: list[int], slots: list[int],
             n_heldout: int, step: int, pass_index: int, decisions: list[dict]) -> list[Proposal]:
    cfg = handle.config
    hidden, rank = conf.x.shape[1], cfg.subspace_rank
    n_layers = len(handle.attention_modules)
    existing = handle.state.subspaces  # (L, n, E, r)
    taken = [existing[layer].permute(1, 0, 2).reshape(hidden, -1) for layer in range(n_layers)]
    counted = n_layers - cfg.first_local_layer  # layers whose basis the penalty reads
    out: list[Proposal] = []
    for cluster in clusters:
        members = labels == cluster
        size = int(members.sum())
        slot = slots[len(out)]
        z = torch.nn.functional.normalize(conf.x[members].double(), dim=-1)
        centroid = torch.nn.functional.normalize(z.mean(dim=0), dim=0).float()
        bases = []
        for layer in range(n_layers):
            if cfg.subspace == "pca":
                x = conf.layers[layer]  # (n_confused, E)
                u = complement_basis(specific_basis(x[members], x[~members], rank), taken[layer])
            else:
                u = coordinate_group(hidden, rank, slot, taken[layer])
            if u is None:
                break
            bases.append(u)
        if len(bases) < n_layers:
            decisions.append(_decision(step, pass_index, slot=slot, cluster=cluster, cluster_size=size,
                                       reason="no_room_for_subspace"))
            continue
        for layer, u in enumerate(bases):
            taken[layer] = torch.cat([taken[layer], u], dim=1)
        k = count_params(hidden, rank, counted, cfg.subspace)
        rows = sorted(set(conf.seq[members].tolist()))
        p = Proposal(cluster=cluster, size=size, slot=slot, centroid=centroid, subspace=torch.stack(bases), rows=rows,
                     k_params=k, dL_model=code_length(k, n_heldout, rcfg.code_length, rcfg.bits),
                     lam=_lambda_for(handle))
        out.append(p)
    return out


def _budget(conf, proposals: Sequence[Proposal], source: BatchSource, rcfg: RecruitmentConfig, batch_size: int,
            pad_id: int, gen: torch.Generator) -> list[dict]:
    """budget_steps batches shared by every arm: cluster sequences, and replay_fraction of general batches."""
    rows = sorted({r for p in proposals for r in p.rows})
    replay_flags = (torch.rand(rcfg.budget_steps, generator=gen) < rcfg.replay_fraction).tolist()
    replay = source.sample(sum(replay_flags), gen)
    out = []
    for flag in replay_flags:
        if flag and replay:
            out.append(replay.pop())
        else:
            pick = torch.randint(0, len(rows), (batch_size,), generator=gen).tolist()
            out.append(collate_rows([conf.rows[rows[i]] for i in pick], pad_id))
    return out


def _arm(handle, snap_w, snap_s, proposals, budget, heldout, rcfg, seed):
    """Reset to the snapshot, activate ``proposals``, train the budget, score. None if a loss was not finite."""
    restore_weights(handle.model, snap_w)
    restore_state(handle, snap_s)
    _activate(handle, proposals)
    if not train_budget(handle, budget, rcfg.budget_lr, seed):
        return None
    return score_tokens(handle, heldout)


def _attribute(proposals, nll_with, blocks_with, nll_without, rcfg) -> list[dict]:
    rows = []
    for p in proposals:
        mine = blocks_with == p.slot
        n = int(mine.sum())
        d = float((nll_with[mine] - nll_without[mine]).sum())
        total = d + p.dL_model
        ok = n > 0 and math.isfinite(total) and total <= -rcfg.theta_block
        reason = ("no_heldout_tokens_in_block" if n == 0 else "accepted" if ok else "no_gain")
        rows.append({"slot": p.slot, "cluster": p.cluster, "cluster_size": p.size, "dL_data": d, "dL_model": p.dL_model,
                     "dL_total": total, "accepted": ok, "reason": reason, "heldout_tokens": n, "k_params": p.k_params})
    return rows


def _no_worse(handle, snap_w, heldout, before: torch.Tensor, after: torch.Tensor) -> tuple[str | None, float]:
    """Accepting never makes the model worse on the held-out tokens: the summed NLL after the pass must not exceed
    the NLL before it. The accepted blocks come with the weights of the arm that trained them; when that arm is
    worse than the model before the pass (a budget can overfit the cluster sequences), the blocks are tried with
    the pre-pass weights instead; when that is worse too, nothing may be accepted.

    The model holds the accepted blocks and the trained weights on entry. Returns (the weights kept: 'trained' or
    'pre_pass', or None when nothing may be accepted; the summed held-out NLL after the pass).
    """
    nll_before, nll_after = float(before.sum()), float(after.sum())
    if nll_after <= nll_before:
        return "trained", nll_after
    restore_weights(handle.model, snap_w)  # keep the accepted blocks (localist state), drop the budget's training
    nll_after = float(score_tokens(handle, heldout)[0].sum())
    return ("pre_pass" if nll_after <= nll_before else None), nll_after


def run_pass(handle, rcfg: RecruitmentConfig, source: BatchSource, heldout: Sequence[dict], step: int = 0,
             pass_index: int = 0) -> PassResult:
    """One pass of Algorithm 1 (see the module docstring). Changes the model only when it accepts blocks."""
    handle = localist_handle_of(handle)
    prepare(handle)
    device = next(handle.base.parameters()).device
    devices = ([device.index if device.index is not None else torch.cuda.current_device()]
               if device.type == "cuda" else [])
    with torch.random.fork_rng(devices=devices):
        result = _run_pass(handle, rcfg, source, heldout, step, pass_index)
    return _agree(handle, result)


def _agree(handle, result: PassResult) -> PassResult:
    """Multi-process (DDP): make rank 0's pass everyone's.

    Every rank ran the same seeded pass on the same data (the callback feeds it unsharded batches), so the ranks
    normally agree already; floating-point non-determinism (GPU kernels) could still tip a decision. Rank 0's
    result, localist state (active blocks, centroids, enabled flags, subspaces, thresholds, block records) and, when
    any rank accepted a block (the weights a budget trained), its trainable parameters are broadcast. A rank that
    rejected everything restored its pre-pass weights, which the ranks share.
    """
    if not distributed.is_distributed():
        return result
    trained = distributed.any_rank(bool(result.accepted))
    result = distributed.broadcast_object(result)
    restore_state(handle, distributed.broadcast_object(snapshot_state(handle)))
    if trained:
        distributed.broadcast_tensors_(p for p in handle.model.parameters() if p.requires_grad)
    return result


def _run_pass(handle, rcfg, source, heldout, step, pass_index) -> PassResult:
    cfg = handle.config
    seed = rcfg.seed + step
    gen = torch.Generator().manual_seed(seed)
    res = PassResult()
    active = cfg.active_block_list()
    # Slots named in block_names are reserved for their anchor tokens; recruitment fills the others, lowest first.
    dormant = [s for s in range(len(cfg.block_names) + 1, cfg.max_blocks + 1) if s not in active]
    diag = source.sample(rcfg.diagnostic_batches, gen)
    lengths = [int(b["attention_mask"].sum(dim=1).max()) if "attention_mask" in b else b["input_ids"].shape[1]
               for b in diag]
    p_max = int(theory.p_max(max(lengths + [1]), rcfg.H_min, rcfg.theta_H))
    room = min(len(dormant), p_max - len(active))
    res.metrics.update({"p_max": float(p_max), "active_blocks": float(len(active))})
    if room <= 0:
        res.stop_reason = "no_free_slot" if not dormant else "p_max_reached"
        res.decisions.append(_decision(step, pass_index, reason=res.stop_reason, p_max=p_max, active=active))
        return res
    heldout = [clean_batch(b) for b in list(heldout)[: rcfg.heldout_batches or None]]
    n_heldout = sum(int((b["labels"][:, 1:] != -100).sum()) for b in heldout)
    conf = collect_confused(handle, diag, rcfg.epsilon, rcfg.max_tokens, cfg.subspace == "pca", gen)
    res.metrics.update({"confused_tokens": float(conf.n_confused), "mean_entropy": conf.mean_entropy,
                        "nonfinite_entropies": float(conf.n_nonfinite)})
    info = {"p_max": p_max, "confused_tokens": conf.n_confused, "queries": conf.n_queries,
            "nonfinite_entropies": conf.n_nonfinite}
    if conf.x.shape[0] == 0:
        res.decisions.append(_decision(step, pass_index, reason="no_confused_tokens", **info))
        return res
    labels, k, sil = choose_clusters(conf.x, min(room, rcfg.max_clusters), rcfg.min_silhouette, seed)
    sizes = torch.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda c: (-int(sizes[c]), c))
    kept = [c for c in order if int(sizes[c]) >= rcfg.min_cluster_tokens]
    for c in order:
        if c not in kept:
            res.decisions.append(_decision(step, pass_index, cluster=c, cluster_size=int(sizes[c]),
                                           reason="cluster_too_small"))
    res.metrics.update({"clusters": float(k), "silhouette": sil})
    if not kept:
        return res
    if n_heldout == 0:
        for c in kept:
            res.decisions.append(_decision(step, pass_index, cluster=c, cluster_size=int(sizes[c]),
                                           reason="no_heldout_tokens"))
        return res
    proposals = _propose(handle, rcfg, conf, labels, kept, dormant, n_heldout, step, pass_index, res.decisions)
    for p in proposals:
        p.info = {"recruited_at_step": step, "pass": pass_index, "cluster_size": p.size, "k_params": p.k_params,
                  "code_length": rcfg.code_length, "dL_model": p.dL_model, "lambda": p.lam, "subspace": cfg.subspace,
                  "silhouette": sil, "clusters": k, "confused_tokens": conf.n_confused}
    if not proposals:
        return res
    batch_size = max(b["input_ids"].shape[0] for b in diag)
    pad_id = getattr(handle.base.config, "pad_token_id", None) or 0
    budget = _budget(conf, proposals, source, rcfg, batch_size, pad_id, gen)
    snap_w, snap_s = snapshot_weights(handle.model), snapshot_state(handle)
    arm_seed = seed + 1
    keep = False
    before = score_tokens(handle, heldout)[0]  # the model as it enters the pass: accepting must not be worse
    try:
        without = _arm(handle, snap_w, snap_s, [], budget, heldout, rcfg, arm_seed)
        with_all = (_arm(handle, snap_w, snap_s, proposals, budget, heldout, rcfg, arm_seed)
                    if without is not None else None)
        if without is None or with_all is None:
            rows = [{"slot": p.slot, "cluster": p.cluster, "cluster_size": p.size, "reason": "non_finite_loss"}
                    for p in proposals]
        else:
            rows = _attribute(proposals, *with_all, without[0], rcfg)
            passing = [p for p, r in zip(proposals, rows) if r["accepted"]]
            scored = with_all
            if passing and len(passing) < len(proposals):  # confirm arm: the passing subset alone
                scored = _arm(handle, snap_w, snap_s, passing, budget, heldout, rcfg, arm_seed)
                again = _attribute(passing, *scored, without[0], rcfg) if scored is not None else []
                for r, a in zip([r for r in rows if r["accepted"]], again):
                    r.update(confirm_dL_data=a["dL_data"], confirm_dL_total=a["dL_total"])
                if scored is None or not all(a["accepted"] for a in again):
                    passing = []
                    for r in rows:
                        if r["accepted"]:
                            r.update(accepted=False, reason="not_confirmed")
            if passing:
                joint = float((scored[0] - without[0]).sum()) + sum(p.dL_model for p in passing)
                if joint > -rcfg.theta_block * len(passing):
                    for r in rows:
                        if r["accepted"]:
                            r.update(accepted=False, reason="set_not_better")
                    passing = []
                for r in rows:
                    r["set_dL_total"] = joint
            if passing:
                weights, nll_after = _no_worse(handle, snap_w, heldout, before, scored[0])
                for r in rows:
                    r.update(heldout_nll_before=float(before.sum()), heldout_nll_trained=float(scored[0].sum()),
                             heldout_nll_after=nll_after)
                    if r["accepted"] and weights is None:
                        r.update(accepted=False, reason="worse_than_before")
                    elif r["accepted"]:
                        r["weights"] = weights
                if weights is None:
                    passing = []
            keep = bool(passing)
            res.metrics["nll_before"] = float(before.sum())
            res.metrics["nll_without"] = float(without[0].sum())
            res.metrics["nll_with"] = float(with_all[0].sum())
        for r in rows:
            res.decisions.append(_decision(step, pass_index, **r, heldout_scored=n_heldout, **info))
    finally:
        if not keep:
            restore_weights(handle.model, snap_w)
            restore_state(handle, snap_s)
        del snap_w
    if keep:  # the model now holds exactly the accepted blocks (the last arm trained), with their trained weights
        for r in res.decisions:
            if r["accepted"]:
                res.accepted.append(r["slot"])
                handle.state.block_info[r["slot"]].update(
                    {k: r[k] for k in ("dL_data", "dL_total", "heldout_tokens")},
                    reason=f"dL_total={r['dL_total']:.1f} <= -theta_block={-rcfg.theta_block:g} nats")
    res.metrics["accepted"] = float(len(res.accepted))
    res.metrics["active_blocks"] = float(len(cfg.active_block_list()))
    ok = [r["dL_total"] for r in res.decisions if r.get("dL_total") is not None]
    if ok:
        res.metrics["min_dL_total"] = min(ok)
    return res


def recruit(model, data: Iterable, config: RecruitmentConfig | dict | None = None, heldout: Iterable | None = None,
            max_passes: int | None = None, batch_size: int = 8, log_path: str | None = None) -> list[dict]:
    """Run recruitment passes outside a Trainer until it terminates (or ``max_passes``); returns every decision.

    ``data``: batches (dicts with ``input_ids`` and optionally ``attention_mask``/``labels``), a DataLoader, or
    examples with 1-D ``input_ids`` (batched by ``batch_size``). ``heldout``: the same kinds; None holds out the last
    quarter of ``data``'s batches. ``config``: a RecruitmentConfig (default: the model's ``config.recruitment``).
    Pass ``i`` is seeded from ``(config.seed, i)``. Decisions are appended to ``log_path`` (JSON lines) if given.
    """
    handle = localist_handle_of(model)
    rcfg = config if config is not None else handle.config.recruitment
    if isinstance(rcfg, dict):
        rcfg = RecruitmentConfig.from_dict(rcfg)
    if not isinstance(rcfg, RecruitmentConfig):
        raise LocalistConfigError("recruit: pass a RecruitmentConfig (or set LocalistConfig.recruitment)")
    batches = batches_of(data, batch_size)
    held = batches_of(heldout, batch_size) if heldout is not None else None
    if held is None:
        cut = len(batches) - max(1, len(batches) // 4)
        if cut < 1:
            raise LocalistConfigError("recruit: need at least 2 batches of data to hold some out (or pass heldout=)")
        batches, held = batches[:cut], batches[cut:]
    if not batches:
        raise LocalistConfigError("recruit: data holds no batch")
    source = BatchSource(batches=batches)
    decisions: list[dict] = []
    empty = 0
    passes = 0
    stop_reason = None
    while max_passes is None or passes < max_passes:
        result = run_pass(handle, rcfg, source, held, step=passes, pass_index=passes)
        passes += 1
        decisions.extend(result.decisions)
        write_log(log_path, result.decisions)
        empty = 0 if result.accepted else empty + 1
        stop_reason = result.stop_reason or ("pass_accepted_nothing" if empty >= rcfg.patience else None)
        if stop_reason:
            break
    set_status(handle, done=stop_reason is not None, stop_reason=stop_reason, passes=passes, step=passes)
    return decisions


def set_status(handle, *, done: bool, stop_reason: str | None, passes: int, step: int) -> None:
    """Record where block recruitment stands on the handle (saved with the model: ``localist_blocks.json``)."""
    localist_handle_of(handle).state.recruitment_status = {"done": bool(done), "stop_reason": stop_reason,
                                                   "passes": int(passes), "step": int(step)}


def _unsharded_heldout(loader, batch_size: int | None, limit: int | None) -> list[dict]:
    """Held-out batches of the whole eval set on every rank (a data-parallel eval dataloader gives each rank a
    shard), batched as one process would batch them; for an iterable dataset, rank 0's batches."""
    ds = getattr(loader, "dataset", None)
    if ds is not None and hasattr(ds, "__getitem__") and hasattr(ds, "__len__"):
        plain = torch.utils.data.DataLoader(ds, batch_size=batch_size or getattr(loader, "batch_size", None) or 1,
                                            shuffle=False, collate_fn=loader.collate_fn,
                                            drop_last=bool(getattr(loader, "drop_last", False)))
        return list(itertools.islice(plain, limit))
    return distributed.broadcast_object(list(itertools.islice(loader, limit)))


class RecruitmentCallback(TrainerCallback, ExportableState):
    """Runs a recruitment pass every ``every`` optimizer steps (default ``config.recruitment.every``).

    Diagnostic and replay batches are sampled (seeded from ``(seed, global_step)``) from the train dataloader's
    dataset with its collate function; held-out batches come from the Trainer's eval dataloader. ``LocalistTrainer``
    adds and binds this callback when ``LocalistConfig.recruitment`` is set; with a plain ``Trainer`` call
    ``callback.bind(trainer)``. Decisions go to ``<output_dir>/recruitment_log.jsonl`` and to the Trainer's logs
    (``localist/recruit_*``). Counters are an ``ExportableState`` (restored on resume).
    """

    def __init__(self, every: int | None = None, log_file: str = LOG_FILE) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise LocalistConfigError(f"RecruitmentCallback(every={every!r}): expected an integer >= 1 or None")
        self.every = every
        self.log_file = log_file
        self.passes = 0
        self.empty_passes = 0
        self.accepted_total = 0
        self.done = False
        self.stop_reason: str | None = None
        self.last_step = -1
        self.decisions: list[dict] = []  # this process only (the JSON-lines log holds all)
        self._pending: dict[str, float] = {}
        self._trainer = None

    def state(self) -> dict:
        return {"args": {"every": self.every, "log_file": self.log_file},
                "attributes": {"passes": self.passes, "empty_passes": self.empty_passes, "done": self.done,
                               "accepted_total": self.accepted_total, "stop_reason": self.stop_reason,
                               "last_step": self.last_step}}

    def bind(self, trainer) -> RecruitmentCallback:
        self._trainer = trainer
        return self

    def _source(self, args, train_dataloader) -> BatchSource:
        if train_dataloader is None and self._trainer is not None:
            train_dataloader = self._trainer.get_train_dataloader()
        if train_dataloader is None:
            raise LocalistError("recruitment needs the Trainer's train dataloader")
        ds = getattr(train_dataloader, "dataset", None)
        if ds is not None and hasattr(ds, "__getitem__") and hasattr(ds, "__len__"):
            # Batches of the global batch size, from the whole dataset: every rank of a data-parallel run samples the
            # same batches, the same as one process with the same global batch would.
            return BatchSource(dataset=ds, collate_fn=train_dataloader.collate_fn,
                               batch_size=args.train_batch_size * max(args.world_size, 1))
        n = self._rcfg.diagnostic_batches + self._rcfg.budget_steps
        # An iterable dataset is sharded per rank: use rank 0's batches everywhere.
        return BatchSource(batches=distributed.broadcast_object([b for b, _ in zip(train_dataloader, range(n))]))

    def _heldout(self, eval_dataloader) -> list[dict]:
        trainer = self._trainer
        if trainer is not None and getattr(trainer, "eval_dataset", None) is not None:
            eval_dataloader = trainer.get_eval_dataloader()
        if eval_dataloader is None:
            raise LocalistConfigError(
                "block recruitment scores proposals on held-out tokens: pass eval_dataset to the Trainer (and use "
                "LocalistTrainer, or call RecruitmentCallback.bind(trainer) with a plain Trainer)"
            )
        if distributed.is_distributed():
            return _unsharded_heldout(eval_dataloader, trainer.args.eval_batch_size if trainer is not None else None,
                                      self._rcfg.heldout_batches or None)
        return list(itertools.islice(eval_dataloader, self._rcfg.heldout_batches or None))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        handle = localist_handle_of(model)
        if handle.config.recruitment is not None:
            prepare(handle)  # fails early on a wrong config; zero active blocks get an empty subspace tensor

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, eval_dataloader=None, **kwargs):
        handle = localist_handle_of(model)
        rcfg = handle.config.recruitment
        if rcfg is None or self.done or state.global_step == self.last_step:
            return
        if state.global_step % (self.every or rcfg.every) != 0:
            return
        self._rcfg = rcfg
        result = run_pass(handle, rcfg, self._source(args, train_dataloader), self._heldout(eval_dataloader),
                          step=state.global_step, pass_index=self.passes)
        self.passes += 1
        self.last_step = state.global_step
        self.accepted_total += len(result.accepted)
        self.empty_passes = 0 if result.accepted else self.empty_passes + 1
        if result.stop_reason:
            self.done, self.stop_reason = True, result.stop_reason
        elif self.empty_passes >= rcfg.patience:
            self.done, self.stop_reason = True, "pass_accepted_nothing"
        set_status(handle, done=self.done, stop_reason=self.stop_reason, passes=self.passes, step=state.global_step)
        self.decisions.extend(result.decisions)
        if state.is_world_process_zero and args.output_dir:
            write_log(os.path.join(args.output_dir, self.log_file), result.decisions)
        self._pending = {f"localist/recruit_{k}": float(v) for k, v in result.metrics.items()
                         if isinstance(v, (int, float)) and math.isfinite(v)}
        self._pending.update({"localist/recruit_pass": float(self.passes), "localist/recruit_done": float(self.done),
                              "localist/recruit_accepted_total": float(self.accepted_total)})
        control.should_log = True

    on_log = merge_pending_logs
