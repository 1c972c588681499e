"""Training: group-lasso penalties, Q/K subspaces, calibration of the bound constants, the Trainer callback."""

from .calibration import ConstantsReport, estimate_constants
from .callback import LocalistCallback
from .penalty import group_norms, head_block_map, penalty, prox_step

__all__ = ["ConstantsReport", "LocalistCallback", "estimate_constants", "group_norms", "head_block_map", "penalty",
           "prox_step"]
