"""Tests for hf_localist.trainer and hf_localist.patch.persistence: penalties inside transformers' Trainer, locality
metrics in the logs, counters and localist state through checkpoints, and training-time locality on a synthetic
task with known blocks.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import build_model, localist_model, random_block_ids, random_ids
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_localist as hl
from hf_localist.errors import LocalistConfigError, LocalistLoadError, LocalistStateError
from hf_localist.patch.persistence import STATE_FILE, load_localist_state, save_localist_state
from hf_localist.trainer import LocalistCallback, LocalistTrainer, localist_handle_of
from hf_localist.training.penalty import group_norms, kkt_ratios, penalty_weights, prox_step
from hf_localist.training.subspaces import calibrate_subspaces


# ---------------------------------------------------------------------------------- helpers
def _dataset(n=16, seq=12, seed=0):
    ids = random_ids(n, seq, seed=seed)
    blocks = random_block_ids(n, seq, num_blocks=3, seed=seed)
    blocks[:, 0] = 0
    return [{"input_ids": ids[i], "labels": ids[i].clone(), "block_ids": blocks[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=8, logging_steps=2, per_device_train_batch_size=4,
                learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _model(penalty="prox", lam=0.5, seed=0, **kw):
    return localist_model("llama", seed=seed, alpha=0.5, max_blocks=3, penalty=penalty, penalty_lambda=lam,
                          general_head_fraction=0.25, **kw)


class LogCatcher(TrainerCallback):
    """Records the logs dict every later callback (a reporter such as TensorBoard) would see."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


# ---------------------------------------------------------------------------------- Trainer integration
def test_localist_trainer_logs_locality_metrics(tmp_path):
    model, handle = _model()
    catcher = LogCatcher()
    trainer = LocalistTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[catcher])
    assert isinstance(trainer.callback_handler.callbacks[0], LocalistCallback)
    assert trainer.localist_callback.log_every == 2
    trainer.train()
    cb = trainer.localist_callback
    assert cb.prox_steps == 8 and cb.metric_steps == 4
    logged = [entry for entry in trainer.state.log_history if any(k.startswith("localist/") for k in entry)]
    assert [entry["step"] for entry in logged] == [2, 4, 6, 8]
    keys = set().union(*logged)
    for key in ("localist/group_norm_mean", "localist/zero_groups", "localist/penalised_groups",
                "localist/entropy", "localist/pointer_fidelity", "localist/block_mass"):
        assert key in keys, key
    assert all(isinstance(v, float) for entry in logged for k, v in entry.items() if k.startswith("localist/"))
    # The reporting callbacks after it see the metrics in the logs dict.
    assert sum(any(k.startswith("localist/") for k in logs) for logs in catcher.logs) == 4
    assert handle.state.last_prox is not None


def test_kkt_metrics_logged_once_groups_are_zero(tmp_path):
    model, handle = _model(lam=500.0)  # lr * lambda >= 2.5 per step: every penalised group goes to zero at once
    trainer = LocalistTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_dataset())
    trainer.train()
    last = [e for e in trainer.state.log_history if "localist/kkt_ratio_max" in e]
    assert last, trainer.state.log_history
    assert last[-1]["localist/kkt_holds_fraction"] == 1.0
    assert last[-1]["localist/zero_groups"] == last[-1]["localist/penalised_groups"] > 0
    norms = group_norms(handle)
    lam = penalty_weights(handle)
    assert float(norms.q.detach()[lam > 0].abs().max()) == 0.0


def test_callback_on_plain_trainer_applies_prox(tmp_path):
    model, handle = _model(lam=500.0)
    cb = LocalistCallback(log_every=2)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=6), train_dataset=_dataset(), callbacks=[cb])
    trainer.train()
    assert cb.prox_steps == 6 and cb.metric_steps == 3
    lam = penalty_weights(handle)
    norms = group_norms(handle)
    assert float(norms.q.detach()[lam > 0].abs().max()) == 0.0  # the prox steps made the penalised groups zero
    assert float(norms.q.detach()[lam == 0].min()) > 0.0
    assert handle.state.last_prox.num_zero == handle.state.last_prox.num_penalised
    assert any("localist/group_norm_mean" in e for e in trainer.state.log_history)
    # Without the callback the same run leaves the groups alone.
    model2, handle2 = _model(lam=500.0)
    Trainer(model=model2, args=_args(tmp_path, max_steps=6), train_dataset=_dataset()).train()
    assert float(group_norms(handle2).q.detach()[lam > 0].min()) > 0.0


