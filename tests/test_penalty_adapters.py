"""Penalties with peft adapters: they act on the effective Q/K weights (base + adapter delta), train only the adapter,
and never change the frozen base (docs/training.md, "Adapters")."""

from __future__ import annotations

import pytest
import torch
from helpers import build_model, random_block_ids, random_ids

import hf_localist as hl
from hf_localist.errors import LocalistConfigError, UnsupportedArchitectureError
from hf_localist.training.penalty import group_norms, penalty, prox_step

peft = pytest.importorskip("peft")


def _cfg(**kw):
    base = dict(alpha=0.0, block_assignment="explicit", max_blocks=3, general_head_fraction=0.25, penalty="loss",
                penalty_lambda=0.2)
    base.update(kw)
    return hl.LocalistConfig(**base)


def _lora_model(model_type="llama", targets=("q_proj", "k_proj", "v_proj"), seed=0, **lora_kw):
    model = build_model(model_type, seed=seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **lora_kw)
    torch.manual_seed(seed + 1)
    lora = peft.get_peft_model(model, cfg)
    for name, p in lora.named_parameters():  # non-zero B, so the delta is not trivially zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return lora


def _frozen(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("model_type,targets", [("llama", ("q_proj", "k_proj")), ("gpt2", ("c_attn",))])
def test_group_norms_read_the_effective_weights(model_type, targets):
    lora = _lora_model(model_type, targets, fan_in_fan_out=model_type == "gpt2")
    handle = hl.apply_localist(lora, _cfg())
    got = group_norms(handle)
    merged = build_model(model_type, seed=0)
    merged.load_state_dict(lora.merge_and_unload().state_dict())  # the effective weights, written in
    ref = group_norms(hl.apply_localist(merged, _cfg()))
    torch.testing.assert_close(got.q, ref.q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.k, ref.k, atol=1e-5, rtol=1e-5)


def test_loss_mode_trains_the_adapter_and_leaves_the_base_bit_identical():
    lora = _lora_model()
    handle = hl.apply_localist(lora, _cfg(penalty_lambda=0.5))
    frozen = _frozen(lora)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids, blocks = random_ids(4, 12, seed=1), random_block_ids(4, 12, seed=1)
    lora.train()
    start = float(penalty(handle).detach())
    out = lora(input_ids=ids, labels=ids, block_ids=blocks)
    out.loss.backward()
    grads = {n: p.grad for n, p in lora.named_parameters() if "lora_" in n and ("q_proj" in n or "k_proj" in n)}
    assert grads and all(g is not None and torch.count_nonzero(g) for g in grads.values())
    for step in range(20):
        opt.zero_grad()
        lora(input_ids=ids, labels=ids, block_ids=blocks).loss.backward()
        opt.step()
    assert float(penalty(handle).detach()) < start  # the penalty on base + delta went down
    for name, p in lora.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[name]), name  # the frozen base: bit for bit


def test_prox_mode_refuses_frozen_weights_and_writes_nothing():
    lora = _lora_model()
    handle = hl.apply_localist(lora, _cfg(penalty="prox"))
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    with pytest.raises(LocalistConfigError, match="frozen.*penalty='loss'"):
        prox_step(handle, 1e-2)
    assert all(torch.equal(p.detach(), before[n]) for n, p in lora.named_parameters())
    # A frozen Q/K projection without adapters is refused too.
    model = build_model("llama", seed=3)
    h2 = hl.apply_localist(model, _cfg(penalty="prox"))
    model.model.layers[1].self_attn.k_proj.weight.requires_grad_(False)
    with pytest.raises(LocalistConfigError, match="layer 1 k_proj"):
        prox_step(h2, 1e-2)


def test_prox_mode_acts_on_q_k_trained_through_modules_to_save():
    """peft's modules_to_save trains a full copy of the projection: the prox step acts on that copy only."""
    model = build_model("llama", seed=4)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["v_proj"],
                                                      modules_to_save=["q_proj", "k_proj"]))
    handle = hl.apply_localist(lora, _cfg(penalty="prox", penalty_lambda=50.0))
    frozen = _frozen(lora)
    stats = prox_step(handle, 1.0)
    assert stats.num_zero > 0
    for name, p in lora.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[name]), name


def test_trainer_loss_mode_with_lora_keeps_the_base_and_logs_the_data_loss(tmp_path):
    from transformers import TrainingArguments

    lora = _lora_model()
    hl.apply_localist(lora, _cfg(penalty_lambda=20.0))
    frozen = _frozen(lora)
    ids, blocks = random_ids(8, 12, seed=5), random_block_ids(8, 12, seed=5)
    train = [{"input_ids": ids[i], "labels": ids[i], "block_ids": blocks[i]} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=0.0,
                             logging_steps=1, report_to=[], use_cpu=True, remove_unused_columns=False)
    trainer = hl.LocalistTrainer(model=lora, args=args, train_dataset=train)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    lora.eval()
    with torch.no_grad():  # lr 0 and one batch: the weights never move, every logged loss is this data loss
        data = float(lora(input_ids=ids, labels=ids, block_ids=blocks).loss)
    assert logs and all(abs(e["loss"] - data) < 1e-4 for e in logs), (logs, data)
    assert all("localist/penalty" in e and e["localist/penalty"] > 10 for e in logs)
    for name, p in lora.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[name]), name


def test_dora_is_refused_with_a_clear_error():
    lora = _lora_model(use_dora=True)
    handle = hl.apply_localist(lora, _cfg())
    with pytest.raises(UnsupportedArchitectureError, match="DoRA"):
        group_norms(handle)
