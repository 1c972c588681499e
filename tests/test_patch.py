"""apply_localist / LocalistHandle: what the patch changes, the exact undo, the dial, block assignment."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import LAYERS, build_model, main_output, random_block_ids, random_ids, word_tokenizer

import hf_localist as hl
from hf_localist.blocks.ids import anchor_flags, segment_block_ids

T = 12


def _localist_leftovers(model) -> list[str]:
    """Every attribute the patch may leave behind, on any module (and the model config)."""
    found = []
    for name, module in model.named_modules():
        for attr in module.__dict__:
            if "localist" in attr:
                found.append(f"{name or '<root>'}.{attr}")
        for attr in ("forward", "save_pretrained", "generate"):
            if attr in module.__dict__:
                found.append(f"{name or '<root>'}.{attr} (instance attribute)")
    if hasattr(model.config, "localist") or "localist" in model.config.to_dict():
        found.append("config.localist")
    return found


# ------------------------------------------------------------------------------------------------- apply
def test_apply_switches_attention_and_attaches_state(arch):
    model = build_model(arch)
    handle = hl.apply_localist(model, alpha=0.5)
    assert isinstance(handle, hl.LocalistHandle)
    assert model.localist_handle is handle and handle.active
    assert model.config._attn_implementation == hl.ATTENTION_KEY
    assert handle.config.model_type == arch and handle.config.num_layers == LAYERS
    assert len(handle.attention_modules) == LAYERS
    assert [m._localist_layer for m in handle.attention_modules] == list(range(LAYERS))
    assert all(m._localist_state is handle.state for m in handle.attention_modules)
    # The settings are stored on the model config (so they are saved with it).
    assert model.config.localist == handle.config.to_dict()
    # generate() validates kwargs against the forward signature: block_ids must be advertised.
    params = inspect.signature(model.forward).parameters
    assert "block_ids" in params and "target_block_ids" in params
    # No weight was touched.
    fresh = build_model(arch)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_apply_with_overrides_and_no_config():
    model = build_model("llama")
    handle = hl.apply_localist(model, alpha=0.25, schedule="progressive", first_local_layer=1)
    assert handle.config.alpha == 0.25 and handle.config.schedule == "progressive"
    assert handle.layer_alphas() == [0.0, 0.25]


# ------------------------------------------------------------------------------------------------- revert
def test_revert_restores_the_exact_model(arch):
    model = build_model(arch)
    ids, blocks = random_ids(2, T), random_block_ids(2, T, seed=1)
    impl_before = model.config._attn_implementation
    assert _localist_leftovers(model) == []
    with torch.no_grad():
        before = main_output(model(input_ids=ids))
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit"))
    with torch.no_grad():
        localised = main_output(model(input_ids=ids, block_ids=blocks))
    assert not torch.allclose(localised, before, atol=1e-4)
    assert handle.revert() is model
    assert not handle.active
    assert model.config._attn_implementation == impl_before
    assert _localist_leftovers(model) == []
    assert not hasattr(model, "localist_handle")
    with torch.no_grad():
        assert torch.equal(main_output(model(input_ids=ids)), before)
    # block_ids is no longer a forward argument of the reverted model.
    assert "block_ids" not in inspect.signature(model.forward).parameters
    # Re-applying after revert works and gives the same localist outputs as the first time.
    handle2 = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit"))
    with torch.no_grad():
        assert torch.equal(main_output(model(input_ids=ids, block_ids=blocks)), localised)
    handle2.revert()
    with torch.no_grad():
        assert torch.equal(main_output(model(input_ids=ids)), before)


def test_revert_after_generate_and_record_leaves_nothing():
    model = build_model("llama")
    ids = random_ids(1, 6)
    handle = hl.apply_localist(model, alpha=0.5, block_assignment="explicit")
    with handle.record():
        model(input_ids=ids, block_ids=torch.ones_like(ids))
    model.generate(ids, block_ids=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    handle.revert()
    assert _localist_leftovers(model) == []


def test_revert_keeps_a_previous_config_entry():
    model = build_model("gpt2")
    model.config.localist = {"alpha": 0.3}  # e.g. a model loaded from a localist checkpoint
    handle = hl.apply_localist(model, alpha=0.9)
    assert model.config.localist["alpha"] == 0.9
    handle.revert()
    assert model.config.localist == {"alpha": 0.3}


def test_handle_is_unusable_after_revert():
    model = build_model("llama")
    handle = hl.apply_localist(model)
    handle.revert()
    for call in (lambda: handle.revert(), lambda: handle.set_dial(0.5), lambda: handle.update(alpha=0.1),
                 lambda: handle.record().__enter__()):
        with pytest.raises(hl.LocalistStateError, match="reverted"):
            call()


# ------------------------------------------------------------------------------------------------- dial
def test_set_dial_and_dial_context():
    model = build_model("llama")
    ids, blocks = random_ids(2, T), random_block_ids(2, T, seed=2)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.2, block_assignment="explicit"))
    with torch.no_grad():
        at_02 = main_output(model(input_ids=ids, block_ids=blocks))
        with handle.dial(0.9) as h:
            # Context-local: the calls of this thread use 0.9, the model-wide dial stays 0.2.
            assert h is handle and handle.effective_alpha() == 0.9 and handle.config.alpha == 0.2
            assert handle.layer_alphas() == [0.9, 0.9]
            at_09 = main_output(model(input_ids=ids, block_ids=blocks))
        assert handle.config.alpha == 0.2 and handle.effective_alpha() == 0.2
        # The forward argument sets the dial of one call, also inside a dial() block.
        assert torch.equal(main_output(model(input_ids=ids, block_ids=blocks, localist_alpha=0.9)), at_09)
        with handle.dial(0.5):
            assert torch.equal(main_output(model(input_ids=ids, block_ids=blocks, localist_alpha=0.2)), at_02)
        assert torch.equal(main_output(model(input_ids=ids, block_ids=blocks)), at_02)
        handle.set_dial(0.9)
        assert torch.equal(main_output(model(input_ids=ids, block_ids=blocks)), at_09)
    assert not torch.allclose(at_02, at_09, atol=1e-4)
    # The dial survives an exception in the block.
    with pytest.raises(RuntimeError):
        with handle.dial(0.0):
            raise RuntimeError("boom")
    assert handle.config.alpha == 0.9
    # The model config entry follows the handle's settings when saved (checked in test_integrations).


def test_auto_backend_selection_on_cpu():
    model = build_model("llama")
    ids, blocks = random_ids(2, T), random_block_ids(2, T, seed=3)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit"))
    expected = {0.0: "passthrough", 0.5: "dense", 1.0: "segment"}
    for alpha, backend in expected.items():
        handle.set_dial(alpha)
        handle.state.backend_counts.clear()
        with torch.no_grad():
            model(input_ids=ids, block_ids=blocks)
        assert handle.state.backend_counts == {backend: LAYERS}, alpha
    # Explicit 'segment' on a soft layer falls back to dense (segment computes only the hard mask).
    handle.update(backend="segment", alpha=0.5)
    handle.state.backend_counts.clear()
    with torch.no_grad():
        model(input_ids=ids, block_ids=blocks)
    assert handle.state.backend_counts == {"dense": LAYERS}


# ------------------------------------------------------------------------------------------------- blocks
def test_segment_block_ids_rules():
    # anchors: 50 -> block 1, 51 -> block 2; 52 = <blk_general>
    ids = torch.tensor([[5, 6, 50, 7, 51, 8, 52, 9, 50, 10],
                        [50, 5, 5, 5, 5, 5, 5, 52, 51, 5]])
    got = segment_block_ids(ids, [50, 51], 52)
    assert got.tolist() == [[0, 0, 1, 1, 2, 2, 0, 0, 1, 1],
                            [1, 1, 1, 1, 1, 1, 1, 0, 2, 2]]
    # A start block (from the KV cache) is continued until the first anchor.
    got = segment_block_ids(ids[:, 3:], [50, 51], 52, start=torch.tensor([1, 1]))
    assert got.tolist() == [[1, 2, 2, 0, 0, 1, 1], [1, 1, 1, 1, 0, 2, 2]]
    assert anchor_flags(torch.tensor([[0, 1, 1, 2, 1, 0, 0, 2]])).tolist() == [
        [False, True, False, True, True, False, False, True]]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_add_block_tokens_and_segment_assignment(model_type):
    tokenizer = word_tokenizer([f"w{i}" for i in range(30)])  # [PAD] 0, [UNK] 1, [BOS] 2, w0.. from 3
    base_vocab = len(tokenizer)
    model = build_model(model_type, vocab_size=base_vocab)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()
    cfg = hl.add_block_tokens(tokenizer, model, ["law", "med"])
    assert cfg.block_names == ["law", "med"]
    assert len(tokenizer) == base_vocab + 3
    assert cfg.anchor_token_ids == tokenizer.convert_tokens_to_ids(["<blk_law>", "<blk_med>"])
    assert cfg.general_token_id == tokenizer.convert_tokens_to_ids(hl.GENERAL_TOKEN)
    assert hl.anchor_token("law") == "<blk_law>"
    # Embeddings resized to the new vocabulary, old rows kept.
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tokenizer)
    assert torch.equal(emb[:base_vocab], old_embeddings)

    text = "w1 w2 <blk_law> w3 w4 <blk_med> w5 <blk_general> w6 <blk_law> w7 w8"
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"]
    assert ids.shape == (1, 12)  # anchor tokens are single tokens
    expected = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0, 0, 1, 1, 1]])
    handle = hl.apply_localist(model, cfg.copy(alpha=1.0))
    assert handle.config.block_assignment == "segment"
    with torch.no_grad(), handle.capture_layouts() as calls:
        seg = main_output(model(input_ids=ids))
    assert torch.equal(calls[-1].block_ids, expected)
    assert calls[-1].anchors.tolist() == [[False, False, True, False, False, True, False, False, False,
                                                  True, False, False]]
    # Same result as giving the block ids explicitly.
    handle.update(block_assignment="explicit")
    with torch.no_grad():
        explicit = main_output(model(input_ids=ids, block_ids=expected))
    assert torch.equal(seg, explicit)
    # And the blocks matter: all-general gives something else.
    with torch.no_grad():
        general = main_output(model(input_ids=ids, block_ids=torch.zeros_like(expected)))
    assert not torch.allclose(seg, general, atol=1e-4)


def test_add_block_tokens_keeps_existing_ids():
    tokenizer = word_tokenizer([f"w{i}" for i in range(30)])  # [PAD] 0, [UNK] 1, [BOS] 2, w0.. from 3
    model = build_model("llama", vocab_size=len(tokenizer))
    cfg = hl.add_block_tokens(tokenizer, model, ["a", "b"])
    ids_ab = list(cfg.anchor_token_ids)
    cfg = hl.add_block_tokens(tokenizer, model, ["c", "a"], config=cfg)
    assert cfg.block_names == ["a", "b", "c"]
    assert cfg.anchor_token_ids[:2] == ids_ab
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    with pytest.raises(hl.LocalistConfigError, match="bad name"):
        hl.add_block_tokens(tokenizer, model, ["bad name"])


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "roberta"])
def test_segment_mode_equals_explicit_block_ids(model_type):
    """Anchor ids configured directly (no tokenizer): segment assignment = the hand-computed explicit ids."""
    model = build_model(model_type)
    cfg = hl.LocalistConfig(alpha=0.8, block_names=["x", "y"], anchor_token_ids=[90, 91], general_token_id=92,
                            beta_anchor=0.3)
    ids = random_ids(2, T, high=80)
    ids[0, 2], ids[0, 6], ids[0, 9] = 90, 91, 92
    ids[1, 0], ids[1, 5] = 91, 90
    expected = segment_block_ids(ids, [90, 91], 92)
    assert expected[0].tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 0, 0, 0]
    handle = hl.apply_localist(model, cfg)
    with torch.no_grad():
        seg = main_output(model(input_ids=ids))
        handle.update(block_assignment="explicit")
        explicit = main_output(model(input_ids=ids, block_ids=expected))
    assert torch.equal(seg, explicit)


def test_explicit_block_ids_on_inputs_embeds_and_target():
    model = build_model("llama")
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="explicit"))
    ids, blocks = random_ids(2, T), random_block_ids(2, T, seed=4)
    with torch.no_grad(), handle.capture_layouts() as calls:
        a = main_output(model(input_ids=ids, block_ids=blocks))
        b = main_output(model(inputs_embeds=model.get_input_embeddings()(ids), block_ids=blocks))
        # target_block_ids only steers diagnostics: outputs are unchanged.
        c = main_output(model(input_ids=ids, block_ids=blocks, target_block_ids=torch.zeros_like(blocks)))
    torch.testing.assert_close(a, b)
    assert torch.equal(a, c)
    assert torch.equal(calls[-1].target_ids, torch.zeros_like(blocks))


# ---------------------------------------------------------------------------------------------- handle.assign
def test_assign_returns_the_layout_of_every_assignment_mode():
    from helpers import random_ids

    model = build_model("llama")
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, anchor_token_ids=[5, 6], general_token_id=7))
    ids = torch.tensor([[3, 5, 9, 9, 6, 9, 7, 9]])
    assert handle.assign(ids).tolist() == [[0, 1, 1, 1, 2, 2, 0, 0]]  # segment: from the anchor tokens
    with handle.capture_layouts() as calls, torch.no_grad():
        model(ids)
    assert torch.equal(handle.assign(ids), calls[-1].block_ids)
    handle.revert()
    torch.manual_seed(0)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, block_assignment="centroid", max_blocks=3,
                                                        assign_threshold=-1.0, active_blocks=[]))
    x = random_ids(2, 6)
    assert handle.assign(x).tolist() == [[0] * 6] * 2  # no active block: every token general
    hidden = model.config.hidden_size
    handle.activate_block(1, centroid=torch.randn(hidden))
    handle.activate_block(2, centroid=torch.randn(hidden))
    assigned = handle.assign(x)
    with handle.capture_layouts() as calls, torch.no_grad():
        model(x)
    assert torch.equal(assigned, calls[-1].block_ids) and set(assigned.unique().tolist()) <= {0, 1, 2}
    assert (assigned > 0).any()  # threshold -1: every token joins its nearest active block
    handle.update(block_assignment="explicit")
    with pytest.raises(hl.BlockIdsError, match="explicit"):
        handle.assign(x)