def test_loss_mode_needs_no_callback_prox(tmp_path):
    model, handle = _model(penalty="loss", lam=0.05)
    trainer = LocalistTrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_dataset())
    trainer.train()
    assert trainer.localist_callback.prox_steps == 0
    assert handle.state.last_prox is None


def test_localist_trainer_rejects_unpatched_model(tmp_path):
    with pytest.raises(LocalistStateError, match="apply_localist"):
        LocalistTrainer(model=build_model("llama"), args=_args(tmp_path), train_dataset=_dataset())
    with pytest.raises(LocalistConfigError, match="log_every"):
        LocalistCallback(log_every=0)


def test_handle_found_through_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = build_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4))
    handle = hl.apply_localist(lora, hl.LocalistConfig(alpha=0.5, block_assignment="explicit", max_blocks=3))
    assert localist_handle_of(lora) is handle


def test_fractional_logging_steps_and_user_callback_order(tmp_path):
    model, _ = _model()
    trainer = LocalistTrainer(model=model, args=_args(tmp_path, logging_steps=0.25), train_dataset=_dataset())
    trainer.train()
    assert trainer.localist_callback.log_every == 2  # ceil(8 * 0.25), not every step
    assert trainer.localist_callback.metric_steps == 4
    # A LocalistCallback passed by the user is used (not duplicated) and moved first.
    model, _ = _model()
    mine = LocalistCallback(log_every=4)
    trainer = LocalistTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[mine])
    assert trainer.callback_handler.callbacks[0] is mine
    assert sum(isinstance(cb, LocalistCallback) for cb in trainer.callback_handler.callbacks) == 1


def test_peft_checkpoint_carries_localist_state(tmp_path):
    peft = pytest.importorskip("peft")
    model = build_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["v_proj"], lora_alpha=4))
    handle = hl.apply_localist(lora, hl.LocalistConfig(alpha=0.5, block_assignment="explicit", max_blocks=3,
                                                       subspace="pca"))
    data = _dataset(n=8, seed=11)
    subspaces = calibrate_subspaces(handle, [{"input_ids": torch.stack([d["input_ids"] for d in data]),
                                              "block_ids": torch.stack([d["block_ids"] for d in data])}])
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    LocalistTrainer(model=lora, args=args, train_dataset=_dataset()).train()
    ckpt = os.path.join(str(tmp_path), "checkpoint-2")
    assert os.path.isfile(os.path.join(ckpt, STATE_FILE))
    _, handle2 = _model(subspace="pca")
    assert load_localist_state(handle2, ckpt)
    torch.testing.assert_close(handle2.state.subspaces, subspaces)


# ---------------------------------------------------------------------------------- checkpoints and persistence
def _pca_model(seed=0, **kw):
    model, handle = _model(subspace="pca", seed=seed, **kw)
    data = _dataset(n=8, seed=11)
    loader = [{"input_ids": torch.stack([d["input_ids"] for d in data]),
               "block_ids": torch.stack([d["block_ids"] for d in data])}]
    return model, handle, calibrate_subspaces(handle, loader)


