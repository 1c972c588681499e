"""Centroid assignment from context (``assign_horizon``, ``assign_min_run``; blocks/centroid.py, docs/design.md
section 2): the causal running mean, the continuity rule, padding, incremental decoding with the state carried by
the KV cache, persistence, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import PAD, build_model, left_pad_mask, random_ids
from transformers import DynamicCache

import hf_localist as hl
from hf_localist.arch.qk import projection_module
from hf_localist.blocks.centroid import context_features, hold_runs

HORIZON, MIN_RUN = 4.0, 2


def _l0_inputs(handle, ids, mask=None):
    """(B, T, E) inputs of layer first_local_layer's Q projection (what assignment reads)."""
    got = {}
    module = projection_module(handle.attention_modules[handle.config.first_local_layer], handle.spec.q_proj)
    hook = module.register_forward_pre_hook(lambda _m, args: got.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            handle.model(input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    return got["x"]


def contextual_model(horizon=HORIZON, min_run=MIN_RUN, threshold=-1.0, seed=0):
    """A tiny Llama in centroid mode with two blocks whose centroids are states of the model itself."""
    model = build_model("llama", seed=seed)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, first_local_layer=1, block_assignment="centroid",
                                                        max_blocks=3, active_blocks=[], assign_threshold=threshold,
                                                        assign_horizon=horizon, assign_min_run=min_run))
    x = _l0_inputs(handle, random_ids(1, 12, seed=seed + 100))
    feats, _ = context_features(x, torch.ones(x.shape[:2], dtype=torch.bool), horizon)
    handle.activate_block(1, centroid=feats[0, 3].clone())
    handle.activate_block(2, centroid=feats[0, 10].clone())
    return model, handle


# ---------------------------------------------------------------------------------------------- the rules
def test_running_mean_is_the_causal_ewma_of_unit_states_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, generator=g) * torch.rand(2, 6, 1, generator=g) * 10
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    feats, last = context_features(x, valid, horizon=3.0)
    d = 1 - 1 / 3
    for b in range(2):
        run = torch.zeros(5)
        for t in range(6):
            if valid[b, t]:
                run = d * run + (1 - d) * F.normalize(x[b, t], dim=0)
            torch.testing.assert_close(feats[b, t], run)
    torch.testing.assert_close(feats[1, 2:], context_features(x[1:, 2:], valid[1:, 2:], 3.0)[0][0])  # no leak
    # Continued from its state, the scan gives the same features as over the whole sequence.
    head, state = context_features(x[:, :4], valid[:, :4], 3.0)
    tail, state2 = context_features(x[:, 4:], valid[:, 4:], 3.0, state)
    assert torch.equal(torch.cat([head, tail], 1), feats) and torch.equal(state2, last)
    assert context_features(x, valid, 1.0)[0] is x  # horizon 1: the states themselves


