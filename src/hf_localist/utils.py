"""Small shared helpers: atomic file writes, right-padding of token id lists (directory commits: savedir.py)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Sequence

import torch

from .errors import LocalistLoadError


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a partial one."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (ids, attention_mask), both (N, max_len), padded on the right with ``pad_id``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def read_json_object(path: str, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``LocalistLoadError`` naming the file and ``fix`` (what the user should do) when
    it is missing, unreadable, not JSON, nested too deeply to parse, or anything but an object."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError) as e:
        raise LocalistLoadError(f"{path!r} is corrupt or unreadable ({type(e).__name__}: {e}): {fix}") from None
    if not isinstance(data, dict):
        raise LocalistLoadError(f"{path!r} is corrupt (a JSON {type(data).__name__}, not an object): {fix}")
    return data