def test_resume_restores_counters_and_localist_state(tmp_path):
    model, handle, subspaces = _pca_model()
    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    trainer = LocalistTrainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    assert trainer.localist_callback.prox_steps == 4
    ckpt = os.path.join(str(tmp_path), "checkpoint-4")
    assert os.path.isfile(os.path.join(ckpt, STATE_FILE))
    saved = json.load(open(os.path.join(ckpt, "trainer_state.json")))["stateful_callbacks"]["LocalistCallback"]
    assert saved["attributes"]["prox_steps"] == 4

    # A fresh, uncalibrated model: the checkpoint brings the weights, the subspaces and the counters back.
    model2, handle2 = _model(subspace="pca", seed=1)
    assert handle2.state.subspaces is None
    catcher = LogCatcher()
    trainer2 = LocalistTrainer(model=model2, args=_args(tmp_path, max_steps=6, save_strategy="no"),
                               train_dataset=_dataset(), callbacks=[catcher])
    trainer2.train(resume_from_checkpoint=ckpt)
    cb = trainer2.localist_callback
    assert cb.prox_steps == 6  # 4 restored + 2 new, not 2
    assert cb.metric_steps == 3
    torch.testing.assert_close(handle2.state.subspaces, subspaces)
    # After the restore the callback still reports before the other callbacks see the logs.
    assert isinstance(trainer2.callback_handler.callbacks[0], LocalistCallback)
    assert any(any(k.startswith("localist/") for k in logs) for logs in catcher.logs)

    # AutoLocalistModel reloads the state from the checkpoint and from save_model.
    reloaded = hl.AutoLocalistModel.from_pretrained(ckpt)
    torch.testing.assert_close(reloaded.localist_handle.state.subspaces, subspaces)
    assert reloaded.localist_handle.config.subspace == "pca"
    out = str(tmp_path / "final")
    trainer2.save_model(out)
    again = hl.AutoLocalistModel.from_pretrained(out)
    torch.testing.assert_close(again.localist_handle.state.subspaces, subspaces)
    ids = random_ids(2, 10, seed=3)
    blocks = random_block_ids(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, block_ids=blocks).logits,
                                   model2(input_ids=ids, block_ids=blocks).logits)


def test_state_file_round_trip_and_threshold(tmp_path):
    model, handle, subspaces = _pca_model()
    handle.state.lambda_threshold = torch.rand(2, 4, 3)
    assert save_localist_state(handle, str(tmp_path)) == os.path.join(str(tmp_path), STATE_FILE)
    _, handle2 = _model(subspace="pca")
    assert load_localist_state(handle2, str(tmp_path))
    torch.testing.assert_close(handle2.state.subspaces, subspaces)
    torch.testing.assert_close(handle2.state.lambda_threshold, handle.state.lambda_threshold)
    # No state tensors: no file; a directory without the file loads nothing.
    _, plain = _model()
    assert save_localist_state(plain, str(tmp_path / "empty")) is None
    assert not load_localist_state(plain, str(tmp_path / "empty"))


def test_corrupt_or_mismatched_state_file_is_a_load_error(tmp_path):
    model, handle, _ = _pca_model()
    model.save_pretrained(str(tmp_path))
    path = tmp_path / STATE_FILE
    assert path.is_file()
    path.write_bytes(b"\x00garbage, not safetensors")
    with pytest.raises(LocalistLoadError, match="safetensors"):
        load_localist_state(handle, str(tmp_path))
    with pytest.raises(LocalistLoadError):
        hl.AutoLocalistModel.from_pretrained(str(tmp_path))
    from safetensors.torch import save_file

    save_file({"subspaces": torch.zeros(5, 3, 32, 8)}, str(path))  # 5 layers, the model has 2
    with pytest.raises(LocalistLoadError, match="2 attention layers"):
        load_localist_state(handle, str(tmp_path))
    save_file({"weights": torch.zeros(2, 3)}, str(path))
    with pytest.raises(LocalistLoadError, match="unknown"):
        load_localist_state(handle, str(tmp_path))


# ---------------------------------------------------------------------------------- training-time locality
# A synthetic task with 3 known blocks. Tokens of block i come from their own vocabulary range and their (frozen)
# embeddings live on block i's coordinate group [12 i, 12 i + 12) of a 48-wide residual stream (coordinates 0..11
# are general), so the coordinate subspaces U_i are the true block features at layer 0's input. Each sequence is
# BOS + three runs of 5 tokens, one per block in random order; the first run starts with a "key" token, and every
# position of the later runs must predict that key, which lives in *another* block. The data thus pull attention
# across blocks; the penalty (above threshold) forbids the heads from reading other blocks' features.
E_S, R_S, NB_S, VB_S, NK_S, RUN_S = 48, 12, 3, 12, 4, 5
V_S = 3 + NB_S * VB_S


def _synthetic_batch(n, g):
    ids, blocks, targets = [], [], []
    for _ in range(n):
        row, brow, trow, key = [1], [0], [-100], None
        for b in (torch.randperm(NB_S, generator=g) + 1).tolist():
            lo = 3 + (b - 1) * VB_S
            toks = lo + NK_S + torch.randint(0, VB_S - NK_S, (RUN_S,), generator=g)
            if key is None:
                toks[0] = lo + int(torch.randint(0, NK_S, (1,), generator=g))
                key = int(toks[0])
                trow += [-100] * RUN_S
            else:
                trow += [key] * RUN_S
            row += toks.tolist()
            brow += [b] * RUN_S
        ids.append(row)
        blocks.append(brow)
        targets.append(trow)
    return torch.tensor(ids), torch.tensor(blocks), torch.tensor(targets)


