"""Configuration: the typed, validated settings of localist attention and of recruitment."""

from .localist import LOCALIST_CONFIG_NAME, MODEL_CONFIG_KEY, LocalistConfig
from .recruitment import RecruitmentConfig

__all__ = ["LOCALIST_CONFIG_NAME", "MODEL_CONFIG_KEY", "LocalistConfig", "RecruitmentConfig"]
