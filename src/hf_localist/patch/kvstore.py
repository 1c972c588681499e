"""``BlockKVStore``: encode each block once, across prompts and processes.

Blocks are keyed by their token ids and sink (a blake2b hash), under the fingerprint of the model that encodes them
(:func:`hf_localist.patch.blockkv.fingerprint`), so two models never share an entry. In memory the store is an LRU
bounded by ``max_bytes``; with ``directory`` every encoded block is also written there
(``<directory>/<fingerprint>/<key>.safetensors``, atomically), and a miss in memory reads the disk before encoding.
Several processes may share a directory: a file is complete or absent, and two processes that encode the same
block write the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import BlockKVError, LocalistLoadError
from .blockkv import BlockKV, as_block_ids, fingerprint, sink_id

if TYPE_CHECKING:  # annotations only
    from transformers import DynamicCache

    from .handle import LocalistHandle


class BlockKVStore:
    """A cache of :class:`BlockKV` for one localist model: ``store.get(ids)`` encodes a block at most once.

    Args:
        handle: the model's :class:`~hf_localist.LocalistHandle` (``model.localist_handle``).
        max_bytes: memory budget of the in-memory LRU (keys and values of the blocks held); ``0`` keeps nothing in
            memory (disk only).
        directory: optional folder for the on-disk copy, shared across processes and runs.
        sink_token_id: the sink every composed prompt starts with (default: the model config's ``bos_token_id``).
    """

    def __init__(self, handle: LocalistHandle, max_bytes: int = 1 << 30, directory: str | os.PathLike | None = None,
                 sink_token_id: int | None = None):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise BlockKVError(f"BlockKVStore: max_bytes={max_bytes!r} must be an integer >= 0 (bytes of memory)")
        self.handle = handle
        self.max_bytes = max_bytes
        self.directory = os.fspath(directory) if directory is not None else None
        if self.directory is not None:
            if os.path.exists(self.directory) and not os.path.isdir(self.directory):
                raise BlockKVError(f"BlockKVStore: directory={self.directory!r} exists and is not a directory")
            os.makedirs(self.directory, exist_ok=True)
        self.sink_token_id = sink_id(handle, sink_token_id)
        self._memory: OrderedDict[str, BlockKV] = OrderedDict()
        self._bytes = 0
        self.stats = {"hits": 0, "disk_hits": 0, "encoded": 0, "evicted": 0}

    # ------------------------------------------------------------------ lookup
    def key(self, input_ids: Any) -> str:
        """The store key of a block: a hash of its token ids and the sink (the model's fingerprint not included)."""
        ids = as_block_ids(input_ids, "BlockKVStore", None)
        h = hashlib.blake2b(digest_size=16)
        h.update(str(self.sink_token_id).encode() + b"|")
        h.update(ids.cpu().numpy().astype("<i8").tobytes())
        return h.hexdigest()

    def get(self, input_ids: Any) -> BlockKV:
        """The block's :class:`BlockKV`: from memory, else from the directory, else encoded (and stored)."""
        model_print = fingerprint(self.handle, self.sink_token_id)
        name = f"{model_print}/{self.key(input_ids)}"
        hit = self._memory.get(name)
        if hit is not None:
            self._memory.move_to_end(name)
            self.stats["hits"] += 1
            return hit
        kv = self._read(name, model_print)
        if kv is None:
            kv = self.handle.encode_block(input_ids, sink_token_id=self.sink_token_id)
            self.stats["encoded"] += 1
            if self.directory is not None:
                path = self._path(name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                kv.save(path)
        else:
            self.stats["disk_hits"] += 1
        self._remember(name, kv)
        return kv

    def compose(self, blocks: Sequence[Any]) -> DynamicCache:
        """``handle.compose_cache([store.get(ids) for ids in blocks])``: the cache of ``[sink] + blocks``."""
        return self.handle.compose_cache([self.get(ids) for ids in blocks])

    def __contains__(self, input_ids: Any) -> bool:
        name = f"{fingerprint(self.handle, self.sink_token_id)}/{self.key(input_ids)}"
        return name in self._memory or (self.directory is not None and os.path.isfile(self._path(name)))

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory now (never above ``max_bytes``)."""
        return self._bytes

    def clear(self) -> None:
        """Forget the blocks held in memory (the directory is kept)."""
        self._memory.clear()
        self._bytes = 0

    # ------------------------------------------------------------------ internals
    def _path(self, name: str) -> str:
        return os.path.join(self.directory, *name.split("/")) + ".safetensors"

    def _read(self, name: str, model_print: str) -> BlockKV | None:
        if self.directory is None or not os.path.isfile(self._path(name)):
            return None
        try:
            kv = BlockKV.load(self._path(name), device=next(self.handle.base.parameters()).device)
        except LocalistLoadError:
            return None  # a damaged entry is encoded again (and rewritten)
        return kv if kv.fingerprint == model_print else None

    def _remember(self, name: str, kv: BlockKV) -> None:
        size = kv.nbytes
        if size > self.max_bytes:
            return  # larger than the whole budget: returned to the caller, not held
        while self._memory and self._bytes + size > self.max_bytes:
            _, old = self._memory.popitem(last=False)  # least recently used first
            self._bytes -= old.nbytes
            self.stats["evicted"] += 1
        self._memory[name] = kv
        self._bytes += size

