"""hf_localist: localist attention for Hugging Face Transformers models.

One dial from the unmodified (distributed) model to block-sparse (localist) attention, applied to existing
models through transformers' ``AttentionInterface``. See ``docs/`` (the design contract: ``docs/design.md``).
"""

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
from .recruitment.recruit import RecruitmentCallback, recruit
from .router.config import LocalistRouterConfig
from .router.model import LocalistRouterModel
from .trainer import LocalistTrainer
from .training.callback import LocalistCallback

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
    "localist_attention",
    "recruit",
    "register_localist_arch",
    "supported_architectures",
]
