"""The project's error hierarchy.

Every user-facing failure raises a subclass of :class:`LocalistError`, naming the bad value and what to do.
Subclasses also derive from the matching built-in (``ValueError``, ``OSError``, ...) so that code written
against the built-ins keeps working.
"""

from __future__ import annotations


class LocalistError(Exception):
    """Base class of every error raised by ``hf_localist``."""


class LocalistConfigError(LocalistError, ValueError):
    """A configuration field has a bad or inconsistent value. The message names the field and the value."""


class UnsupportedArchitectureError(LocalistError, ValueError):
    """The model type is not in the architecture registry and could not be detected automatically."""


class BlockIdsError(LocalistError, ValueError):
    """``block_ids`` / ``target_block_ids`` have the wrong shape, dtype or range, or are missing."""


class BackendError(LocalistError, RuntimeError):
    """The requested attention backend cannot run here (for example ``flex`` with gradients on CPU)."""


class LocalistLoadError(LocalistError, OSError):
    """A saved localist config or model is missing, corrupt, or does not match the model."""


class BlockKVError(LocalistError, ValueError):
    """Cached block keys / values cannot be encoded or composed exactly here (other model, settings or inputs)."""


class LocalistStateError(LocalistError, RuntimeError):
    """The model is not in the state the call needs (for example not patched, or already reverted)."""


__all__ = [
    "LocalistError",
    "LocalistConfigError",
    "UnsupportedArchitectureError",
    "BlockIdsError",
    "BackendError",
    "LocalistLoadError",
    "LocalistStateError",
    "BlockKVError",
]
