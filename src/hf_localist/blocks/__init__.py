"""Blocks: block ids per token (explicit, segment from anchor tokens, centroid assignment) and their checks; block
ids from text (pieces, character spans, chat messages) and a data collator that pads them."""

from .centroid import centroid_block_ids
from .chat import encode_chat
from .collator import LocalistDataCollator, pad_block_ids
from .ids import GENERAL_TOKEN, add_block_tokens, anchor_token, segment_block_ids, validate_block_ids
from .text import block_ids_from_spans, encode_blocks

__all__ = ["GENERAL_TOKEN", "LocalistDataCollator", "add_block_tokens", "anchor_token", "block_ids_from_spans",
           "centroid_block_ids", "encode_blocks", "encode_chat", "pad_block_ids", "segment_block_ids",
           "validate_block_ids"]
