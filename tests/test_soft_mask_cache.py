"""Soft mode builds its additive mask once per forward call (shared by the layers), with identical results."""

from __future__ import annotations

import pytest
import torch
from helpers import LAYERS, build_model, left_pad_mask, main_output, random_block_ids, random_ids

import hf_localist as hl
from hf_localist.attention import backends


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_soft_mask_is_built_once_per_call_and_changes_nothing(model_type, monkeypatch):
    model = build_model(model_type)
    ids, blocks = random_ids(2, 12, seed=1), random_block_ids(2, 12, seed=1)
    mask = left_pad_mask(2, 12, [0, 3])
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.6, block_assignment="explicit", beta_anchor=0.5))
    builds = []
    real = backends.soft_mask
    monkeypatch.setattr(backends, "soft_mask", lambda *a: builds.append(1) or real(*a))
    with torch.no_grad(), handle.capture_layouts() as calls:
        cached = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
        assert len(builds) == 1, f"{len(builds)} mask builds for {LAYERS} layers"
        assert calls[-1].mask_cache == {}, "the mask must not outlive the call"
        # The reference: every layer builds its own mask (no cache).
        monkeypatch.setattr(backends, "_cached_soft_mask", lambda cache, *a: backends.soft_mask(*a))
        fresh = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
    assert len(builds) == 1 + LAYERS
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    # A progressive schedule gives each layer its own alpha: one build per layer, never a stale mask.
    handle.update(schedule="progressive")
    builds.clear()
    monkeypatch.undo()
    monkeypatch.setattr(backends, "soft_mask", lambda *a: builds.append(1) or real(*a))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, block_ids=blocks)
    assert len(builds) == sum(0.0 < handle.state.layer_alpha(i) < 1.0 for i in range(LAYERS))


@pytest.mark.parametrize("pads", [[0, 0], [0, 300]])
def test_chunked_soft_attention_equals_the_full_mask(pads):
    """Long causal sequences run SDPA per chunk of queries over the keys they can see: same outputs and gradients
    as the explicit softmax over the whole (B, 1, T, S) mask, left padding included."""
    from hf_localist.attention.backends import Layout, base_mask_as_float, dense_attention, key_extents
    from hf_localist.blocks.ids import anchor_flags

    torch.manual_seed(0)
    b, h, t, d = 2, 2, 640, 8
    blocks = random_block_ids(b, t, num_blocks=4, seed=3)
    valid = left_pad_mask(b, t, pads).bool()
    sink = (~valid).sum(dim=1)
    pos = torch.arange(t)
    lay = Layout(q_blocks=blocks, k_blocks=blocks, q_pos=pos, k_pos=pos, k_anchor=anchor_flags(blocks), sink=sink,
                 causal=True)
    base = valid[:, None, None, :] & (pos[None, :] <= pos[:, None])[None, None]  # (B, 1, T, S) bool, as transformers
    q, k, v = (torch.randn(b, h, t, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    extents = key_extents(backends.soft_mask(base, lay, 0.7, 0.0, t, t), t, t)
    assert extents is not None and extents[0][2] < t and extents[-1][2] == t
    out, _ = dense_attention(q, k, v, base, lay, 0.7, 0.0, d ** -0.5, mask_cache={})
    full = backends.soft_mask(base, lay, 0.7, 0.0, t, t).double()  # the whole mask, in float64 like q, k, v
    ref = torch.softmax(q @ k.transpose(2, 3) * d ** -0.5 + full, dim=-1) @ v  # (B, H, T, D)
    ref = ref.transpose(1, 2)
    keep = valid[:, :, None, None].expand_as(out)  # (B, T, H, D); padding queries' outputs are unused
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-10, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g * keep).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * g * keep).sum(), (q, k, v))
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)
    assert base_mask_as_float(base, lay, t, t).shape == (b, 1, t, t)
