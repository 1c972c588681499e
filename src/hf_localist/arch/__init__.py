"""Architecture registry: where Q/K live in each supported model family (data, read by one generic patcher), and the
per-head Q/K weight views that the training penalties read."""

from .qk import head_counts, qk_head_weights
from .registry import ArchSpec, get_arch_spec, register_localist_arch, supported_architectures

__all__ = ["ArchSpec", "get_arch_spec", "head_counts", "qk_head_weights", "register_localist_arch",
           "supported_architectures"]
