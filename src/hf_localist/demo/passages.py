"""Labelled text for the demo on a user's model: a CSV of (text, label) rows, and multi-passage sequences.

The labels are the blocks: a sequence is ``[sink] passage_1 ... passage_n``, passages of ``n`` distinct labels,
each truncated to ``passage_tokens`` tokens; the tokens of a passage of label ``k`` get block id ``k + 1`` and the
sink (the tokenizer's BOS token) is block 0. Per-block NLL is the mean over a passage's tokens except its first one:
the first token of a passage is predicted from the previous passage's last position, which belongs to another
block, so it measures the boundary, not the block (the passage-alone reference drops the same token).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from datasets import load_dataset

from ..errors import LocalistConfigError
from ..utils import pad_right


@dataclass
class LabeledText:
    """The rows of a labelled CSV, split into train and test per label."""

    labels: list[str]  # the label values used, most frequent first (at most ``max_labels``)
    train: dict[str, list[str]]
    test: dict[str, list[str]]
    source: str


def load_labeled_csv(path: str, text_column: str, label_column: str, *, max_labels: int = 8,
                     test_fraction: float = 0.2, seed: int = 0) -> LabeledText:
    """Read ``path`` with ``datasets`` (a CSV with a header row); keep the ``max_labels`` most frequent labels.

    Label values are compared as strings, with a float that is an integer written as that integer (``"2.0"`` and
    ``"2"`` are one label). Each label's rows are shuffled (seeded) and split ``1 - test_fraction`` / ``test_fraction``.
    """
    try:
        ds = load_dataset("csv", data_files=str(path), split="train")
    except FileNotFoundError as exc:
        raise LocalistConfigError(f"--data {path!r}: no such file; pass a CSV file with a header row") from exc
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise LocalistConfigError(f"--data {path!r} has no column(s) {missing}; its columns are {ds.column_names}. "
                                  "Pass --text_column and --label_column")
    rows: dict[str, list[str]] = {}
    for text, label in zip(ds[text_column], ds[label_column]):
        if text is None or label is None or not str(text).strip():
            continue
        rows.setdefault(_label_name(label), []).append(_clean(str(text)))
    counts = Counter({k: len(v) for k, v in rows.items()})
    labels = sorted((k for k, _ in counts.most_common(max_labels)), key=lambda k: (not k.isdigit(), k.zfill(12)))
    if len(labels) < 2:
        raise LocalistConfigError(f"--label_column {label_column!r} of {path!r} has {len(labels)} distinct "
                                  "label(s); the demo needs at least 2 (the labels are the blocks)")
    rng = random.Random(seed)
    train, test = {}, {}
    for label in labels:
        texts = list(rows[label])
        rng.shuffle(texts)
        n_test = max(1, int(round(len(texts) * test_fraction)))
        test[label], train[label] = texts[:n_test], texts[n_test:]
        if not train[label]:
            raise LocalistConfigError(f"label {label!r} has {len(texts)} row(s): too few to split into train/test")
    return LabeledText(labels, train, test, str(path))


def _label_name(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _clean(text: str) -> str:
    # AG News keeps HTML-entity remnants and backslash line breaks; harmless elsewhere.
    for a, b in ((" #39;", "'"), ("#39;", "'"), (" quot;", '"'), (" #36;", " $"), (" amp;", " &"), ("\\", " ")):
        text = text.replace(a, b)
    return " ".join(text.split())


def sink_token_id(tokenizer) -> int:
    """The sink: the token a document starts with in pretraining.

    The BOS token if the tokenizer adds it by itself (Gemma); else ``<|endoftext|>`` if the vocabulary has it (the
    document separator of GPT-2-style and SmolLM pretraining: SmolLM2-Instruct's BOS is the chat token
    ``<|im_start|>``, and passages read after it have 15% higher perplexity than after ``<|endoftext|>``); else
    the BOS token, else the EOS token.
    """
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]:
        return int(bos)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else None
    for tid in (eot, bos, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise LocalistConfigError("the tokenizer has neither a BOS nor an EOS token: set tokenizer.bos_token to the "
                              "token that starts a document")


@dataclass
class PassageSequence:
    input_ids: list[int]
    block_ids: list[int]
    spans: list[tuple[str, int, int]]  # (label, start, end) of each passage in input_ids


def encode_passages(tokenizer, texts: dict[str, list[str]], labels: Sequence[str], passage_tokens: int) \
        -> dict[str, list[list[int]]]:
    """Token ids (no special tokens) per label, truncated to ``passage_tokens``; passages under 8 tokens dropped."""
    out = {}
    for label in labels:
        ids = tokenizer(list(texts[label]), add_special_tokens=False)["input_ids"]
        out[label] = [x[:passage_tokens] for x in ids if len(x) >= 8]
    return out


def passage_sequences(encoded: dict[str, list[list[int]]], labels: Sequence[str], sink: int, n_sequences: int,
                      passages: int, seed: int) -> list[PassageSequence]:
    """``n_sequences`` sequences of ``passages`` passages of distinct labels (block id of label ``k``: ``k + 1``)."""
    rng = random.Random(seed)
    n = min(passages, len(labels))
    pools = {label: list(encoded[label]) for label in labels}
    for pool in pools.values():
        rng.shuffle(pool)
    out = []
    for i in range(n_sequences):
        chosen = rng.sample(list(labels), n)
        ids, blocks, spans = [sink], [0], []
        for label in chosen:
            pool = pools[label]
            if not pool:
                raise LocalistConfigError(f"label {label!r} has too few passages for {n_sequences} sequences")
            passage = pool[i % len(pool)]
            spans.append((label, len(ids), len(ids) + len(passage)))
            ids += passage
            blocks += [list(labels).index(label) + 1] * len(passage)
        out.append(PassageSequence(ids, blocks, spans))
    return out


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) NLL of token t given positions < t (column 0 is 0: nothing predicts the first token)."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return torch.nn.functional.pad(nll, (1, 0))


@torch.no_grad()
def block_nll(model, seqs: Sequence[PassageSequence], pad_id: int, batch_size: int = 4, **forward_kwargs) \
        -> dict[str, list[float]]:
    """Per label, the summed NLL and token count of its passages (first token of each passage excluded)."""
    totals: dict[str, list[float]] = {}
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i: i + batch_size]
        ids, mask = pad_right([s.input_ids for s in chunk], pad_id)
        blocks, _ = pad_right([s.block_ids for s in chunk], 0)
        nll = token_nll(model(input_ids=ids, attention_mask=mask, block_ids=blocks, **forward_kwargs).logits, ids)
        for row, s in enumerate(chunk):
            for label, start, end in s.spans:
                acc = totals.setdefault(label, [0.0, 0])
                acc[0] += float(nll[row, start + 1: end].sum())
                acc[1] += end - start - 1
    return totals


@torch.no_grad()
def alone_nll(model, seqs: Sequence[PassageSequence], sink: int, pad_id: int, batch_size: int = 8) \
        -> dict[str, list[float]]:
    """The reference: each passage read alone after the sink, by the unmodified model (same tokens scored)."""
    pieces = [(label, [sink] + s.input_ids[start:end]) for s in seqs for label, start, end in s.spans]
    totals: dict[str, list[float]] = {}
    for i in range(0, len(pieces), batch_size):
        chunk = pieces[i: i + batch_size]
        ids, mask = pad_right([p for _, p in chunk], pad_id)
        nll = token_nll(model(input_ids=ids, attention_mask=mask).logits, ids)
        for row, (label, p) in enumerate(chunk):
            acc = totals.setdefault(label, [0.0, 0])
            acc[0] += float(nll[row, 2: len(p)].sum())  # drop the sink and the passage's first token
            acc[1] += len(p) - 2
    return totals


def perplexities(totals: dict[str, list[float]], labels: Sequence[str]) -> dict[str, float]:
    """Per label and over all ("all") the perplexity exp(summed NLL / tokens)."""
    out = {label: math.exp(totals[label][0] / max(totals[label][1], 1)) for label in labels if label in totals}
    nll = sum(v[0] for v in totals.values())
    count = sum(v[1] for v in totals.values())
    out["all"] = math.exp(nll / max(count, 1))
    return out