def _synthetic_model(penalty, lam, seed=0):
    cfg = LlamaConfig(vocab_size=V_S, hidden_size=E_S, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:3, :R_S] = torch.randn(3, R_S, generator=g)
        for b in range(1, NB_S + 1):
            lo = 3 + (b - 1) * VB_S
            emb[lo: lo + VB_S, b * R_S:(b + 1) * R_S] = torch.randn(VB_S, R_S, generator=g)
    model.model.embed_tokens.weight.requires_grad_(False)
    handle = hl.apply_localist(model, hl.LocalistConfig(
        alpha=0.0, block_assignment="explicit", max_blocks=NB_S, penalty=penalty, penalty_lambda=lam,
        general_head_fraction=0.0, subspace_rank=R_S))
    return model, handle


def _train_synthetic(penalty, lam, steps=150, lr=1e-2, seed=0):
    model, handle = _synthetic_model(penalty, lam, seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    model.train()
    stats = None
    for _ in range(steps):
        ids, blocks, targets = _synthetic_batch(16, g)
        logits = model(input_ids=ids, block_ids=blocks).logits
        loss = F.cross_entropy(logits.reshape(-1, V_S), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if penalty == "prox":
            stats = prox_step(handle, lr)
    # Data-loss gradient at the final weights, for the KKT check.
    opt.zero_grad()
    ids, blocks, targets = _synthetic_batch(64, g)
    logits = model(input_ids=ids, block_ids=blocks).logits
    F.cross_entropy(logits.reshape(-1, V_S), targets.reshape(-1), ignore_index=-100).backward()
    model.eval()
    return model, handle, stats


def _locality(model, handle, dial):
    """Per-layer (PF, BM) of the cross-block queries (later runs), from handle.record() at the given dial."""
    ids, blocks, targets = _synthetic_batch(32, torch.Generator().manual_seed(999))
    target_blocks = torch.where(targets == -100, torch.zeros_like(blocks), blocks)  # score the later runs only
    with torch.no_grad(), handle.dial(dial), handle.record() as rec:
        model(input_ids=ids, block_ids=blocks, target_block_ids=target_blocks)
    layers = rec.summary()["layers"]
    return {layer: (row["pointer_fidelity"], row["block_mass"]) for layer, row in layers.items()}


@pytest.mark.slow
def test_penalty_training_zeroes_off_block_groups_and_raises_locality():
    lam = 20.0  # lr * lambda = 0.2 per step exceeds any Adam step on a 12 x 12 group (<= 0.12): above threshold
    model, handle, stats = _train_synthetic("prox", lam)
    # Every off-block group is exactly zero; own-block groups are not.
    assert stats.num_zero == stats.num_penalised == 2 * (4 * 2 + 4 * 2)  # layers x (Q + K heads) x 2 other blocks
    norms = group_norms(handle)
    lam_w = penalty_weights(handle)
    assert float(norms.q.detach()[lam_w > 0].abs().max()) == 0.0
    assert float(norms.k.detach()[lam_w > 0].abs().max()) == 0.0
    assert float(norms.q.detach()[lam_w == 0].min()) > 0.0
    # KKT for the zero groups on the data-loss gradient: ||grad_g L_data|| <= lambda.
    ratios = kkt_ratios(handle, stats)
    assert ratios.numel() == stats.num_zero
    assert float(ratios.max()) <= 1.0 + 1e-6
    assert float(ratios.max()) > 0.0  # the data do pull on the zero groups

    base_model, base_handle, _ = _train_synthetic("none", 0.0)
    for dial in (0.0, 0.5):
        with_pen = _locality(model, handle, dial)
        without = _locality(base_model, base_handle, dial)
        # Layer 0 reads the block-structured embeddings: there the penalty keeps attention in the query's block
        # although the data reward looking across blocks.
        assert with_pen[0][1] > without[0][1] + 0.05, (dial, with_pen, without)
        assert with_pen[0][0] > without[0][0], (dial, with_pen, without)
