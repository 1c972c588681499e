"""Patching: apply_localist, the handle that controls and reverts it, the patched forward, persistence."""

from .apply import apply_localist
from .auto import AutoLocalistModel
from .handle import LocalistHandle

__all__ = ["AutoLocalistModel", "LocalistHandle", "apply_localist"]
