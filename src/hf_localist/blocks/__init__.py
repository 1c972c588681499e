"""Blocks: block ids per token (explicit, segment from anchor tokens, centroid assignment) and their checks."""

from .centroid import centroid_block_ids
from .ids import GENERAL_TOKEN, add_block_tokens, anchor_token, segment_block_ids, validate_block_ids

__all__ = ["GENERAL_TOKEN", "add_block_tokens", "anchor_token", "centroid_block_ids", "segment_block_ids",
           "validate_block_ids"]
