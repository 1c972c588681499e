"""Integrations: peft LoRA (both orders), gradient checkpointing, save -> load with AutoLocalistModel, push_to_hub."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
from helpers import (
    ARCHS,
    assert_close_scaled,
    build_model,
    main_output,
    random_block_ids,
    random_ids,
    reference_mask,
)
from peft import LoraConfig, get_peft_model

import hf_localist as hl
from hf_localist.config.localist import LOCALIST_CONFIG_NAME

# transformers 5.23 deprecates gradient_checkpointing_* for activation_checkpointing_* (peft still calls the old names).
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

T = 12
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def _lora(model_type: str, model, seed: int = 1):
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[model_type], lora_dropout=0.0,
                     init_lora_weights=False,  # random A and B: the adapter changes the outputs
                     fan_in_fan_out=model_type == "gpt2")
    return get_peft_model(model, cfg)


def _train_step(model, ids, blocks):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    out = model(input_ids=ids, labels=ids, block_ids=blocks)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    model.eval()
    return out.loss.item()


# ------------------------------------------------------------------------------------------------ peft
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_lora_on_a_localist_model(model_type):
    ids, blocks = random_ids(2, T), random_block_ids(2, T, seed=1)
    model = build_model(model_type)
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit"))
    peft_model = _lora(model_type, model)
    reference = _lora(model_type, build_model(model_type))  # the same LoRA model, without localist
    with torch.no_grad():
        out = main_output(peft_model(input_ids=ids, block_ids=blocks))
        ref = main_output(reference(input_ids=ids))
        plain = main_output(build_model(model_type)(input_ids=ids))
    assert torch.equal(out, ref)
    assert not torch.allclose(out, plain, atol=1e-4)  # the adapter is active
    # The dial works through the peft wrapper; hard mode trains LoRA on the segment backend.
    handle.update(alpha=1.0, backend="segment")
    handle.state.backend_counts.clear()
    with torch.no_grad():
        hard = main_output(peft_model(input_ids=ids, block_ids=blocks))
    assert not torch.allclose(hard, out, atol=1e-4)
    _train_step(peft_model, ids, blocks)
    assert handle.state.backend_counts.get("segment", 0) >= 2
    base_frozen = [p for n, p in peft_model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad and p.grad is None for p in base_frozen)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_localist_on_a_lora_model(model_type):
    ids, blocks = random_ids(2, T), random_block_ids(2, T, seed=2)
    peft_model = _lora(model_type, build_model(model_type)).eval()
    with torch.no_grad():
        before = main_output(peft_model(input_ids=ids))
        # Hard-mode reference: the same peft model with the block mask as a 4-D float mask.
        ref_hard = main_output(peft_model(input_ids=ids, attention_mask=reference_mask(blocks, 1.0)))
    handle = hl.apply_localist(peft_model, hl.LocalistConfig(alpha=0.0, block_assignment="explicit"))
    assert handle.model is peft_model and handle.base is peft_model.get_base_model()
    with torch.no_grad():
        assert torch.equal(main_output(peft_model(input_ids=ids, block_ids=blocks)), before)
        handle.set_dial(1.0)
        hard = main_output(peft_model(input_ids=ids, block_ids=blocks))
    torch.testing.assert_close(hard, ref_hard, atol=2e-5, rtol=1e-4)
    # generate through peft keeps the block ids with the cache.
    gen = peft_model.generate(input_ids=ids, block_ids=blocks, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    gen_nc = peft_model.generate(input_ids=ids, block_ids=blocks, max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, use_cache=False)
    assert torch.equal(gen, gen_nc)
    _train_step(peft_model, ids, blocks)
    # Revert leaves the (trained) LoRA model without localist state: plain causal attention again, and the block
    # mask as an explicit 4-D mask reproduces what the localist model computed.
    with torch.no_grad():
        trained = main_output(peft_model(input_ids=ids, block_ids=blocks))
    handle.revert()
    with torch.no_grad():
        after = main_output(peft_model(input_ids=ids))
        after_ref = main_output(peft_model(input_ids=ids, attention_mask=reference_mask(blocks, 1.0)))
    torch.testing.assert_close(after_ref, trained, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(after, trained, atol=1e-4)
    assert "block_ids" not in inspect.signature(peft_model.get_base_model().forward).parameters


# ------------------------------------------------------------------------------------------------ checkpointing
def _grads(model, ids, blocks, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids, block_ids=blocks)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen3"])
def test_gradient_checkpointing_gives_the_same_gradients(model_type):
    ids, blocks = random_ids(2, T), random_block_ids(2, T, seed=3)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :3] = 0
    model = build_model(model_type).double()
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=1.0, backend="segment", beta_anchor=0.3,
                                                        block_assignment="explicit"))
    model.train()
    loss, grads = _grads(model, ids, blocks, mask)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    handle.state.backend_counts.clear()
    ck_loss, ck_grads = _grads(model, ids, blocks, mask)
    # The checkpointed layers ran the segment backend again during backward.
    assert handle.state.backend_counts["segment"] >= 4
    assert_close_scaled(ck_loss, loss)
    assert set(ck_grads) == set(grads) and len(grads) > 5
    for name in grads:
        assert_close_scaled(ck_grads[name], grads[name], msg=name)


# ------------------------------------------------------------------------------------------------ save / load
def _full_config(arch):
    return hl.LocalistConfig(alpha=0.6, schedule="progressive", schedule_power=1, first_local_layer=0, beta_anchor=0.3,
                             block_names=["a", "b"], anchor_token_ids=[90, 91], general_token_id=92, max_blocks=4,
                             backend="dense")


def test_save_and_load_restores_logits_and_settings(arch, tmp_path):
    model = build_model(arch)
    impl = model.config._attn_implementation  # sdpa; eager for a model that refuses sdpa (Gemma 2)
    handle = hl.apply_localist(model, _full_config(arch))
    handle.set_dial(0.75)  # changed after apply: the saved settings follow the handle
    ids = random_ids(2, T, high=90)
    ids[:, 2], ids[:, 6], ids[0, 9] = 90, 91, 92
    with torch.no_grad():
        expected = main_output(model(input_ids=ids))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    files = set(os.listdir(ckpt))
    assert {"config.json", "model.safetensors", LOCALIST_CONFIG_NAME} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # safetensors only
    assert os.listdir(tmp_path) == ["ckpt"]  # the save wrote aside, then moved: no temporary dirs left
    assert json.loads((ckpt / "config.json").read_text())["localist"]["alpha"] == 0.75

    loaded = hl.AutoLocalistModel.from_pretrained(ckpt).eval()
    assert type(loaded) is type(model)
    assert loaded.config._attn_implementation == "localist"
    assert loaded.localist_handle.config == handle.config
    assert loaded.localist_handle.config.block_names == ["a", "b"]
    assert loaded.localist_handle.layer_alphas() == handle.layer_alphas()
    with torch.no_grad():
        assert torch.equal(main_output(loaded(input_ids=ids)), expected)
    # The loaded model can be reverted to the plain architecture.
    loaded.localist_handle.revert()
    assert loaded.config._attn_implementation == impl


def test_load_with_a_localist_config_override(tmp_path):
    model = build_model("llama")
    hl.apply_localist(model, alpha=0.3)
    model.save_pretrained(tmp_path)
    loaded = hl.AutoLocalistModel.from_pretrained(tmp_path, localist_config=hl.LocalistConfig(alpha=0.9))
    assert loaded.localist_handle.config.alpha == 0.9


def test_loaded_localist_config_from_model_dir(tmp_path):
    model = build_model("gpt2")
    handle = hl.apply_localist(model, _full_config("gpt2"))
    model.save_pretrained(tmp_path)
    assert hl.LocalistConfig.from_pretrained(tmp_path) == handle.config


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model("llama")
    handle = hl.apply_localist(model, alpha=0.3)
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    before = {f: (target / f).read_bytes() for f in os.listdir(target)}
    handle.set_dial(0.9)

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hl.LocalistConfig, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert {f: (target / f).read_bytes() for f in os.listdir(target)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_reverted_model_saves_without_localist_state(tmp_path):
    model = build_model("llama")
    hl.apply_localist(model, alpha=0.3).revert()
    model.save_pretrained(tmp_path)
    assert not (tmp_path / LOCALIST_CONFIG_NAME).exists()
    assert "localist" not in json.loads((tmp_path / "config.json").read_text())


def test_model_push_to_hub_offline_carries_the_localist_state(fake_hub, tmp_path):
    model = build_model("llama")
    hl.apply_localist(model, alpha=0.55)
    model.push_to_hub("someone/tiny-localist")
    files = fake_hub.commits[-1]["files"]
    assert {"config.json", "model.safetensors", LOCALIST_CONFIG_NAME} <= set(files)
    assert json.loads(files[LOCALIST_CONFIG_NAME])["alpha"] == 0.55
    assert json.loads(files["config.json"])["localist"]["alpha"] == 0.55
    model.save_pretrained(tmp_path, push_to_hub=True, repo_id="someone/second")
    assert fake_hub.commits[-1]["repo_id"] == "someone/second"
    assert (tmp_path / LOCALIST_CONFIG_NAME).exists()


@pytest.mark.parametrize("arch", [a for a in ARCHS if a in ("bert", "roberta")])
def test_encoder_round_trip_picks_the_saved_class(arch, tmp_path):
    model = build_model(arch)
    hl.apply_localist(model, alpha=1.0, block_assignment="explicit")
    model.save_pretrained(tmp_path)
    loaded = hl.AutoLocalistModel.from_pretrained(tmp_path)
    assert type(loaded).__name__ == type(model).__name__
