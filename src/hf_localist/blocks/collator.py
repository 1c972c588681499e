"""``LocalistDataCollator``: a data collator that also pads ``block_ids`` (for ``Trainer`` and TRL's ``SFTTrainer``).

transformers' collators pad ``input_ids`` / ``attention_mask`` (``tokenizer.pad``) but do not know ``block_ids``:
a ragged ``block_ids`` list makes their tensor conversion fail; TRL's ``DataCollatorForLanguageModeling`` keeps only
``input_ids`` / ``labels`` and drops them. The wrapper takes the block-id keys out of each feature, lets the wrapped
collator build the batch, then pads the block ids with 0 (the general block; the positions are masked anyway) on
the side the collator padded, to the batch's sequence length.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

from ..errors import BlockIdsError

#: The per-token block-id keys the patched forward takes (docs/design.md section 2).
BLOCK_KEYS = ("block_ids", "target_block_ids")


def pad_block_ids(rows: Sequence[Sequence[int]], lengths: Sequence[int], side: str, value: int = 0) -> list[list[int]]:
    """Pad each row of block ids to ``lengths[i]`` with ``value`` on ``side`` ('left' or 'right')."""
    out = []
    for i, (row, n) in enumerate(zip(rows, lengths)):
        row = list(row)
        if len(row) > n:
            raise BlockIdsError(f"example {i}: {len(row)} block ids for a padded length of {n}: the collator "
                                "truncated input_ids; truncate block_ids the same way before collating")
        fill = [value] * (n - len(row))
        out.append(fill + row if side == "left" else row + fill)
    return out


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _is_trl_collator(collator: Any) -> bool:
    """Whether ``collator`` is TRL's ``DataCollatorForLanguageModeling`` (it always pads on the right). Looked up in
    ``sys.modules``: an instance exists only once TRL is imported, and TRL stays an optional dependency."""
    module = sys.modules.get("trl.trainer.sft_trainer")
    cls = getattr(module, "DataCollatorForLanguageModeling", None)
    return isinstance(cls, type) and isinstance(collator, cls)


class LocalistDataCollator:
    """Wrap a data collator so that ``block_ids`` (and ``target_block_ids``) are padded with the batch.

    ``collator``: the collator to wrap; default ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``
    (causal-LM labels, padding -100) with ``language_modeling=True``, else ``DataCollatorWithPadding(tokenizer)``
    (features carry their own labels). TRL's ``DataCollatorForLanguageModeling`` (what ``SFTTrainer`` uses) works
    too, except with ``padding_free=True`` (one row for the whole batch: ``BlockIdsError``). The padding side is the
    wrapped collator's tokenizer's ``padding_side``, ``'right'`` for TRL's collator (``padding_side=`` overrides
    it; it must match how the collator pads). Each feature's ``block_ids`` must have the length of its
    ``input_ids`` (``BlockIdsError`` otherwise), except when the ``input_ids`` were truncated to ``max_length``
    (``SFTTrainer`` truncates ``input_ids`` and ``labels`` only): longer block ids of such a feature are cut the
    same way, on ``truncation_side`` ('right' keeps the start, 'left' the end). Either every feature has a block-id
    key or none. Returns the wrapped collator's batch plus ``(batch, seq)`` LongTensors for the block-id keys.
    """

    def __init__(self, tokenizer: Any = None, collator: Callable | None = None, *, language_modeling: bool = True,
                 padding_side: str | None = None, keys: Sequence[str] = BLOCK_KEYS, max_length: int | None = None,
                 truncation_side: str = "right"):
        if collator is None:
            if tokenizer is None:
                raise BlockIdsError("LocalistDataCollator needs a tokenizer or a collator to wrap")
            collator = (DataCollatorForLanguageModeling(tokenizer, mlm=False) if language_modeling
                        else DataCollatorWithPadding(tokenizer))
        trl = _is_trl_collator(collator)
        if trl and getattr(collator, "padding_free", False):
            raise BlockIdsError(
                "LocalistDataCollator cannot wrap TRL's collator with padding_free=True: it puts the whole batch in "
                "one row, and a block layout (its general block, its anchor segments) is per example. Set "
                "padding_free=False (and no 'bfd' packing) in SFTConfig"
            )
        self.collator = collator
        self.tokenizer = tokenizer if tokenizer is not None else getattr(collator, "tokenizer", None)
        if padding_side is None:
            padding_side = "right" if trl else getattr(
                getattr(collator, "tokenizer", None) or self.tokenizer, "padding_side", None)
        if padding_side not in ("left", "right"):
            raise BlockIdsError(f"LocalistDataCollator: padding_side={padding_side!r} must be 'left' or 'right'; "
                                "pass padding_side= when the wrapped collator has no tokenizer")
        if trl and padding_side != "right":
            raise BlockIdsError(f"LocalistDataCollator: padding_side={padding_side!r}, but TRL's "
                                "DataCollatorForLanguageModeling pads on the right: drop padding_side=")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise BlockIdsError(f"LocalistDataCollator: max_length={max_length!r} must be a positive integer or None")
        if truncation_side not in ("left", "right"):
            raise BlockIdsError(f"LocalistDataCollator: truncation_side={truncation_side!r} must be 'left' (keep the "
                                "end) or 'right' (keep the start)")
        self.padding_side = padding_side
        self.keys = tuple(keys)
        self.max_length = max_length
        self.truncation_side = truncation_side

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not features or not all(isinstance(f, Mapping) for f in features):
            raise BlockIdsError("LocalistDataCollator: features must be a non-empty list of dicts (one per example)")
        features = [dict(f) for f in features]  # the caller's (dataset's) dicts stay untouched
        taken: dict[str, list[list[int]]] = {}
        for key in self.keys:
            present = [key in f for f in features]
            if not any(present):
                continue
            if not all(present):
                raise BlockIdsError(f"LocalistDataCollator: {key} is in {sum(present)} of {len(features)} features; "
                                    f"give every example {key} (0 everywhere for a general example) or none")
            rows = []
            for i, f in enumerate(features):
                row, n = _as_list(f.pop(key)), len(_as_list(f["input_ids"]))
                if len(row) > n == self.max_length:  # input_ids truncated to max_length: cut the block ids alike
                    row = row[:n] if self.truncation_side == "right" else row[len(row) - n:]
                if len(row) != n:
                    raise BlockIdsError(f"LocalistDataCollator: example {i} has {len(row)} {key} for {n} input_ids: "
                                        "they must be the same length (one block id per token)")
                rows.append(row)
            taken[key] = rows
        batch = self.collator(features)
        if taken:
            ids = batch["input_ids"]
            lengths = [ids.shape[1]] * len(features) if hasattr(ids, "shape") else [len(r) for r in ids]
            for key, rows in taken.items():
                batch[key] = torch.tensor(pad_block_ids(rows, lengths, self.padding_side), dtype=torch.long)
        return batch
