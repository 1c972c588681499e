"""Soft mode builds its additive mask once per forward call (shared by the layers), with identical results."""

from __future__ import annotations

import pytest
import torch

import hf_localist as hl
from conftest import LAYERS, build_model, left_pad_mask, main_output, random_block_ids, random_ids
from hf_localist import backends


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_soft_mask_is_built_once_per_call_and_changes_nothing(model_type, monkeypatch):
    model = build_model(model_type)
    ids, blocks = random_ids(2, 12, seed=1), random_block_ids(2, 12, seed=1)
    mask = left_pad_mask(2, 12, [0, 3])
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.6, block_assignment="explicit", beta_anchor=0.5))
    builds = []
    real = backends.soft_mask
    monkeypatch.setattr(backends, "soft_mask", lambda *a: builds.append(1) or real(*a))
    with torch.no_grad():
        cached = main_output(model(input_ids=ids, attention_mask=mask, block_ids=blocks))
        assert len(builds) == 1, f"{len(builds)} mask builds for {LAYERS} layers"
        assert handle.state.ctx.mask_cache == {}, "the mask must not outlive the call"
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
