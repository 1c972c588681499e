"""Build ``input_ids``, ``attention_mask`` and ``block_ids`` from text (docs/howto-blocks-from-text.md).

- ``encode_blocks``: a list of ``(block, text)`` pieces, plus an optional general text (the question of a RAG
  prompt) appended after them as block 0;
- ``block_ids_from_spans``: one text and character spans ``(start, end, block)`` over it;
- ``encode_chat`` (``blocks/chat.py``): chat messages or documents rendered by the tokenizer's chat template.

Each takes one example or a list of examples and returns a ``transformers.BatchEncoding``. Rules they share:

- A block is an ``int`` (0 = the general block, 1..max_blocks = slots) or a name. With ``block_names`` a list, name
  ``i`` is block ``i + 1``, as ``LocalistConfig.block_names`` and ``add_block_tokens``; a mapping gives each name its
  id; ``config=`` supplies its ``block_names`` when ``block_names`` is not given, and bounds ids by its
  ``max_blocks``.
- The sink (docs/design.md section 1) is the first non-padding position. ``add_sink=True`` puts the tokenizer's
  BOS token there, in block 0, unless the row already starts with it; a tokenizer without a BOS token adds nothing
  and the first token (the first piece's) is the sink. ``add_sink`` may also be a token id, e.g. a CLS token.
- Padding is ``tokenizer.pad``'s, on ``padding_side`` (default ``tokenizer.padding_side``); ``block_ids`` are padded
  with 0 on the same side (``collator.pad_block_ids``).
- Every bad input raises ``BlockIdsError`` (a ``ValueError``) naming the value and the fix.
"""

from __future__ import annotations

import operator
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import BatchEncoding

from ..config.localist import LocalistConfig
from ..errors import BlockIdsError
from .collator import pad_block_ids

#: A resolved span: (start char, end char, block id, index of the span as the caller gave it).
Span = tuple[int, int, int, int]


# ---------------------------------------------------------------------------------------------- blocks, sink
def block_table(block_names: Sequence[str] | Mapping[str, int] | None,
                config: LocalistConfig | None) -> tuple[dict[str, int], int | None]:
    """(name -> block id, max_blocks or None) from ``block_names`` (a list: name i -> i + 1, or a mapping) or
    ``config.block_names``."""
    max_blocks = config.max_blocks if config is not None else None
    if block_names is None:
        block_names = list(config.block_names) if config is not None else []
    if isinstance(block_names, Mapping):
        table = {}
        for name, value in block_names.items():
            table[str(name)] = resolve_block(value, {}, max_blocks, f"block_names[{name!r}]")
        return table, max_blocks
    if isinstance(block_names, str) or not isinstance(block_names, Sequence):
        raise BlockIdsError(f"block_names={block_names!r} must be a list of names (name i is block i + 1) or a "
                            "mapping name -> block id")
    return {str(name): i + 1 for i, name in enumerate(block_names)}, max_blocks


def resolve_block(value: Any, names: dict[str, int], max_blocks: int | None, where: str) -> int:
    """The block id of ``value``: an integer in [0, max_blocks] or a name in ``names``."""
    if isinstance(value, str):
        if value not in names:
            known = sorted(names, key=names.get) if names else "none: pass block_names=[...] or config="
            raise BlockIdsError(f"{where}: block name {value!r} is unknown (known names: {known}); name i of "
                                "block_names is block i + 1, or give the id as an int")
        return names[value]
    try:
        if isinstance(value, bool):
            raise TypeError
        block = operator.index(value)
    except TypeError:
        raise BlockIdsError(f"{where}: block {value!r} must be an int (0 = general, 1..max_blocks) or a block "
                            "name") from None
    if block < 0 or (max_blocks is not None and block > max_blocks):
        raise BlockIdsError(f"{where}: block id {block} is outside [0, max_blocks={max_blocks}]: 0 is the general "
                            "block and 1..max_blocks are slots; raise LocalistConfig.max_blocks for more")
    return block


