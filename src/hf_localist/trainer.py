"""``LocalistTrainer``: a ``transformers.Trainer`` that runs the localist callbacks and saves the localist state.

It adds a :class:`~hf_localist.training.callback.LocalistCallback` (penalties, locality metrics) and, when
``LocalistConfig.recruitment`` is set, a :class:`~hf_localist.recruitment.recruit.RecruitmentCallback`; it turns on
``restore_callback_states_from_checkpoint`` so their counters survive a resume.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Trainer

from .config.localist import LOCALIST_CONFIG_NAME
from .patch.adapters import bind_wrapper
from .patch.persistence import load_localist_state, save_localist_state
from .recruitment.recruit import RecruitmentCallback
from .training.callback import LocalistCallback, localist_handle_of


class LocalistTrainer(Trainer):
    """A ``Trainer`` for localist models: adds ``LocalistCallback`` first in the callback list (so the reporting
    callbacks see its metrics), restores callback counters on resume, and reloads the localist state tensors
    (calibrated subspaces, threshold lambdas) from checkpoints.
    """

    def __init__(self, *args: Any, localist_log_every: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        localist_handle_of(self.model)  # fail early, with a clear message, on an unpatched model
        bind_wrapper(self.model)  # a peft model saves the localist files next to its adapter (patch/adapters.py)
        self.args.restore_callback_states_from_checkpoint = True
        existing = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LocalistCallback)]
        if not existing:
            steps = self.args.logging_steps
            # logging_steps in (0, 1) is a ratio of the total steps, resolved by the Trainer at train start.
            fractional = localist_log_every is None and bool(steps) and steps < 1
            log_every = localist_log_every or (int(steps) if steps and steps >= 1 else 50)
            callback = LocalistCallback(log_every=log_every)
            callback._follow_logging_steps = fractional
            self.callback_handler.callbacks.insert(0, callback)
        else:
            self._localist_first()
        self._add_recruitment()

    # ---- block recruitment (recruitment/recruit.py): added when LocalistConfig.recruitment is set
    def _add_recruitment(self) -> None:
        ours = [cb for cb in self.callback_handler.callbacks if isinstance(cb, RecruitmentCallback)]
        if not ours and localist_handle_of(self.model).config.recruitment is not None:
            ours = [RecruitmentCallback()]
            self.callback_handler.add_callback(ours[0])
        for cb in ours:
            cb.bind(self)  # held-out batches come from this Trainer's eval dataloader
        self._localist_first()

    def _localist_first(self) -> None:
        """Put the LocalistCallback(s), then any RecruitmentCallback, first: the reporting callbacks see their
        metrics."""
        callbacks = self.callback_handler.callbacks
        ours = [cb for cb in callbacks if isinstance(cb, LocalistCallback)]
        ours += [cb for cb in callbacks if isinstance(cb, RecruitmentCallback)]
        callbacks[:] = ours + [cb for cb in callbacks if not any(cb is o for o in ours)]

    @property
    def localist_callback(self) -> LocalistCallback:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, LocalistCallback))

    def _load_callback_state(self) -> None:
        # transformers rebuilds restored callbacks and appends them at the end of the list: put the
        # LocalistCallback first again, so the reporting callbacks keep seeing its metrics after a resume.
        super()._load_callback_state()
        self._localist_first()
        self._add_recruitment()  # restored callbacks are rebuilt from their JSON args: bind them again

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # A peft model saves through PeftModel.save_pretrained, which never reaches the patched base model's
        # save_pretrained: bound to the wrapper (again here: the model may have been re-patched since the Trainer
        # was built), that save writes the localist config and state next to the adapter, under the manifest.
        bind_wrapper(self.model)
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and not os.path.isfile(os.path.join(output_dir, LOCALIST_CONFIG_NAME)):
            # A model the Trainer saved by its state dict alone (no save_pretrained of ours ran): add the localist
            # files, so that the directory still carries the settings and the calibrated state.
            save_localist_state(localist_handle_of(self.model), output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_localist_state(localist_handle_of(model if model is not None else self.model), resume_from_checkpoint)