def test_continuity_needs_min_run_positions_in_a_row():
    raw = torch.tensor([[1, 2, 1, 1, 1, 2, 2, 2, 0, 2]])
    valid = torch.ones_like(raw, dtype=torch.bool)
    ids, cur, cand, cnt = hold_runs(raw, valid, None, 3)
    assert ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]]
    assert hold_runs(raw, valid, None, 1)[0].tolist() == raw.tolist()  # min_run 1: no rule
    # Split anywhere and continued from the state: the same ids.
    a = hold_runs(raw[:, :6], valid[:, :6], None, 3)
    b = hold_runs(raw[:, 6:], valid[:, 6:], None, 3, *a[1:])
    assert torch.cat([a[0], b[0]], 1).tolist() == ids.tolist()
    # Padding leaves the state unchanged; given ids set the block in force.
    padded = hold_runs(torch.tensor([[1, 5, 5, 1, 1]]), torch.tensor([[1, 0, 0, 1, 1]], dtype=torch.bool), None, 3)
    assert padded[0][0, [0, 3, 4]].tolist() == [0, 0, 1]
    fixed = hold_runs(torch.tensor([[1, 1, 2]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([[2, -1, -1]]), 2)
    assert fixed[0].tolist() == [[2, 2, 2]]


def test_model_assignment_follows_the_rules_and_switches_need_sustained_evidence():
    model, handle = contextual_model()
    ids = random_ids(3, 24, seed=5)
    x = _l0_inputs(handle, ids)
    feats, _ = context_features(x, torch.ones(3, 24, dtype=torch.bool), HORIZON)
    centroids = F.normalize(handle.state.centroids[1:3], dim=-1)
    raw = (F.normalize(feats, dim=-1) @ centroids.T).argmax(-1) + 1  # threshold -1: the nearest of blocks 1, 2
    assigned = handle.assign(ids)
    assert torch.equal(assigned, hold_runs(raw, torch.ones_like(raw, dtype=torch.bool), None, MIN_RUN)[0])
    with handle.capture_layouts() as calls, torch.no_grad():
        model(ids)
    assert torch.equal(calls[-1].block_ids, assigned)  # what assign() reports is what the attention used
    for b in range(3):
        for t in range(1, 24):
            if assigned[b, t] != assigned[b, t - 1]:  # a switch: MIN_RUN positions in a row pointed at the new block
                assert t >= MIN_RUN - 1 and (raw[b, t - MIN_RUN + 1: t + 1] == assigned[b, t]).all()
    # Continuity changes something here (the test would not see the rule otherwise).
    handle.update(assign_min_run=1)
    assert not torch.equal(handle.assign(ids), assigned)
    assert len(assigned.unique()) >= 2


def test_horizon_smooths_assignment():
    """With a longer horizon there are fewer block switches (the features change slowly)."""
    model, handle = contextual_model(horizon=1.0, min_run=1)
    ids = random_ids(4, 32, seed=3)
    switches = []
    for h in (1.0, 8.0):
        handle.update(assign_horizon=h)
        a = handle.assign(ids)
        switches.append(int((a[:, 1:] != a[:, :-1]).sum()))
    assert switches[1] < switches[0]


def test_left_padding_does_not_leak_into_the_assignment():
    model, handle = contextual_model()
    lengths = [14, 9, 11]
    rows = [random_ids(1, n, seed=40 + i) for i, n in enumerate(lengths)]
    batch = torch.full((3, 14), PAD)
    for i, n in enumerate(lengths):
        batch[i, 14 - n:] = rows[i][0]
    mask = left_pad_mask(3, 14, [14 - n for n in lengths])
    assigned = handle.assign(batch, mask)
    for i, n in enumerate(lengths):
        assert torch.equal(assigned[i, 14 - n:], handle.assign(rows[i])[0]), f"row {i}"


# ---------------------------------------------------------------------------------------------- KV cache, generate
def test_generate_step_by_step_equals_the_full_forward():
    """Greedy generation with a KV cache, left-padded batch: the block ids of every position (prompt and generated)
    and the running state equal those of one forward over the final sequences, and each row equals its own
    unpadded generation."""
    model, handle = contextual_model()
    lengths = [10, 6, 8]
    prompts = [random_ids(1, n, seed=60 + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.full((3, width), PAD)
    for i, n in enumerate(lengths):
        batch[i, width - n:] = prompts[i][0]
    mask = left_pad_mask(3, width, [width - n for n in lengths])
    new = 12
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), handle.capture_layouts() as calls:
        out = model.generate(batch, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             cache=cache)
    assert len(calls) == new  # prefill + one call per new token, through the cache
    incremental = calls[-1].block_ids  # (B, width + new - 1): every position fed to the model
    full_mask = torch.cat([mask, torch.ones(3, new - 1, dtype=mask.dtype)], 1)
    full = handle.assign(out[:, :-1], full_mask)
    assert torch.equal(incremental, full)
    gen_part = incremental[:, width:]
    assert len(gen_part.unique()) >= 2 or len(incremental[mask.bool()].unique()) >= 2  # non-trivial layouts
    # The running state on the cache is the full forward's state after the last fed position.
    state = cache._localist_assign
    assert state.length == width + new - 1
    x = _l0_inputs(handle, out[:, :-1], full_mask)
    _, ema = context_features(x, full_mask.bool(), HORIZON)
    torch.testing.assert_close(state.ema, ema, atol=1e-5, rtol=1e-4)
    for i, n in enumerate(lengths):
        with torch.no_grad():
            single = model.generate(prompts[i], attention_mask=torch.ones_like(prompts[i]), max_new_tokens=new,
                                    min_new_tokens=new, do_sample=False)
        assert torch.equal(out[i, width:], single[0, n:]), f"row {i}"
        assert torch.equal(handle.assign(single[:, :-1])[0], full[i, width - n:]), f"row {i}"


def test_manual_cache_steps_equal_the_full_forward_and_beams_follow_the_cache():
    model, handle = contextual_model()
    ids = random_ids(2, 16, seed=7)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), handle.capture_layouts() as calls:
        for a, b in ((0, 5), (5, 6), (6, 11), (11, 16)):
            model(input_ids=ids[:, a:b], cache=cache, use_cache=True)
    assert torch.equal(calls[-1].block_ids, handle.assign(ids))
    with torch.no_grad():  # beam search reorders / expands the cache rows: the state follows
        beams = model.generate(ids[:, :8], attention_mask=torch.ones(2, 8, dtype=torch.long), num_beams=3,
                               max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert beams.shape == (2, 13)
        no_cache = model.generate(ids[:, :8], attention_mask=torch.ones(2, 8, dtype=torch.long), num_beams=3,
                                  max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(beams, no_cache)


def test_a_cache_without_the_running_state_is_refused():
    model, handle = contextual_model(horizon=1.0, min_run=1)
    ids = random_ids(1, 8, seed=2)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)  # filled without context assignment
        handle.update(assign_horizon=HORIZON)
        with pytest.raises(hl.LocalistStateError, match="running state"):
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True)
        cache.crop(-2)  # the state of an earlier position is not kept: continuing is refused, not silently wrong
        with pytest.raises(hl.LocalistStateError, match="cropped"):
            model(input_ids=ids[:, -2:], cache=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------- config, saving
def test_settings_are_validated_and_saved_with_the_model(tmp_path):
    with pytest.raises(hl.LocalistConfigError, match="assign_horizon"):
        hl.LocalistConfig(block_assignment="centroid", assign_horizon=0.5)
    with pytest.raises(hl.LocalistConfigError, match="assign_min_run"):
        hl.LocalistConfig(block_assignment="centroid", assign_min_run=0)
    with pytest.raises(hl.LocalistConfigError, match="centroid"):
        hl.LocalistConfig(assign_horizon=4)  # segment assignment: the setting would do nothing
    defaults = hl.LocalistConfig()
    assert (defaults.assign_horizon, defaults.assign_min_run, defaults.unassigned_visible) == (1.0, 1, True)
    model, handle = contextual_model()
    ids = random_ids(2, 20, seed=9)
    expected = handle.assign(ids)
    model.save_pretrained(tmp_path / "m")
    loaded = hl.AutoLocalistModel.from_pretrained(tmp_path / "m")
    h2 = loaded.localist_handle
    assert (h2.config.assign_horizon, h2.config.assign_min_run) == (HORIZON, MIN_RUN)
    assert torch.equal(h2.assign(ids), expected)
