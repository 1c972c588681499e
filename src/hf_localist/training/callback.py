"""``LocalistCallback``: the penalties and locality metrics inside transformers' Trainer (any Trainer, TRL too).

``LocalistCallback`` works with any ``Trainer`` (also TRL's ``SFTTrainer``):

- ``penalty='prox'``: after every optimizer step (``on_optimizer_step``, where the learning rate just used is
  still in ``optimizer.param_groups``) it applies the proximal step, which makes whole groups exactly zero, with the
  optimizer's own per-coordinate step (AdamW, SGD; ``training/precondition.py``);
- every ``log_every`` steps it measures, on a fixed diagnostics batch (the first training batch), the penalty
  (``localist/penalty``, the group-lasso sum at the current weights; the logged ``loss`` stays the data loss), the
  group-norm statistics, the number of zero groups, the KKT ratios ``||grad_g L_data|| / lambda_g`` of the zero groups
  (one extra forward/backward of the data loss alone, unclipped), and mean ``H_t``, ``PF_t``, ``BM_t`` (PF and BM also
  over the heads that own the query's block: ``owned_pointer_fidelity``, ``owned_block_mass``); the
  values go into the Trainer's logs (``localist/...`` keys), so TensorBoard, W&B and the progress bar show them;
- its counters are an ``ExportableState``: they survive ``resume_from_checkpoint`` when
  ``restore_callback_states_from_checkpoint=True`` (``LocalistTrainer`` turns that on).

``penalty='loss'`` needs no callback: the patched forward adds the penalty to ``outputs.loss``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..errors import LocalistConfigError
from ..patch.adapters import bind_wrapper
from ..patch.persistence import handle_of
from .penalty import group_norms, head_block_map, kkt_ratios, penalty, penalty_weights, prox_step


def localist_handle_of(model) -> Any:
    """The LocalistHandle of a (possibly DDP-, accelerate- or peft-wrapped) patched model, or of a handle
    (``patch.persistence.handle_of``)."""
    return handle_of(model)


def merge_pending_logs(callback, args, state, control, logs=None, **kwargs):
    """``on_log`` of the localist callbacks: put the metrics they measured (``callback._pending``) into the
    Trainer's log entry, so the progress bar and the reporting callbacks after them see them too."""
    if not callback._pending:
        return
    if logs is not None:
        logs.update(callback._pending)
    if state.log_history:
        state.log_history[-1].update(callback._pending)
    callback._pending = {}


class LocalistCallback(TrainerCallback, ExportableState):
    """Applies the proximal step and logs locality metrics. Constructor arguments are JSON-able (for resume)."""

    def __init__(self, log_every: int = 50, kkt: bool = True, diagnostics: bool = True) -> None:
        if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
            raise LocalistConfigError(f"LocalistCallback(log_every={log_every!r}): expected an integer >= 1")
        self.log_every = log_every
        self.kkt = kkt
        self.diagnostics = diagnostics
        self.prox_steps = 0
        self.metric_steps = 0
        self.last_metrics: dict[str, float] = {}
        self._pending: dict[str, float] = {}
        self._batch = None

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        return {
            "args": {"log_every": self.log_every, "kkt": self.kkt, "diagnostics": self.diagnostics},
            "attributes": {"prox_steps": self.prox_steps, "metric_steps": self.metric_steps,
                           "last_metrics": self.last_metrics},
        }

    # ------------------------------------------------------------------ hooks
    def on_init_end(self, args, state, control, model=None, **kwargs):
        # A peft model: its save_pretrained (Trainer.save_model, checkpoints) writes the localist files next to the
        # adapter (patch/adapters.py). Again at train begin, for a callback added after the Trainer was built.
        bind_wrapper(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        bind_wrapper(model)
        # LocalistTrainer built with a fractional logging_steps (a ratio of the total steps): use the step count the
        # Trainer derived from it, known only now (state.logging_steps), instead of measuring at every step.
        if getattr(self, "_follow_logging_steps", False) and state.logging_steps:
            self.log_every = max(int(state.logging_steps), 1)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        handle = localist_handle_of(model)
        if handle.config.penalty != "prox":
            return
        lr = float(optimizer.param_groups[0]["lr"])
        prox_step(handle, lr, optimizer=optimizer)
        self.prox_steps += 1

    def on_step_end(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if state.global_step % self.log_every != 0:
            return
        handle = localist_handle_of(model)
        if self._batch is None and train_dataloader is not None:
            self._batch = next(iter(train_dataloader))
        self._pending = self.measure(handle, model, self._batch)
        self.last_metrics = dict(self._pending)
        self.metric_steps += 1
        control.should_log = True

    on_log = merge_pending_logs


    # ------------------------------------------------------------------ measurements
    def measure(self, handle, model, batch: dict | None) -> dict[str, float]:
        """Group-norm statistics, zero groups, KKT ratios and mean H/PF/BM, as ``localist/...`` floats."""
        out: dict[str, float] = {}
        if handle.config.active_block_list():  # no group to measure before the first block (e.g. recruitment)
            with torch.no_grad():
                norms = group_norms(handle)
                lam = penalty_weights(handle)
                out["localist/penalty"] = float(penalty(handle, norms))
            pen_q = lam > 0
            q = norms.q.detach().cpu()[pen_q]
            if q.numel():
                out["localist/group_norm_mean"] = float(q.mean())
                out["localist/group_norm_max"] = float(q.max())
                out["localist/zero_groups_q"] = float((q == 0).sum())
            own = norms.q.detach().cpu()[~pen_q]
            if own.numel():
                out["localist/own_group_norm_mean"] = float(own.mean())
        stats = handle.state.last_prox
        if stats is not None:
            out["localist/zero_groups"] = float(stats.num_zero)
            out["localist/penalised_groups"] = float(stats.num_penalised)
        if batch is None:
            return out
        device = next(handle.base.parameters()).device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        was_training = model.training
        model.eval()
        try:
            if self.diagnostics:
                heads = head_block_map(handle) if handle.config.active_block_list() else None
                with torch.no_grad(), handle.record(head_blocks=heads) as rec:
                    model(**batch)
                for name, value in rec.summary()["mean"].items():
                    if not math.isnan(value):
                        out[f"localist/{name}"] = value
            if self.kkt and stats is not None and stats.num_zero and "labels" in batch:
                # Data loss alone (no penalty term), unclipped, at the current (post-prox) weights.
                penalty_mode = handle.config.penalty
                object.__setattr__(handle.config, "penalty", "none")
                try:
                    model.zero_grad(set_to_none=True)
                    model(**batch).loss.backward()
                    ratios = kkt_ratios(handle, stats)
                finally:
                    object.__setattr__(handle.config, "penalty", penalty_mode)
                    model.zero_grad(set_to_none=True)
                if ratios.numel():
                    out["localist/kkt_ratio_max"] = float(ratios.max())
                    out["localist/kkt_ratio_mean"] = float(ratios.mean())
                    out["localist/kkt_holds_fraction"] = float((ratios <= 1.0).float().mean())
        finally:
            model.train(was_training)
        return out
