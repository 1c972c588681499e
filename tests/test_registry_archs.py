"""Gemma 2, Gemma 3, OPT and Phi in the registry; attention softcap and sliding windows on every backend;
``LocalistConfig.from_pretrained`` for every architecture ``apply_localist`` accepts; the warning of the defaults.

The registered architectures also run the whole parametrized suite (``ARCHS`` in ``helpers.py``); this module checks
what is particular to them.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import TINY_WINDOW, build_model, main_output, random_block_ids, random_ids, tiny_config
from transformers import AutoModelForCausalLM

import hf_localist as hl
from hf_localist.arch.qk import qk_head_weights
from hf_localist.errors import UnsupportedArchitectureError

NEW_ARCHS = ("gemma2", "gemma3_text", "opt", "phi")
T = 12


def _explicit(model, **config):
    return hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit", **config))


# ------------------------------------------------------------------------------------------------ registry entries
def test_new_architectures_are_registered():
    assert set(NEW_ARCHS) <= set(hl.supported_architectures())
    assert hl.get_arch_spec("gemma3_text").qk_norm == "head"
    assert hl.get_arch_spec("opt").num_kv_heads_attr is None  # OPT has no KV heads: H_kv = H
    for mt in NEW_ARCHS:
        spec = hl.get_arch_spec(mt)
        assert (spec.q_proj, spec.k_proj, spec.layout, spec.causal) == ("q_proj", "k_proj", "linear", True)


@pytest.mark.parametrize("model_type", NEW_ARCHS)
def test_apply_finds_every_layer_and_the_head_counts(model_type):
    model = build_model(model_type)
    handle = _explicit(model)
    assert len(handle.attention_modules) == 2 and handle.config.num_layers == 2
    wq, wk = qk_head_weights(handle, 0)
    h_kv = 4 if model_type == "opt" else 2
    assert wq.shape == (4, 8, 32) and wk.shape == (h_kv, 8, 32)


def test_opt_query_view_is_the_projection_before_its_scaling():
    """OPT's q_proj has a bias, and the modeling code scales its output by head_dim ** -0.5 before the attention
    function (called with scaling=1.0): the head view is the projection weight itself, W_Q[h] x + b_h."""
    model = build_model("opt")
    handle = _explicit(model)
    proj = handle.attention_modules[0].q_proj
    assert proj.bias is not None
    x = torch.randn(3, 32)
    wq, _ = qk_head_weights(handle, 0)
    with torch.no_grad():
        ref = proj(x).view(3, 4, 8)
        for h in range(4):
            torch.testing.assert_close(x @ wq[h].T + proj.bias.view(4, 8)[h], ref[:, h])


def test_gemma3_multimodal_wrapper_is_not_registered():
    """``gemma3`` (Gemma3ForConditionalGeneration) also holds a SigLIP vision tower whose attention modules have
    q_proj/k_proj too: only the text model ``gemma3_text`` is registered."""
    assert "gemma3" not in hl.supported_architectures()


# ------------------------------------------------------------------------------------------------ Gemma 2: softcap
def test_gemma2_refuses_sdpa_and_alpha0_is_its_eager_attention_bit_for_bit():
    """transformers 5 refuses attn_implementation='sdpa' for Gemma 2 (SDPA cannot softcap) and loads it eager by
    default: alpha = 0 is then the eager attention, softcap included, bit for bit."""
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForCausalLM.from_config(tiny_config("gemma2"), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gemma2")).eval()
    assert model.config._attn_implementation == "eager"
    ids = random_ids(2, T)
    with torch.no_grad():
        ref = main_output(model(input_ids=ids))
    handle = _explicit(model, alpha=0.0)
    with torch.no_grad():
        out = main_output(model(input_ids=ids, block_ids=random_block_ids(2, T)))
    assert torch.equal(out, ref)
    assert handle.state.backend_counts == {"passthrough": 2}


def _hard_outputs(model_type: str, backends, **overrides):
    """{backend: logits at alpha = 1} of one tiny model (float64), in no-grad mode so flex runs on CPU."""
    model = build_model(model_type, **overrides).to(torch.float64)
    ids, blocks = random_ids(2, T, seed=3), random_block_ids(2, T, seed=3)
    handle = _explicit(model, alpha=1.0, backend=backends[0], flex_compile=False)
    out = {}
    for backend in backends:
        handle.update(backend=backend)
        handle.state.backend_counts.clear()
        with torch.no_grad():
            out[backend] = main_output(model(input_ids=ids, block_ids=blocks))
        assert set(handle.state.backend_counts) == {backend}
    return out


def _assert_backends_agree(out):
    """segment equals dense up to float64 rounding. With a softcap dense and segment take the softmax in float32, as
    transformers' eager attention does, while flex stays in the input's dtype: flex agrees to float32 rounding."""
    torch.testing.assert_close(out["segment"], out["dense"], atol=1e-10, rtol=0)
    torch.testing.assert_close(out["flex"], out["dense"], atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_gemma2_softcap_is_applied_by_every_backend():
    capped = _hard_outputs("gemma2", ("dense", "segment", "flex"))
    _assert_backends_agree(capped)
    # The softcap matters for this tiny model (2.0): a backend that dropped it would not match.
    uncapped = _hard_outputs("gemma2", ("dense",), attn_logit_softcapping=None)["dense"]
    assert not torch.allclose(uncapped, capped["dense"], atol=1e-4)


def test_gemma2_softcap_with_gradients_segment_equals_dense():
    model = build_model("gemma2").to(torch.float64)
    ids, blocks = random_ids(2, T, seed=4), random_block_ids(2, T, seed=4)
    handle = _explicit(model, alpha=1.0, backend="dense")
    grads = {}
    for backend in ("dense", "segment"):
        handle.update(backend=backend)
        model.zero_grad(set_to_none=True)
        main_output(model(input_ids=ids, block_ids=blocks)).square().mean().backward()
        grads[backend] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert len(grads["dense"]) == len(grads["segment"]) > 5
    for a, b in zip(grads["segment"], grads["dense"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


# ------------------------------------------------------------------------------------------------ sliding windows
def _one_sliding_layer(model_type: str, window: int):
    return build_model(model_type, num_hidden_layers=1, layer_types=["sliding_attention"], sliding_window=window)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("backend", ["dense", "segment", "flex", "auto"])
def test_sliding_window_is_honoured_at_alpha1(model_type, backend):
    """One sliding-window layer, every position in one block: the first token (the sink, visible to every query by
    the block rule) lies outside the window of the queries at positions >= window, so changing it cannot change
    their outputs; with a window longer than the sequence it does."""
    ids = random_ids(1, T, seed=5)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 100
    blocks = torch.ones(1, T, dtype=torch.long)
    for window, hidden in ((TINY_WINDOW, True), (2 * T, False)):
        model = _one_sliding_layer(model_type, window)
        handle = _explicit(model, alpha=1.0, backend=backend, flex_compile=False)
        with torch.no_grad():
            a = main_output(model(input_ids=ids, block_ids=blocks))
            b = main_output(model(input_ids=changed, block_ids=blocks))
        tail = slice(window, None) if hidden else slice(1, None)
        assert torch.equal(a[:, tail], b[:, tail]) is hidden, (window, handle.state.backend_counts)
        assert "passthrough" not in handle.state.backend_counts


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text"])
def test_sliding_and_full_layers_agree_across_backends(model_type):
    _assert_backends_agree(_hard_outputs(model_type, ("dense", "segment", "flex")))


def test_generation_with_sliding_window_cache_equals_full_recompute():
    """Decoding past the window: the sliding layers' cache keeps only the window; block ids follow it."""
    model = build_model("gemma3_text")
    _explicit(model, alpha=1.0)
    ids, blocks = random_ids(1, 6, seed=6, high=90), random_block_ids(1, 6, seed=6)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=torch.ones_like(ids), block_ids=blocks, max_new_tokens=8,
                                min_new_tokens=8, do_sample=False)
    seq, bl = ids, blocks
    for _ in range(8):
        with torch.no_grad():
            nxt = model(input_ids=seq, block_ids=bl, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq, bl = torch.cat([seq, nxt], 1), torch.cat([bl, bl[:, -1:]], 1)
    assert torch.equal(cached, seq)


# ------------------------------------------------------------------------------------------------ from_pretrained
def _saved(tmp_path, model_type: str, **overrides):
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path / model_type
    model.save_pretrained(path)
    return model, path


def test_from_pretrained_accepts_a_detected_architecture(tmp_path):
    """starcoder2 is not registered but uses q_proj/k_proj and AttentionInterface: apply_localist detects it, and so
    does LocalistConfig.from_pretrained (on the model built on the meta device)."""
    assert "starcoder2" not in hl.supported_architectures()
    model, path = _saved(tmp_path, "starcoder2", num_key_value_heads=2)
    cfg = hl.LocalistConfig.from_pretrained(path, alpha=0.5, block_assignment="explicit")
    assert (cfg.model_type, cfg.num_layers, cfg.alpha) == ("starcoder2", 2, 0.5)
    handle = hl.apply_localist(model, cfg)
    assert handle.spec.auto_detected and handle.config.num_layers == 2
    # The same from a config object.
    assert hl.LocalistConfig.for_model_config(model.config).num_layers == 2


def test_from_pretrained_of_gemma3_text(tmp_path):
    model, path = _saved(tmp_path, "gemma3_text")
    cfg = hl.LocalistConfig.from_pretrained(path, block_assignment="explicit")
    assert (cfg.model_type, cfg.num_layers) == ("gemma3_text", 2)
    hl.apply_localist(model, cfg)


def test_from_pretrained_of_an_undetectable_architecture_is_a_clear_error(tmp_path):
    _, path = _saved(tmp_path, "llama")
    data = json.loads((path / "config.json").read_text())
    data["model_type"] = "not_a_model_type"
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedArchitectureError, match="not_a_model_type.*register_localist_arch"):
        hl.LocalistConfig.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ defaults warning
def _localist_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)
            and str(w.message).startswith("apply_localist:")]


def test_default_segment_assignment_without_anchors_warns():
    model = build_model("llama")
    with pytest.warns(UserWarning, match=r"anchor_token_ids=\[\].*unchanged at every dial") as record:
        hl.apply_localist(model)
    message = _localist_warnings(record)[0]
    for fix in ("anchor_token_ids=[...]", "add_block_tokens", "block_assignment='explicit'", "block_ids=",
                "block_assignment='centroid'"):
        assert fix in message
    # What the warning says: at dial 1 the model is unchanged.
    ids = random_ids(2, T)
    with torch.no_grad():
        out = main_output(model(input_ids=ids))
        model.localist_handle.revert()
        assert torch.equal(main_output(model(input_ids=ids)), out)


@pytest.mark.parametrize("config", [
    dict(block_assignment="explicit"),
    dict(block_assignment="centroid"),
    dict(block_names=["a", "b"], anchor_token_ids=[90, 91], general_token_id=92),
], ids=["explicit", "centroid", "segment_with_anchors"])
def test_configs_that_give_blocks_do_not_warn(config):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hl.apply_localist(build_model("llama"), hl.LocalistConfig(**config))
    assert _localist_warnings(record) == []
