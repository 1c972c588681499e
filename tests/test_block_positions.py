"""LocalistConfig.block_positions: "restart" positions each block as if it were read alone after the sink and the
general tokens before it; at dial 1 a block's logits equal the block read alone (RoPE and absolute embeddings)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_localist import LocalistConfig, LocalistConfigError, apply_localist
from hf_localist.blocks.positions import restart_positions


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg).eval()


BUILDERS = {"llama": _llama, "gpt2": _gpt2}
# sink, 2 general tokens, block 1 (5), block 2 (4), block 1 again (3)
BLOCKS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1]])


def test_restart_positions_follow_the_formula():
    valid = torch.ones_like(BLOCKS, dtype=torch.bool)
    pos = restart_positions(BLOCKS, valid, torch.zeros(1, dtype=torch.long))
    # block 1: 3..7, block 2 restarts after the general prefix: 3..6, block 1 continues its own count: 8..10
    assert pos.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 3, 4, 5, 6, 8, 9, 10]]
    # a general token after blocks comes after the longest block so far: G=3 + max(B_1=8, B_2=4) = 11
    ids = torch.cat([BLOCKS, torch.zeros(1, 1, dtype=torch.long)], dim=1)
    pos = restart_positions(ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    assert pos[0, -1].item() == 11


def test_restart_positions_ignore_left_padding():
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), BLOCKS], dim=1)
    valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones_like(BLOCKS, dtype=torch.bool)], dim=1)
    padded = restart_positions(ids, valid, torch.tensor([3]))
    plain = restart_positions(BLOCKS, torch.ones_like(BLOCKS, dtype=torch.bool), torch.zeros(1, dtype=torch.long))
    assert padded[:, 3:].tolist() == plain.tolist()
    assert padded[:, :3].tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_restart_at_dial_one_equals_each_block_read_alone(arch):
    model = BUILDERS[arch]()
    reference = copy.deepcopy(model)  # the unmodified model reads each block alone
    ids = torch.randint(1, 97, BLOCKS.shape, generator=torch.Generator().manual_seed(1))
    apply_localist(model, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart"))
    with torch.no_grad():
        out = model(ids, block_ids=BLOCKS).logits
        diffs = {}
        for block in (1, 2):
            keep = (BLOCKS[0] == 0) | (BLOCKS[0] == block)
            alone = reference(ids[:, keep]).logits
            diffs[block] = (out[:, keep] - alone).abs().max().item()
            assert diffs[block] <= 1e-4, f"block {block}: max abs diff {diffs[block]}"
        # with continuous positions block 2 does not equal itself read alone (it sits at positions 8..11)
        model.localist_handle.update(block_positions="continuous")
        cont = model(ids, block_ids=BLOCKS).logits
        keep = (BLOCKS[0] == 0) | (BLOCKS[0] == 2)
        cont_diff = (cont[:, keep] - reference(ids[:, keep]).logits).abs().max().item()
        assert cont_diff > 100 * max(diffs[2], 1e-7), (cont_diff, diffs[2])


def test_restart_with_left_padding_equals_the_unpadded_row():
    model = _llama()
    apply_localist(model, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart"))
    ids = torch.randint(1, 97, BLOCKS.shape, generator=torch.Generator().manual_seed(2))
    pad = 3
    ids2 = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids], dim=1)
    blocks2 = torch.cat([torch.zeros(1, pad, dtype=torch.long), BLOCKS], dim=1)
    mask2 = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        plain = model(ids, block_ids=BLOCKS).logits
        padded = model(ids2, attention_mask=mask2, block_ids=blocks2).logits[:, pad:]
    assert (plain - padded).abs().max().item() <= 1e-4


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_restart_generate_with_cache_equals_without(alpha):
    model = _llama()
    apply_localist(model, LocalistConfig(alpha=alpha, block_assignment="explicit", block_positions="restart"))
    ids = torch.randint(1, 97, BLOCKS.shape, generator=torch.Generator().manual_seed(3))
    kw = dict(block_ids=BLOCKS, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
              pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        assert (a - b).abs().max().item() <= 1e-4


def test_restart_errors_name_the_fix():
    with pytest.raises(LocalistConfigError, match="centroid"):
        LocalistConfig(block_assignment="centroid", block_positions="restart")
    with pytest.raises(LocalistConfigError, match="block_positions"):
        LocalistConfig(block_positions="alone")
    model = _llama()
    apply_localist(model, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart"))
    ids = torch.randint(1, 97, BLOCKS.shape)
    with pytest.raises(LocalistConfigError, match="drop position_ids"):
        model(ids, block_ids=BLOCKS, position_ids=torch.arange(ids.shape[1])[None])
