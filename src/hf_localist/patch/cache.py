"""The block ids of cached positions, kept on the KV cache object the caller passes from call to call.

The cache is per sequence, not per model: ``cache._localist_block_ids`` (B, L), ``cache._localist_sink`` (B,) and,
with assignment from context, ``cache._localist_assign`` (its running state per row, an ``AssignState``) ride with
it, and its batch / length methods (``reorder_cache``, ``batch_repeat_interleave``, ``batch_select_indices``,
``crop``) are wrapped by picklable objects so that the ids stay in step when ``generate`` reorders or crops it.
"""

from __future__ import annotations

from typing import Any

import torch

# transformers renamed the KV cache argument and output field from ``past_key_values`` to ``cache`` (5.24); read both.
_CACHE_NAMES = ("cache", "past_key_values")


def cache_arg(bound: dict) -> Any:
    """The KV cache passed to forward, by either name, also when it arrived through ``**kwargs``."""
    extra = bound.get("kwargs") if isinstance(bound.get("kwargs"), dict) else {}
    for name in _CACHE_NAMES:
        value = bound.get(name, extra.get(name))
        if value is not None:
            return value
    return None


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, or None. A ``ModelOutput`` is read as a mapping (its set fields): reading the
    deprecated ``past_key_values`` attribute when ``cache`` is unset would make transformers log a deprecation."""
    if isinstance(out, tuple):
        return None
    keys = out.keys() if callable(getattr(out, "keys", None)) else None
    for name in _CACHE_NAMES:
        if keys is not None:
            value = out[name] if name in keys else None
        else:
            value = out.__dict__.get(name) if hasattr(out, "__dict__") else None
        if value is not None and not isinstance(value, torch.Tensor):
            return value
    return None


def cache_length(cache: Any) -> int:
    if cache is None or isinstance(cache, (tuple, list)):
        return 0
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0


def _reorder(value, beam_idx):
    return value.index_select(0, beam_idx.to(value.device))


def _repeat(value, repeats):
    return value.repeat_interleave(repeats, dim=0)


def _select(value, indices):
    return value[indices.to(value.device)]


def _crop(value, n):
    # crop(n): n < 0 removes the last -n positions, n > 0 keeps the first n (older caches), n == 0 is a no-op.
    return value if value.dim() == 1 or n == 0 else value[:, :n]


_CACHE_METHODS = {"reorder_cache": _reorder, "batch_repeat_interleave": _repeat, "batch_select_indices": _select,
                  "crop": _crop}


class _TrackedCacheMethod:
    """A cache method that also applies its batch / length change to the block ids stored on the cache."""

    def __init__(self, cache: Any, name: str):
        self.cache = cache
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any):
        result = getattr(type(self.cache), self.name)(self.cache, *args, **kwargs)
        transform = _CACHE_METHODS[self.name]
        for attr in ("_localist_block_ids", "_localist_sink", "_localist_continue"):
            value = self.cache.__dict__.get(attr)
            if value is not None:
                setattr(self.cache, attr, transform(value, *args, **kwargs))
        assign = self.cache.__dict__.get("_localist_assign")
        if assign is not None and self.name != "crop":
            # Per-row state of contextual assignment: rows follow the cache. A crop keeps it as is: its ``length`` no
            # longer matches the cache, so continuing from a cropped cache is refused (the state of an earlier
            # position is not kept).
            self.cache._localist_assign = assign.map(lambda value: transform(value, *args, **kwargs))
        return result


def track_cache(cache: Any) -> None:
    """Keep the block ids stored on a cache in step when generate() reorders, expands, selects or crops it."""
    if cache.__dict__.get("_localist_tracked"):
        return
    for name in _CACHE_METHODS:
        if callable(getattr(type(cache), name, None)):
            setattr(cache, name, _TrackedCacheMethod(cache, name))
    cache._localist_tracked = True
