"""hf_localist: localist attention for Hugging Face Transformers models.

One dial from the unmodified (distributed) model to block-sparse (localist) attention, applied to existing
models through transformers' ``AttentionInterface``. See ``docs/`` and DESIGN.md.
"""

from .attention import ATTENTION_KEY, localist_attention
from .auto import AutoLocalistModel
from .callback import LocalistCallback
from .blocks import GENERAL_TOKEN, add_block_tokens, anchor_token
from .config import LocalistConfig
from .errors import (
    BackendError,
    BlockIdsError,
    LocalistConfigError,
    LocalistError,
    LocalistLoadError,
    LocalistStateError,
    UnsupportedArchitectureError,
)
from .patch import LocalistHandle, apply_localist
from .recorder import DiagnosticsRecorder
from .recruitment import RecruitmentCallback, recruit
from .recruitment_config import RecruitmentConfig
from .registry import ArchSpec, get_arch_spec, register_localist_arch, supported_architectures
from .router import LocalistRouterModel
from .router_config import LocalistRouterConfig
from .trainer import LocalistTrainer

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_KEY",
    "ArchSpec",
    "AutoLocalistModel",
    "BackendError",
    "BlockIdsError",
    "DiagnosticsRecorder",
    "GENERAL_TOKEN",
    "LocalistConfig",
    "LocalistConfigError",
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
    "get_arch_spec",
    "localist_attention",
    "recruit",
    "register_localist_arch",
    "supported_architectures",
]
