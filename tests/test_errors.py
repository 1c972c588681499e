"""Bad input raises the project's errors (hf_localist.errors), with a message naming the bad value."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import DECODER_ARCHS, LAYERS, build_model, localist_model, random_block_ids, random_ids
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import hf_localist as hl
from hf_localist import errors
from hf_localist.arch.registry import _REGISTRY
from hf_localist.config.localist import LOCALIST_CONFIG_NAME

T = 10


def test_error_hierarchy():
    for cls, builtin in [(errors.LocalistConfigError, ValueError), (errors.UnsupportedArchitectureError, ValueError),
                         (errors.BlockIdsError, ValueError), (errors.BackendError, RuntimeError),
                         (errors.LocalistLoadError, OSError), (errors.LocalistStateError, RuntimeError)]:
        assert issubclass(cls, errors.LocalistError) and issubclass(cls, builtin)
        assert getattr(hl, cls.__name__) is cls


# ------------------------------------------------------------------------------------------------ block ids
@pytest.mark.parametrize("bad,pattern", [
    (torch.zeros(2, T, 1, dtype=torch.long), r"shape \(2, 10, 1\)"),
    (torch.zeros(3, T, dtype=torch.long), r"shape \(3, 10\)"),
    (torch.zeros(2, T - 3, dtype=torch.long), r"shape \(2, 7\)"),
    (torch.zeros(2, T + 1, dtype=torch.long), r"shape \(2, 11\)"),
    (torch.full((2, T), 17), r"block id 17"),
    (torch.full((2, T), -1), r"block id -1"),
    (torch.zeros(2, T), r"dtype torch\.float32"),
    (torch.zeros(2, T, dtype=torch.bool), r"dtype torch\.bool"),
    ([[0] * T] * 2, r"got list"),
])
def test_bad_block_ids(bad, pattern):
    model, _ = localist_model()
    with pytest.raises(hl.BlockIdsError, match=pattern):
        model(input_ids=random_ids(2, T), block_ids=bad)
    with pytest.raises(hl.BlockIdsError, match=pattern.replace("block id", "block id")):
        model(input_ids=random_ids(2, T), block_ids=torch.zeros(2, T, dtype=torch.long),
              target_block_ids=bad)


def test_block_ids_range_follows_max_blocks():
    model, handle = localist_model(max_blocks=3)
    ids = random_ids(2, T)
    model(input_ids=ids, block_ids=torch.full((2, T), 3))  # 3 = max_blocks is a valid slot
    with pytest.raises(hl.BlockIdsError, match=r"block id 4.*max_blocks=3"):
        model(input_ids=ids, block_ids=torch.full((2, T), 4))


def test_explicit_assignment_without_block_ids():
    model, _ = localist_model()
    with pytest.raises(hl.BlockIdsError, match="block_ids"):
        model(input_ids=random_ids(2, T))


def test_segment_assignment_needs_input_ids():
    model = build_model("llama")
    hl.apply_localist(model, alpha=1.0)
    with pytest.raises(hl.BlockIdsError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, T, 32))


def test_cache_filled_by_the_unpatched_model_is_rejected():
    model = build_model("llama")
    ids = random_ids(1, T)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    hl.apply_localist(model, alpha=0.5, block_assignment="explicit")
    with pytest.raises(hl.BlockIdsError, match=f"holds {T} positions without block ids"):
        model(input_ids=ids[:, :1], block_ids=torch.zeros(1, 1, dtype=torch.long), past_key_values=cache)


# ------------------------------------------------------------------------------------------------ config values
@pytest.mark.parametrize("value", [-0.1, 1.5, 2, float("inf"), float("nan")])
def test_alpha_outside_unit_interval(value):
    shown = re.escape(repr(float(value)) if isinstance(value, float) else repr(value))
    with pytest.raises(hl.LocalistConfigError, match=rf"alpha={shown}"):
        hl.LocalistConfig(alpha=value)
    cfg = hl.LocalistConfig(alpha=0.5)
    with pytest.raises(hl.LocalistConfigError, match=rf"alpha={shown}"):
        cfg.alpha = value
    assert cfg.alpha == 0.5
    model, handle = localist_model(alpha=0.5)
    with pytest.raises(hl.LocalistConfigError, match=rf"alpha={shown}"):
        handle.set_dial(value)
    with pytest.raises(hl.LocalistConfigError, match=rf"alpha={shown}"):
        with handle.dial(value):
            pass  # pragma: no cover
    with pytest.raises(hl.LocalistConfigError, match=rf"alpha={shown}"):
        handle.update(alpha=value)
    assert handle.config.alpha == 0.5
    with pytest.raises(hl.LocalistConfigError, match=rf"alpha={shown}"):
        hl.apply_localist(build_model("gpt2"), alpha=value)


def test_alpha_must_be_a_number():
    for value in ("0.5", None, True, [0.5]):
        with pytest.raises(hl.LocalistConfigError, match=re.escape(f"alpha={value!r}")):
            hl.LocalistConfig(alpha=value)


@pytest.mark.parametrize("field,value", [("backend", "cudnn"), ("schedule", "cosine"),
                                         ("block_assignment", "centroids")])
def test_unknown_choice(field, value):
    with pytest.raises(hl.LocalistConfigError, match=rf"{field}='{value}'.*choose one of"):
        hl.LocalistConfig(**{field: value})
    cfg = hl.LocalistConfig()
    with pytest.raises(hl.LocalistConfigError, match=rf"{field}='{value}'"):
        setattr(cfg, field, value)


def test_unknown_config_field():
    with pytest.raises(hl.LocalistConfigError, match="alhpa"):
        hl.LocalistConfig.from_dict({"alhpa": 0.5})


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_first_local_layer_beyond_the_model_at_apply(model_type):
    model = build_model(model_type)
    cfg = hl.LocalistConfig(first_local_layer=LAYERS)  # valid on its own: the model is not known yet
    with pytest.raises(hl.LocalistConfigError, match=rf"first_local_layer={LAYERS}.*num_layers={LAYERS}"):
        hl.apply_localist(model, cfg)
    assert cfg == hl.LocalistConfig(first_local_layer=LAYERS)  # the rejected config is unchanged
    # The failed apply left the model untouched.
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "localist_handle")
    assert not hasattr(model.config, "localist")
    with pytest.raises(hl.LocalistConfigError, match="first_local_layer=5"):
        hl.apply_localist(model, first_local_layer=5)
    assert model.config._attn_implementation == "sdpa"


def test_config_for_another_architecture():
    model = build_model("gpt2")
    with pytest.raises(hl.LocalistConfigError, match="model_type='llama'.*'gpt2'"):
        hl.apply_localist(model, hl.LocalistConfig(model_type="llama"))
    with pytest.raises(hl.LocalistConfigError, match="LocalistConfig, got dict"):
        hl.apply_localist(model, {"alpha": 0.5})


# ------------------------------------------------------------------------------------------------ backends
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_with_grad_on_cpu():
    model, handle = localist_model(alpha=1.0, backend="flex", flex_compile=False)
    ids, blocks = random_ids(2, T), random_block_ids(2, T)
    with pytest.raises(hl.BackendError, match=r"backend='flex'.*gradients on CPU.*segment"):
        model(input_ids=ids, block_ids=blocks)
    with torch.no_grad():
        model(input_ids=ids, block_ids=blocks)  # fine without grad
    handle.update(beta_anchor=0.5)
    with pytest.raises(hl.BackendError, match=r"beta_anchor=0\.5"), torch.no_grad():
        model(input_ids=ids, block_ids=blocks)


# ------------------------------------------------------------------------------------------------ architectures
def _assert_names_supported(excinfo):
    message = str(excinfo.value)
    assert "register_localist_arch" in message
    for arch in hl.supported_architectures():
        assert arch in message


def test_model_without_attention_interface_is_unsupported():
    config = AutoConfig.for_model("gpt_neo", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                                  attention_types=[[["global"], 2]], max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    assert "gpt_neo" not in hl.supported_architectures()
    with pytest.raises(hl.UnsupportedArchitectureError, match="model_type='gpt_neo'") as excinfo:
        hl.apply_localist(model)
    _assert_names_supported(excinfo)
    assert model.config._attn_implementation != "localist"


def test_plain_module_is_unsupported():
    with pytest.raises(hl.UnsupportedArchitectureError, match="Sequential") as excinfo:
        hl.apply_localist(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    _assert_names_supported(excinfo)


def test_unregistered_model_dir_is_unsupported(tmp_path):
    config = AutoConfig.for_model("gpt_neo", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                                  attention_types=[[["global"], 2]], max_position_embeddings=64)
    config.save_pretrained(tmp_path)
    with pytest.raises(hl.UnsupportedArchitectureError, match="gpt_neo") as excinfo:
        hl.LocalistConfig.from_pretrained(tmp_path)
    _assert_names_supported(excinfo)


def test_unregistered_model_using_attention_interface_is_detected():
    """Starcoder2 is not registered but dispatches through AttentionInterface: detected, with a warning."""
    config = AutoConfig.for_model("starcoder2", vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = random_ids(1, T)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    handle = hl.apply_localist(model, alpha=0.0, block_assignment="explicit")
    assert handle.spec.auto_detected and handle.config.model_type == "starcoder2"
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, block_ids=random_block_ids(1, T)).logits, ref)


def test_register_localist_arch_validation():
    with pytest.raises(hl.LocalistConfigError, match="already registered"):
        hl.register_localist_arch("llama", q_proj="q_proj", k_proj="k_proj", layout="linear")
    with pytest.raises(hl.LocalistConfigError, match="layout='diagonal'"):
        hl.register_localist_arch("x_model", q_proj="q", k_proj="k", layout="diagonal")
    with pytest.raises(hl.LocalistConfigError, match="k_proj"):
        hl.register_localist_arch("x_model", q_proj="q", k_proj=None, layout="linear")
    try:
        spec = hl.register_localist_arch("x_model", q_proj="q", k_proj="k", layout="linear")
        assert hl.get_arch_spec("x_model") is spec and "x_model" in hl.supported_architectures()
    finally:
        _REGISTRY.pop("x_model", None)


# ------------------------------------------------------------------------------------------------ loading
def test_corrupt_or_missing_localist_config(tmp_path):
    (tmp_path / LOCALIST_CONFIG_NAME).write_text('{"alpha": 0.5,')  # truncated JSON
    with pytest.raises(hl.LocalistLoadError, match="not valid JSON"):
        hl.LocalistConfig.from_pretrained(tmp_path)
    with pytest.raises(hl.LocalistLoadError, match="not valid JSON"):
        hl.LocalistConfig.from_pretrained(tmp_path / LOCALIST_CONFIG_NAME)
    (tmp_path / LOCALIST_CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(hl.LocalistLoadError, match="JSON object"):
        hl.LocalistConfig.from_pretrained(tmp_path)
    (tmp_path / LOCALIST_CONFIG_NAME).write_text(json.dumps({"alpha": 3}))
    with pytest.raises(hl.LocalistConfigError, match="alpha=3"):
        hl.LocalistConfig.from_pretrained(tmp_path)
    with pytest.raises(hl.LocalistLoadError, match="empty_dir"):
        (tmp_path / "empty_dir").mkdir()
        hl.LocalistConfig.from_pretrained(tmp_path / "empty_dir")
    with pytest.raises(hl.LocalistLoadError, match="does-not-exist"):
        hl.LocalistConfig.from_pretrained(tmp_path / "does-not-exist")


def test_auto_localist_model_on_a_plain_model_dir(tmp_path):
    build_model("llama").save_pretrained(tmp_path)
    with pytest.raises(hl.LocalistLoadError, match="no localist state.*apply_localist"):
        hl.AutoLocalistModel.from_pretrained(tmp_path)
    with pytest.raises(hl.LocalistLoadError, match="missing-dir"):
        hl.AutoLocalistModel.from_pretrained(tmp_path / "missing-dir")
    with pytest.raises(EnvironmentError):
        hl.AutoLocalistModel()


def test_auto_localist_model_with_a_corrupt_localist_config(tmp_path):
    model = build_model("llama")
    hl.apply_localist(model, alpha=0.5)
    model.save_pretrained(tmp_path)
    (tmp_path / LOCALIST_CONFIG_NAME).write_text("{not json")
    with pytest.raises(hl.LocalistLoadError, match=f"{LOCALIST_CONFIG_NAME}' does not match its checksum"):
        hl.AutoLocalistModel.from_pretrained(tmp_path)  # the save's manifest notices first
    (tmp_path / "localist_manifest.json").unlink()
    with pytest.raises(hl.LocalistLoadError, match="not valid JSON"):
        hl.AutoLocalistModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------------ state
def test_applying_twice():
    model, handle = localist_model()
    with pytest.raises(hl.LocalistStateError, match="already localist"):
        hl.apply_localist(model)
    handle.revert()
    hl.apply_localist(model)  # fine after revert


@pytest.mark.parametrize("model_type", DECODER_ARCHS[:1])
def test_attention_key_on_an_unpatched_model(model_type):
    hl.apply_localist(build_model(model_type))  # registers the "localist" key
    model = build_model(model_type, attn_implementation="localist")
    with pytest.raises(hl.LocalistStateError, match="apply_localist"):
        model(input_ids=random_ids(1, T))


def test_calling_an_inner_module_directly():
    model, handle = localist_model(alpha=0.5)
    model(input_ids=random_ids(1, T), block_ids=torch.zeros(1, T, dtype=torch.long))
    # The backbone lays out its own call (TRL's trainers call it directly); the last call's layout is never reused.
    with pytest.raises(hl.BlockIdsError, match="explicit"):
        model.model(input_ids=random_ids(2, T))
    hidden = model.model.embed_tokens(random_ids(2, T))
    rotary = model.model.rotary_emb(hidden, torch.arange(T)[None])
    with pytest.raises(hl.LocalistStateError, match="patched model itself"):
        model.model.layers[0](hidden, position_embeddings=rotary)  # below the backbone: no layout
