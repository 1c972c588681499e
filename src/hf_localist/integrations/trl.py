"""``LocalistSFTTrainer``: TRL's ``SFTTrainer`` for a localist model (``pip install "hf-localist[trl]"``).

A plain ``SFTTrainer`` already gets the block layout in anchor-token (``segment``) mode: its fused LM head
(``trl.trainer.utils.add_fused_lm_head``) runs the model's backbone directly, and the backbone's patched forward
(``LocalistBackboneForward``) lays out the blocks from ``input_ids``. What it lacks, and this subclass adds:

- **block ids from dataset columns** (``block_ids``, ``target_block_ids``): ``SFTTrainer`` keeps only the
  ``input_ids`` / ``labels`` / ``seq_lengths`` columns and its collator drops every other key. The columns are kept,
  and the collator is wrapped in a :class:`~hf_localist.blocks.collator.LocalistDataCollator`, which pads them and
  cuts them where ``SFTTrainer`` truncated ``input_ids`` to ``max_length``;
- **``penalty='loss'``**: ``SFTTrainer`` computes its loss from the fused head's log-probabilities, not from
  ``outputs.loss``, where the patched forward adds the penalty. ``compute_loss`` adds it (same share under gradient
  accumulation as ``add_penalty_to_output``) and logs it as ``localist_loss``;
- what :class:`~hf_localist.trainer.LocalistTrainer` adds to a ``Trainer``: ``LocalistCallback`` first in the
  callbacks (``penalty='prox'``, the ``localist/...`` metrics), a ``RecruitmentCallback`` when recruitment is set,
  the callback counters and the localist state tensors across checkpoints (peft models included).

Several examples in one row (``padding_free=True``, ``packing_strategy='bfd'``; any packing with block-id columns,
which packing drops) raise ``LocalistConfigError``: a block layout (its general block and sink, its anchor segments)
is per example.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer

from ..attention.call import scoped
from ..blocks.collator import BLOCK_KEYS, LocalistDataCollator
from ..errors import LocalistConfigError
from ..trainer import LocalistTrainer
from ..training.callback import localist_handle_of
from ..training.penalty import add_penalty_to_output

#: SFTConfig.truncation_mode -> the side of input_ids that SFTTrainer cuts (LocalistDataCollator's truncation_side).
_TRUNCATION_SIDE = {"keep_start": "right", "keep_end": "left"}


def _block_columns(dataset: Any) -> list[str]:
    """The block-id columns of a datasets ``Dataset`` / ``IterableDataset`` (or of each dataset of a dict)."""
    if isinstance(dataset, dict):
        return sorted({c for d in dataset.values() for c in _block_columns(d)})
    columns = getattr(dataset, "column_names", None) or []
    return [key for key in BLOCK_KEYS if key in columns]


def _check_one_example_per_row(args: Any, datasets: list[Any]) -> None:
    if args is None:  # SFTTrainer's default SFTConfig: no packing, no padding-free
        return
    packing, eval_packing = getattr(args, "packing", False), getattr(args, "eval_packing", None)
    strategy = getattr(args, "packing_strategy", None)
    if getattr(args, "padding_free", False) or (packing and strategy in ("bfd", "bfd_split")):
        raise LocalistConfigError(
            f"LocalistSFTTrainer: padding_free={getattr(args, 'padding_free', False)}, packing={packing}, "
            f"packing_strategy={strategy!r} put several examples in one row, but a block layout (its general block "
            "and sink, its anchor segments) is per example: set padding_free=False and packing=False in SFTConfig"
        )
    columns = sorted({c for d in datasets if d is not None for c in _block_columns(d)})
    if columns and (packing or eval_packing):
        raise LocalistConfigError(
            f"LocalistSFTTrainer: packing=True drops the {columns} columns (SFTTrainer packs input_ids and labels "
            "only): set packing=False and eval_packing=False in SFTConfig"
        )


class LocalistSFTTrainer(LocalistTrainer, SFTTrainer):
    """TRL's ``SFTTrainer`` for a model patched by ``apply_localist`` (a peft model around one too, or
    ``peft_config=``). Takes ``SFTTrainer``'s arguments, plus ``localist_log_every`` (``LocalistTrainer``'s).

    Block ids come from the dataset's ``block_ids`` (and ``target_block_ids``) columns next to ``input_ids``, or,
    without such columns, from the anchor tokens (``block_assignment='segment'``). A ``data_collator`` given is
    wrapped in ``LocalistDataCollator`` unless it is one already. A model id (a string) raises ``LocalistStateError``:
    load and patch the model first.
    """

    def __init__(self, model: Any, args: Any = None, data_collator: Any = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, *, localist_log_every: int | None = None,
                 **kwargs: Any) -> None:
        localist_handle_of(model)  # before SFTTrainer prepares the datasets: fail early on an unpatched model
        _check_one_example_per_row(args, [train_dataset, eval_dataset])
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         localist_log_every=localist_log_every, **kwargs)
        if not isinstance(self.data_collator, LocalistDataCollator):
            packing = self.args.packing  # wrapped packing (segment mode) chunks rows to max_length itself
            self.data_collator = LocalistDataCollator(
                collator=self.data_collator, max_length=None if packing else self.args.max_length,
                truncation_side=_TRUNCATION_SIDE.get(self.args.truncation_mode, "right"))

    def _set_signature_columns_if_needed(self) -> None:
        # The columns Trainer keeps (remove_unused_columns=True): SFTTrainer's, plus the block-id columns.
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            key for key in BLOCK_KEYS if key not in self._signature_columns]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        handle = localist_handle_of(model)
        if handle.config.penalty != "loss" or not model.training or not torch.is_grad_enabled():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        with scoped(handle.state, penalty_by_caller=True):  # the backbone need not warn: the penalty is added here
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        total = add_penalty_to_output(handle, {"loss": loss}, inputs.get("labels"), num_items_in_batch)
        self._metrics["train"]["localist_loss"].append(float(total["localist_loss"]))
        return (total["loss"], outputs) if return_outputs else total["loss"]
