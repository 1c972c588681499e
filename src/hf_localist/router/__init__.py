"""Router: a PreTrainedModel that routes each input over specialist (localist) models."""

from .config import LocalistRouterConfig
from .model import LocalistRouterModel

__all__ = ["LocalistRouterConfig", "LocalistRouterModel"]
