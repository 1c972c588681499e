"""Recruitment: new blocks for tokens the model is confused about, during or after training."""

from .recruit import RecruitmentCallback, recruit

__all__ = ["RecruitmentCallback", "recruit"]
