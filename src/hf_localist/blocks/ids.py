"""Block assignment: which block each position belongs to, and which positions are anchors.

Modes (docs/design.md section 2):

- ``segment``: an anchor token ``<blk_NAME>`` opens block ``NAME`` (its id is its index in
  ``LocalistConfig.block_names`` plus one); ``<blk_general>`` returns to block 0; every other token continues
  the current block; positions before any anchor are block 0.
- ``explicit``: ``block_ids`` of shape ``(batch, seq)`` are given to ``forward``.

An *anchor* of block ``b`` is the first position of each run of ``b`` (``block[t] == b`` and
``block[t-1] != b``): in segment mode exactly the anchor token, in explicit mode the start of each segment.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config.localist import LocalistConfig
from ..errors import BlockIdsError, LocalistConfigError

GENERAL_TOKEN = "<blk_general>"


def anchor_token(name: str) -> str:
    return f"<blk_{name}>"


def segment_block_ids(
    input_ids: torch.Tensor,
    anchor_token_ids: list[int],
    general_token_id: int | None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block ids from anchor tokens. ``start`` (B,) is the block in force before the first token (cache)."""
    batch, length = input_ids.shape
    device = input_ids.device
    # code[t] = block opened at t (anchor i -> i + 1, general -> 0), or -1 when the token continues the block.
    code = torch.full_like(input_ids, -1)
    for i, tok in enumerate(anchor_token_ids):
        code = torch.where(input_ids == tok, torch.full_like(code, i + 1), code)
    if general_token_id is not None:
        code = torch.where(input_ids == general_token_id, torch.zeros_like(code), code)
    # Forward fill: the block at t is the code at the last position <= t that set one (a running max of indices).
    pos = torch.arange(length, device=device).expand(batch, length)
    last = torch.where(code >= 0, pos, torch.full_like(pos, -1)).cummax(dim=1).values  # (B, T)
    filled = code.gather(1, last.clamp(min=0))
    if start is None:
        start = torch.zeros(batch, dtype=torch.long, device=device)
    return torch.where(last >= 0, filled, start.to(device)[:, None].expand(batch, length)).long()


def anchor_flags(block_ids: torch.Tensor) -> torch.Tensor:
    """(B, S) bool: True at the first position of each run of a block >= 1."""
    prev = torch.nn.functional.pad(block_ids[:, :-1], (1, 0), value=-1)
    return (block_ids >= 1) & (block_ids != prev)


def validate_block_ids(value: Any, name: str, batch: int, lengths: tuple[int, ...], max_blocks: int) -> torch.Tensor:
    """Check user-given block ids: a (batch, seq) integer tensor with values in [0, max_blocks]."""
    if not isinstance(value, torch.Tensor):
        raise BlockIdsError(f"{name} must be a torch.LongTensor of shape (batch, seq), got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
        raise BlockIdsError(f"{name} must hold integers, got dtype {value.dtype}: use block_ids.long()")
    if value.dim() != 2 or value.shape[0] != batch or value.shape[1] not in lengths:
        raise BlockIdsError(
            f"{name} has shape {tuple(value.shape)}; expected (batch={batch}, seq) with seq in {sorted(set(lengths))} "
            "(the new tokens, or the whole sequence including cached positions)"
        )
    if value.numel():
        lo, hi = int(value.min()), int(value.max())
        if lo < 0 or hi > max_blocks:
            bad = lo if lo < 0 else hi
            raise BlockIdsError(
                f"{name} contains block id {bad}, outside [0, max_blocks={max_blocks}]: block 0 is the general block "
                "and 1..max_blocks are slots; raise LocalistConfig.max_blocks if you need more"
            )
    return value.long()


def add_block_tokens(tokenizer: Any, model: Any = None, names: list[str] | tuple[str, ...] = (),
                     config: LocalistConfig | None = None) -> LocalistConfig:
    """Add anchor tokens ``<blk_NAME>`` (and ``<blk_general>``) to ``tokenizer``, resize ``model``'s embeddings.

    Returns the config (a new one when ``config`` is None) with ``block_names``, ``anchor_token_ids`` and
    ``general_token_id`` set, so that ``block_assignment='segment'`` finds the blocks from ``input_ids``.
    Names already present keep their block ids; new names get the next ids.
    """
    config = config if config is not None else LocalistConfig()
    names = list(names)
    for n in names:
        if not isinstance(n, str) or not n or any(c in n for c in "<> \t\n"):
            raise LocalistConfigError(
                f"add_block_tokens: block name {n!r} must be a non-empty string without <, >, spaces")
    if len(set(names)) != len(names):
        raise LocalistConfigError(f"add_block_tokens: names {names} contain duplicates")
    all_names = list(config.block_names) + [n for n in names if n not in config.block_names]
    if len(all_names) > config.max_blocks:
        raise LocalistConfigError(
            f"add_block_tokens: {len(all_names)} blocks exceed LocalistConfig.max_blocks={config.max_blocks}"
        )
    tokens = [anchor_token(n) for n in all_names] + [GENERAL_TOKEN]
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if model is not None:
        embeddings = model.get_input_embeddings()
        if embeddings.num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    config.update(block_names=all_names, anchor_token_ids=[int(i) for i in ids[:-1]], general_token_id=int(ids[-1]))
    return config