def sink_token_id(tokenizer: Any, add_sink: bool | int) -> int | None:
    """The token put at the sink: the BOS token's id for ``True`` (None without one), the id itself for an int."""
    if isinstance(add_sink, bool):
        return getattr(tokenizer, "bos_token_id", None) if add_sink else None
    try:
        return operator.index(add_sink)
    except TypeError:
        raise BlockIdsError(f"add_sink={add_sink!r} must be True (the BOS token), False, or a token id") from None


def with_sink(ids: list[int], blocks: list[int], sink: int | None) -> tuple[list[int], list[int]]:
    """Prepend the sink token (block 0) unless the row already starts with it."""
    if sink is None or (ids and ids[0] == sink):
        return ids, blocks
    return [sink] + ids, [0] + blocks


def require_fast(tokenizer: Any, fn: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise BlockIdsError(f"{fn} needs character offsets (return_offsets_mapping), which only fast tokenizers "
                            f"give; {type(tokenizer).__name__} is not one: load it with AutoTokenizer.from_pretrained"
                            "(..., use_fast=True), or build the input from pieces with encode_blocks")


# ---------------------------------------------------------------------------------------------- spans -> tokens
def check_spans(text: str, spans: Any, names: dict[str, int], max_blocks: int | None, where: str) -> list[Span]:
    """Validate ``[(start, end, block), ...]`` over ``text``; returns them sorted by start, blocks resolved."""
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise BlockIdsError(f"{where}: spans must be a list of (start, end, block) triples, got {type(spans).__name__}")
    out = []
    for i, span in enumerate(spans):
        if isinstance(span, (str, bytes)) or not isinstance(span, Sequence) or len(span) != 3:
            raise BlockIdsError(f"{where}: span {i} = {span!r} must be a (start, end, block) triple")
        start, end, block = span
        if isinstance(start, bool) or isinstance(end, bool) or not all(hasattr(v, "__index__") for v in (start, end)):
            raise BlockIdsError(f"{where}: span {i} = {span!r} needs integer character offsets start, end")
        start, end = operator.index(start), operator.index(end)
        if not 0 <= start < end <= len(text):
            raise BlockIdsError(f"{where}: span {i} = {tuple(span)!r} is out of range: need 0 <= start < end <= "
                                f"len(text) = {len(text)} (end is exclusive, as in text[start:end])")
        out.append((start, end, resolve_block(block, names, max_blocks, f"{where}: span {i}"), i))
    out.sort()
    for prev, cur in zip(out, out[1:]):
        if cur[0] < prev[1]:
            raise BlockIdsError(f"{where}: spans {prev[3]} = {tuple(spans[prev[3]])!r} and {cur[3]} = "
                                f"{tuple(spans[cur[3]])!r} overlap: a character belongs to at most one span; "
                                "make them disjoint (end is exclusive)")
    return out


def assign_tokens(text: str, offsets: Sequence[tuple[int, int]], spans: list[Span]) -> tuple[list[int], list[int]]:
    """(block id per token, number of tokens per span). A token belongs to the span holding its first
    non-whitespace character (its first character when it is all whitespace), so a token that carries the space
    before a word (SentencePiece's ``▁Paris``, byte-level BPE without trimmed offsets) goes with the word. Tokens
    with an empty range (special tokens the tokenizer added) and tokens outside every span are block 0."""
    starts = [s[0] for s in spans]
    blocks, counts = [], [0] * len(spans)
    for ts, te in offsets:
        if te <= ts:
            blocks.append(0)
            continue
        c = next((c for c in range(ts, te) if not text[c].isspace()), ts)
        k = bisect_right(starts, c) - 1
        if k >= 0 and c < spans[k][1]:
            blocks.append(spans[k][2])
            counts[k] += 1
        else:
            blocks.append(0)
    return blocks, counts


def tokenize_with_offsets(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> tuple[list, list]:
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


# ---------------------------------------------------------------------------------------------- padding, output
def finish(tokenizer: Any, rows: list[tuple[list[int], list[int]]], batched: bool, *, padding: bool | str,
           max_length: int | None, pad_to_multiple_of: int | None, padding_side: str | None,
           return_tensors: str | None) -> BatchEncoding:
    """Pad the rows (ids, block ids) with ``tokenizer.pad`` and block 0; one BatchEncoding (unbatched lists for a
    single example without ``return_tensors``, like ``tokenizer(text)``)."""
    for i, (ids, _) in enumerate(rows):
        if not ids:
            raise BlockIdsError(f"example {i} has no token: give it pieces or text, or keep add_sink=True")
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise BlockIdsError(f"padding_side={side!r} must be 'left' or 'right'")
    feats = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids, _ in rows]
    lengths = {len(ids) for ids, _ in rows}
    no_pad_needed = padding in (True, "longest") and len(lengths) == 1 and pad_to_multiple_of is None
    if padding not in (False, "do_not_pad") and not no_pad_needed:
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise BlockIdsError(f"the examples need padding but {type(tokenizer).__name__} has no pad token: set "
                                "tokenizer.pad_token = tokenizer.eos_token (or add one), or pass padding=False")
        padded = tokenizer.pad(feats, padding=padding, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
                               padding_side=side, return_tensors=None)
        feats = [{"input_ids": a, "attention_mask": m}
                 for a, m in zip(padded["input_ids"], padded["attention_mask"])]
    block_rows = pad_block_ids([b for _, b in rows], [len(f["input_ids"]) for f in feats], side)
    data = {"input_ids": [f["input_ids"] for f in feats], "attention_mask": [f["attention_mask"] for f in feats],
            "block_ids": block_rows}
    if return_tensors is not None and len({len(r) for r in data["input_ids"]}) > 1:
        raise BlockIdsError(f"rows have different lengths {sorted({len(r) for r in data['input_ids']})} and "
                            f"return_tensors={return_tensors!r} needs one: pass padding=True, or return_tensors=None "
                            "(lists, padded later by LocalistDataCollator)")
    if not batched and return_tensors is None:
        data = {k: v[0] for k, v in data.items()}
    return BatchEncoding(data, tensor_type=return_tensors)


# ---------------------------------------------------------------------------------------------- encode_blocks
def _is_piece(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[1], str)


def encode_blocks(tokenizer: Any, pieces: Sequence, *, general: str | Sequence[str | None] | None = None,
                  block_names: Sequence[str] | Mapping[str, int] | None = None, config: LocalistConfig | None = None,
                  add_sink: bool | int = True, padding: bool | str = True, max_length: int | None = None,
                  pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                  return_tensors: str | None = "pt") -> BatchEncoding:
    """``input_ids``, ``attention_mask`` and ``block_ids`` from ``(block, text)`` pieces.

    ``pieces`` is one example, ``[(block, text), ...]``, or a batch, a list of such lists (then ``general`` is a
    list with one text or None per example). Each piece is tokenized on its own with ``add_special_tokens=False``
    (no BOS per piece), so each token has exactly one block; the row is ``[sink] + piece tokens... + general
    tokens``, ``general`` in block 0. Pieces keep their text as given: put the spaces or newlines that separate
    them inside the pieces. Returns a BatchEncoding of (batch, seq) tensors (``return_tensors=None``: lists,
    unpadded with ``padding=False``, e.g. for ``datasets.map`` and :class:`LocalistDataCollator`).
    """
    if isinstance(pieces, (str, bytes)) or not isinstance(pieces, Sequence):
        raise BlockIdsError(f"encode_blocks: pieces must be a list of (block, text) pairs, got {pieces!r}")
    batched = not all(_is_piece(p) for p in pieces)
    examples = list(pieces) if batched else [pieces]
    for j, ex in enumerate(examples):
        bad = None if isinstance(ex, (list, tuple)) else ex
        bad = bad if bad is not None else next((p for p in ex if not _is_piece(p)), None)
        if bad is not None:
            raise BlockIdsError(f"encode_blocks: example {j} holds {bad!r}; each piece must be a (block, text) pair "
                                "with text a str, and a batch a list of lists of such pairs")
    if general is None or isinstance(general, str):
        if batched and general is not None:
            raise BlockIdsError("encode_blocks: for a batch, general must be a list with one text (or None) per "
                                f"example, got the single text {general!r}")
        generals = [general] * len(examples)
    else:
        generals = list(general)
        if not batched or len(generals) != len(examples):
            raise BlockIdsError(f"encode_blocks: general has {len(generals)} entries for "
                                f"{len(examples) if batched else 'a single example'}: give one text (or None) per "
                                "example of a batch, a str for a single example")
    names, max_blocks = block_table(block_names, config)
    sink = sink_token_id(tokenizer, add_sink)
    # One tokenizer call for every text of the batch: (example, piece index or -1 for general, block, text).
    items = [(j, i, resolve_block(b, names, max_blocks, f"encode_blocks: example {j}, piece {i}"), t)
             for j, ex in enumerate(examples) for i, (b, t) in enumerate(ex)]
    items += [(j, -1, 0, g) for j, g in enumerate(generals) if g is not None]
    token_ids = tokenizer([t for *_, t in items], add_special_tokens=False)["input_ids"] if items else []
    rows = [([], []) for _ in examples]
    for (j, i, block, text), ids in sorted(zip(items, token_ids), key=lambda x: (x[0][0], x[0][1] < 0)):
        if not ids:
            what = "general" if i < 0 else f"piece {i}"
            raise BlockIdsError(f"encode_blocks: example {j}, {what} = {text!r} gives no token: drop it or give it "
                                "text")
        rows[j][0].extend(ids)
        rows[j][1].extend([block] * len(ids))
    rows = [with_sink(ids, blocks, sink) for ids, blocks in rows]
    return finish(tokenizer, rows, batched, padding=padding, max_length=max_length,
                  pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side, return_tensors=return_tensors)


# ---------------------------------------------------------------------------------------------- block_ids_from_spans
def block_ids_from_spans(tokenizer: Any, text: str | Sequence[str], spans: Sequence, *,
                         block_names: Sequence[str] | Mapping[str, int] | None = None,
                         config: LocalistConfig | None = None, add_sink: bool | int = True,
                         add_special_tokens: bool = False, padding: bool | str = True,
                         max_length: int | None = None, pad_to_multiple_of: int | None = None,
                         padding_side: str | None = None, return_tensors: str | None = "pt") -> BatchEncoding:
    """Tokenize ``text`` and give each token the block of the character span ``(start, end, block)`` it falls in.

    ``end`` is exclusive (``text[start:end]``); characters outside every span are block 0. A token belongs to the
    span that holds its first non-whitespace character. Spans must satisfy ``0 <= start < end <= len(text)``, be
    disjoint, and each catch at least one token, else ``BlockIdsError``. A batch: a list of texts and a list of
    span lists. Needs a fast tokenizer (offsets). ``add_special_tokens`` is passed to the tokenizer (its special
    tokens are block 0); then the sink is added as in :func:`encode_blocks`.
    """
    batched = not isinstance(text, str)
    texts = list(text) if batched else [text]
    span_lists = list(spans) if batched else [spans]
    if batched and (not all(isinstance(t, str) for t in texts) or len(span_lists) != len(texts)):
        raise BlockIdsError(f"block_ids_from_spans: a batch needs a list of texts (str) and one span list per text; "
                            f"got {len(texts)} texts and {len(span_lists)} span lists")
    require_fast(tokenizer, "block_ids_from_spans")
    names, max_blocks = block_table(block_names, config)
    checked = [check_spans(t, s, names, max_blocks, f"block_ids_from_spans: text {j}")
               for j, (t, s) in enumerate(zip(texts, span_lists))]
    all_ids, all_offsets = tokenize_with_offsets(tokenizer, texts, add_special_tokens)
    sink = sink_token_id(tokenizer, add_sink)
    rows = []
    for j, (t, sp, ids, offsets) in enumerate(zip(texts, checked, all_ids, all_offsets)):
        blocks, counts = assign_tokens(t, offsets, sp)
        for (start, end, _, i), n in zip(sp, counts):
            if n == 0:
                raise BlockIdsError(f"block_ids_from_spans: text {j}, span {i} = {tuple(span_lists[j][i])!r} "
                                    f"({t[start:end]!r}) holds the first non-whitespace character of no token: "
                                    "widen it to cover a whole token or drop it")
        rows.append(with_sink(list(ids), blocks, sink))
    return finish(tokenizer, rows, batched, padding=padding, max_length=max_length,
                  pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side, return_tensors=return_tensors)
