"""Position ids per block: ``LocalistConfig.block_positions``.

``"continuous"`` leaves positions to the model (index ``t`` of the sequence; the unmodified model's behaviour).
``"restart"`` gives every block the positions it would have if it were read alone after the sink and the general
(block 0) tokens before it, the way Parallel Context Windows (Ratner et al., 2023) place parallel windows:

    G_t      = number of valid positions s < t that are the sink or in block 0
    B_{i,t}  = number of valid positions s < t in block i >= 1 (not the sink)
    pos_t    = G_t + B_{b(t),t}           t in a block b(t) >= 1 (= the number of positions t sees at dial 1)
    pos_t    = G_t + max_i B_{i,t}         t the sink or in block 0 (after the longest block so far)

Padding (``attention_mask == 0``) counts for nothing, so a left-padded row gets the positions of the unpadded row;
padded positions get 0 (they are masked). At dial 1 a block token sees exactly the sink, the general tokens before
it and its own block, with the same positions as that sub-sequence read alone: its logits equal the block read
alone. A general token keeps the relative order of everything it sees (no key has a larger position than it).
"""

from __future__ import annotations

import torch


def restart_positions(block_ids: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """Position ids (B, S) of the ``"restart"`` policy for block ids (B, S), validity (B, S) bool, sink (B,)."""
    batch, length = block_ids.shape
    index = torch.arange(length, device=block_ids.device)
    is_sink = index[None, :] == sink[:, None]  # (B, S)
    general = valid & ((block_ids == 0) | is_sink)
    in_block = valid & ~general
    g_before = general.long().cumsum(1) - general.long()  # (B, S) exclusive count
    n_blocks = int(block_ids.max()) + 1 if block_ids.numel() else 1
    onehot = torch.zeros(batch, length, n_blocks, dtype=torch.long, device=block_ids.device)
    onehot.scatter_(2, block_ids.clamp(min=0)[..., None], in_block.long()[..., None])  # (B, S, K)
    b_before = onehot.cumsum(1) - onehot  # (B, S, K) exclusive count per block
    own = b_before.gather(2, block_ids.clamp(min=0)[..., None])[..., 0]  # (B, S)
    longest = b_before[..., 1:].amax(dim=2) if n_blocks > 1 else torch.zeros_like(own)
    pos = torch.where(in_block, g_before + own, g_before + longest)
    return pos.masked_fill(~valid, 0)
