"""hf_localist: localist attention for Hugging Face Transformers models.

One dial from the unmodified (distributed) model to block-sparse (localist) attention, applied to existing
models through transformers' ``AttentionInterface``. See ``docs/`` (the design contract: ``docs/design.md``).

The training names (``LocalistTrainer``, ``LocalistCallback``, ``RecruitmentCallback``) are imported on first use
(PEP 562 ``__getattr__``): ``import hf_localist`` does not import transformers' ``Trainer`` machinery.
"""

import importlib

from .arch.registry import ArchSpec, get_arch_spec, register_localist_arch, supported_architectures
from .attention.function import ATTENTION_KEY, localist_attention
from .attention.recorder import DiagnosticsRecorder
from .blocks.chat import encode_chat
from .blocks.collator import LocalistDataCollator
from .blocks.ids import GENERAL_TOKEN, add_block_tokens, anchor_token
from .blocks.text import block_ids_from_spans, encode_blocks
from .checkpoints import fetch_checkpoint
from .config.localist import LocalistConfig
from .config.recruitment import RecruitmentConfig
from .errors import (
    BackendError,
    BlockIdsError,
    BlockKVError,
    LocalistConfigError,
    LocalistError,
    LocalistLoadError,
    LocalistStateError,
    UnsupportedArchitectureError,
)
from .patch.apply import apply_localist
from .patch.auto import AutoLocalistModel
from .patch.blockkv import BlockKV, composed_sequence
from .patch.handle import LocalistHandle
from .patch.kvstore import BlockKVStore
from .patch.persistence import load_localist_state, save_localist_state
from .recruitment.recruit import recruit
from .router.config import LocalistRouterConfig
from .router.model import LocalistRouterModel

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_KEY",
    "ArchSpec",
    "AutoLocalistModel",
    "BackendError",
    "BlockIdsError",
    "BlockKV",
    "BlockKVError",
    "BlockKVStore",
    "DiagnosticsRecorder",
    "GENERAL_TOKEN",
    "LocalistConfig",
    "LocalistConfigError",
    "LocalistDataCollator",
    "LocalistError",
    "LocalistCallback",
    "LocalistHandle",
    "LocalistLoadError",
    "LocalistRouterConfig",
    "LocalistRouterModel",
    "LocalistStateError",
    "LocalistTrainer",
    "RecruitmentCallback",
    "RecruitmentConfig",
    "UnsupportedArchitectureError",
    "add_block_tokens",
    "anchor_token",
    "apply_localist",
    "block_ids_from_spans",
    "composed_sequence",
    "encode_blocks",
    "encode_chat",
    "fetch_checkpoint",
    "get_arch_spec",
    "load_localist_state",
    "localist_attention",
    "recruit",
    "register_localist_arch",
    "save_localist_state",
    "supported_architectures",
]

#: name -> module (relative to this package) of the names imported on first use.
_LAZY = {
    "LocalistTrainer": ".trainer",
    "LocalistCallback": ".training.callback",
    "RecruitmentCallback": ".recruitment.recruit",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups find it directly
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
