"""``LocalistDataCollator``: a transformers data collator that also pads ``block_ids`` (for ``Trainer``).

transformers' collators pad ``input_ids`` / ``attention_mask`` (``tokenizer.pad``) but do not know ``block_ids``:
a ragged ``block_ids`` list makes their tensor conversion fail. The wrapper takes the block-id keys out of each
feature, lets the wrapped collator build the batch, then pads the block ids with 0 (the general block; the
positions are masked anyway) on the side the tokenizer padded, to the batch's sequence length.
"""

from __future__ import annotations

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


class LocalistDataCollator:
    """Wrap a transformers collator so that ``block_ids`` (and ``target_block_ids``) are padded with the batch.

    ``collator``: the collator to wrap; default ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``
    (causal-LM labels, padding -100) with ``language_modeling=True``, else ``DataCollatorWithPadding(tokenizer)``
    (features carry their own labels). The padding side is the wrapped collator's tokenizer's ``padding_side``
    (``padding_side=`` overrides it; it must match how the collator pads). Each feature's ``block_ids`` must have the
    length of its ``input_ids`` (``BlockIdsError`` otherwise); either every feature has a block-id key or none.
    Returns the wrapped collator's batch plus ``(batch, seq)`` LongTensors for the block-id keys.
    """

    def __init__(self, tokenizer: Any = None, collator: Callable | None = None, *, language_modeling: bool = True,
                 padding_side: str | None = None, keys: Sequence[str] = BLOCK_KEYS):
        if collator is None:
            if tokenizer is None:
                raise BlockIdsError("LocalistDataCollator needs a tokenizer or a collator to wrap")
            collator = (DataCollatorForLanguageModeling(tokenizer, mlm=False) if language_modeling
                        else DataCollatorWithPadding(tokenizer))
        self.collator = collator
        self.tokenizer = tokenizer if tokenizer is not None else getattr(collator, "tokenizer", None)
        if padding_side is None:
            padding_side = getattr(getattr(collator, "tokenizer", None) or self.tokenizer, "padding_side", None)
        if padding_side not in ("left", "right"):
            raise BlockIdsError(f"LocalistDataCollator: padding_side={padding_side!r} must be 'left' or 'right'; "
                                "pass padding_side= when the wrapped collator has no tokenizer")
        self.padding_side = padding_side
        self.keys = tuple(keys)

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
