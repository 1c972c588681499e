"""peft adapters of a localist model (hf_localist.patch.adapters): the adapter directory written by
``Trainer.save_model``, ``PeftModel.save_pretrained`` and ``push_to_hub`` carries the localist settings and state;
``AutoLocalistModel.from_pretrained(adapter_dir)`` gives back a model with the same logits and state; the public
``save_localist_state`` / ``load_localist_state``; the lazy training imports of ``hf_localist``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import build_model, random_block_ids, random_ids
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments

import hf_localist as hl
from hf_localist.errors import LocalistLoadError
from hf_localist.patch.persistence import BLOCKS_FILE, STATE_FILE
from hf_localist.savedir import MANIFEST_NAME
from hf_localist.training.subspaces import calibrate_subspaces

peft = pytest.importorskip("peft")

LOCALIST_FILES = {"localist_config.json", STATE_FILE}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


# ---------------------------------------------------------------------------------------------- helpers
def _dataset(n=8, seq=10, seed=0):
    ids = random_ids(n, seq, seed=seed)
    blocks = random_block_ids(n, seq, num_blocks=3, seed=seed)
    return [{"input_ids": ids[i], "labels": ids[i].clone(), "block_ids": blocks[i]} for i in range(n)]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=100,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _base_dir(tmp_path) -> str:
    path = str(tmp_path / "base")
    if not os.path.isdir(path):
        build_model("llama", seed=0).save_pretrained(path)
    return path


def _lora_config():
    return peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _localist_lora(tmp_path, order="peft_first", penalty="none"):
    """(peft model, handle): the base from ``tmp_path/base`` (so that the adapter config names it), a LoRA adapter,
    localist with calibrated pca subspaces, threshold lambdas and a chosen set of active blocks."""
    base = LlamaForCausalLM.from_pretrained(_base_dir(tmp_path))
    cfg = hl.LocalistConfig(alpha=0.6, block_assignment="explicit", max_blocks=3, subspace="pca",
                            active_blocks=[1, 3], penalty=penalty)
    if order == "peft_first":
        model = peft.get_peft_model(base, _lora_config())
        handle = hl.apply_localist(model, cfg)
    else:  # localist first, wrapped afterwards: the Trainer / callback binds the wrapper's save
        handle = hl.apply_localist(base, cfg)
        model = peft.get_peft_model(base, _lora_config())
    data = _dataset(seed=11)
    calibrate_subspaces(handle, [{"input_ids": torch.stack([d["input_ids"] for d in data]),
                                  "block_ids": torch.stack([d["block_ids"] for d in data])}])
    torch.manual_seed(1)
    handle.state.lambda_threshold = torch.rand(len(handle.attention_modules), 4, 4)
    return model, handle


def _train_by_hand(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for batch in [_dataset(n=4, seed=s) for s in range(steps)]:
        out = model(**{k: torch.stack([d[k] for d in batch]) for k in batch[0]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


def _logits(model, seed=5):
    ids, blocks = random_ids(2, 12, seed=seed), random_block_ids(2, 12, num_blocks=3, seed=seed)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, block_ids=blocks).logits


def _assert_same(reloaded, model, handle):
    """Same logits (bit-equal: the same weights and the same computation) and the same localist state."""
    assert isinstance(reloaded, peft.PeftModel)
    assert torch.equal(_logits(reloaded), _logits(model))
    got = reloaded.localist_handle
    assert got.config.to_dict() == handle.config.to_dict()
    assert torch.equal(got.state.subspaces, handle.state.subspaces)
    assert torch.equal(got.state.lambda_threshold, handle.state.lambda_threshold)


def _lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ---------------------------------------------------------------------------------------------- saves
@pytest.mark.parametrize("order", ["peft_first", "localist_first"])
def test_trainer_save_model_round_trip(tmp_path, order):
    model, handle = _localist_lora(tmp_path, order)
    before = _lora_weights(model)
    trainer = hl.LocalistTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in _lora_weights(model).items())  # it trained
    out = str(tmp_path / "adapter")
    trainer.save_model(out)
    files = set(os.listdir(out))
    assert ADAPTER_FILES | LOCALIST_FILES | {MANIFEST_NAME} <= files
    assert not {"config.json", "model.safetensors"} & files  # an adapter, not the whole model
    assert json.load(open(os.path.join(out, "adapter_config.json")))["base_model_name_or_path"] == \
        _base_dir(tmp_path)
    assert hl.LocalistConfig.from_pretrained(out).to_dict() == handle.config.to_dict()

    reloaded = hl.AutoLocalistModel.from_pretrained(out)  # the base named by adapter_config.json
    _assert_same(reloaded, model, handle)
    assert not any(p.requires_grad for p in reloaded.parameters())  # is_trainable=False: frozen, for inference
    trainable = hl.AutoLocalistModel.from_pretrained(out, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(_lora_weights(trainable))
    _assert_same(trainable, model, handle)


def test_base_model_argument_path_or_loaded_model(tmp_path):
    model, handle = _localist_lora(tmp_path)
    _train_by_hand(model)
    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    moved = str(tmp_path / "moved-base")
    shutil.move(_base_dir(tmp_path), moved)  # the path in adapter_config.json is gone
    with pytest.raises(LocalistLoadError, match="base_model=") as err:
        hl.AutoLocalistModel.from_pretrained(out)
    assert str(tmp_path / "base") in str(err.value) and "adapter_config.json" in str(err.value)
    _assert_same(hl.AutoLocalistModel.from_pretrained(out, base_model=moved), model, handle)
    loaded = AutoModelForCausalLM.from_pretrained(moved)
    _assert_same(hl.AutoLocalistModel.from_pretrained(out, base_model=loaded), model, handle)
    with pytest.raises(LocalistLoadError, match="localist model"):  # already patched: not the plain base
        hl.AutoLocalistModel.from_pretrained(out, base_model=model.get_base_model())
    with pytest.raises(LocalistLoadError, match="base_model="):
        hl.AutoLocalistModel.from_pretrained(out, base_model=str(tmp_path / "nowhere"))


def test_adapter_config_without_base_is_a_load_error(tmp_path):
    model, _ = _localist_lora(tmp_path)
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    path = out / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = None
    path.write_text(json.dumps(data))
    os.unlink(out / MANIFEST_NAME)  # a hand-edited directory: loaded unchecked
    with pytest.raises(LocalistLoadError, match="names no base model.*base_model="):
        hl.AutoLocalistModel.from_pretrained(str(out))


def test_peft_save_pretrained_writes_the_localist_files_atomically(tmp_path):
    model, handle = _localist_lora(tmp_path)
    _train_by_hand(model)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    (out / "tokenizer.json").write_text("{}")  # not the save's: kept
    model.save_pretrained(str(out))
    assert ADAPTER_FILES | LOCALIST_FILES <= set(os.listdir(out))
    card = (out / "README.md").read_text()
    assert "# my notes" in card and "PEFT" in card  # peft updated the card instead of replacing it
    manifest = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert ADAPTER_FILES | LOCALIST_FILES <= set(manifest)
    assert "README.md" not in manifest and "tokenizer.json" not in manifest
    (out / "README.md").write_text("edited after the save\n")  # a later card edit does not break the load
    _assert_same(hl.AutoLocalistModel.from_pretrained(str(out)), model, handle)

    # A second save without state tensors removes the state file of the first; the tokenizer stays.
    handle.state.subspaces = handle.state.lambda_threshold = None
    model.save_pretrained(str(out))
    assert not (out / STATE_FILE).exists() and (out / "tokenizer.json").exists()
    again = hl.AutoLocalistModel.from_pretrained(str(out))
    assert again.localist_handle.state.subspaces is None
    assert torch.equal(_logits(again), _logits(model))

    # A changed adapter file is refused (the manifest), naming the file.
    with open(out / "adapter_model.safetensors", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(LocalistLoadError, match="adapter_model.safetensors"):
        hl.AutoLocalistModel.from_pretrained(str(out))


def test_plain_trainer_with_localist_callback(tmp_path):
    model, handle = _localist_lora(tmp_path, order="localist_first")
    trainer = Trainer(model=model, args=_args(tmp_path, save_strategy="steps", save_steps=3),
                      train_dataset=_dataset(), callbacks=[hl.LocalistCallback(log_every=100)])
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert ADAPTER_FILES | LOCALIST_FILES <= set(os.listdir(ckpt))
    out = str(tmp_path / "final")
    trainer.save_model(out)
    _assert_same(hl.AutoLocalistModel.from_pretrained(out), model, handle)
    _assert_same(hl.AutoLocalistModel.from_pretrained(str(ckpt)), model, handle)


def test_plain_peft_adapter_and_the_public_state_functions(tmp_path):
    # Localist first, wrapped afterwards, saved by peft with nothing localist in between: a plain adapter.
    model, handle = _localist_lora(tmp_path, order="localist_first")
    _train_by_hand(model)
    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    assert "localist_config.json" not in os.listdir(out)
    with pytest.raises(LocalistLoadError, match="save_localist_state"):
        hl.AutoLocalistModel.from_pretrained(out)
    with pytest.raises(LocalistLoadError, match="peft adapter directory"):
        hl.LocalistConfig.from_pretrained(out)
    # The public function adds the settings and the state; the adapter then reloads.
    assert hl.save_localist_state(model, out) == os.path.join(out, STATE_FILE)
    _assert_same(hl.AutoLocalistModel.from_pretrained(out), model, handle)
    # load_localist_state takes a model or its handle.
    fresh, fresh_handle = _localist_lora(tmp_path / "other", order="peft_first")
    fresh_handle.state.subspaces = fresh_handle.state.lambda_threshold = None
    assert hl.load_localist_state(fresh, out)
    assert torch.equal(fresh_handle.state.subspaces, handle.state.subspaces)
    fresh_handle.state.subspaces = None
    assert hl.load_localist_state(fresh_handle, out)
    assert torch.equal(fresh_handle.state.subspaces, handle.state.subspaces)
    with pytest.raises(hl.LocalistStateError, match="not localist"):
        hl.save_localist_state(build_model("llama"), out)


def test_public_save_into_a_saved_directory_keeps_it_verifiable(tmp_path):
    model, handle = _localist_lora(tmp_path)
    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    handle.update(alpha=0.25)
    handle.state.subspaces = handle.state.subspaces * 2
    handle.state.lambda_threshold = None
    hl.save_localist_state(model, out)  # rewrites files the manifest lists: the manifest follows
    reloaded = hl.AutoLocalistModel.from_pretrained(out)
    assert reloaded.localist_handle.config.alpha == 0.25
    assert torch.equal(reloaded.localist_handle.state.subspaces, handle.state.subspaces)
    assert reloaded.localist_handle.state.lambda_threshold is None
    handle.state.subspaces = None  # no state tensors left: the state file goes, and the manifest entry with it
    assert hl.save_localist_state(handle, out) is None
    assert not os.path.exists(os.path.join(out, STATE_FILE))
    assert STATE_FILE not in json.load(open(os.path.join(out, MANIFEST_NAME)))["files"]
    assert hl.AutoLocalistModel.from_pretrained(out).localist_handle.state.subspaces is None


def test_block_records_travel_with_the_adapter(tmp_path):
    model, handle = _localist_lora(tmp_path)
    handle.state.block_info = {1: {"name": "sports", "reason": "test"}}
    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    assert os.path.isfile(os.path.join(out, BLOCKS_FILE))
    reloaded = hl.AutoLocalistModel.from_pretrained(out)
    assert reloaded.localist_handle.state.block_info == {1: {"name": "sports", "reason": "test"}}
    assert reloaded.localist_handle.config.active_blocks == [1, 3]


def test_named_adapters_each_carry_the_localist_files(tmp_path):
    model, handle = _localist_lora(tmp_path)
    model.add_adapter("second", _lora_config())
    out = tmp_path / "adapter"
    model.save_pretrained(str(out))
    assert ADAPTER_FILES | LOCALIST_FILES <= set(os.listdir(out))
    assert ADAPTER_FILES | LOCALIST_FILES <= set(os.listdir(out / "second"))
    second = hl.AutoLocalistModel.from_pretrained(str(out / "second"))
    assert second.localist_handle.config.to_dict() == handle.config.to_dict()


def test_push_to_hub_uploads_the_localist_files(fake_hub, tmp_path):
    model, handle = _localist_lora(tmp_path)
    model.push_to_hub("someone/localist-lora")
    files = fake_hub.commits[-1]["files"]
    assert ADAPTER_FILES | LOCALIST_FILES <= set(files)
    assert json.loads(files["localist_config.json"]) == handle.config.to_dict()


def test_revert_gives_peft_its_own_save_back(tmp_path):
    model, handle = _localist_lora(tmp_path)
    assert "save_pretrained" in model.__dict__
    handle.revert()
    assert "save_pretrained" not in model.__dict__
    out = str(tmp_path / "adapter")
    model.save_pretrained(out)
    assert ADAPTER_FILES <= set(os.listdir(out)) and not LOCALIST_FILES & set(os.listdir(out))


# ---------------------------------------------------------------------------------------------- imports
def test_import_does_not_load_the_trainer():
    code = (
        "import sys, hf_localist as hl\n"
        "assert 'transformers.trainer' not in sys.modules, 'transformers.trainer imported'\n"
        "assert 'hf_localist.trainer' not in sys.modules\n"
        "names = dir(hl)\n"
        "assert all(n in names and n in hl.__all__ for n in ('LocalistTrainer', 'LocalistCallback', "
        "'RecruitmentCallback'))\n"
        "from hf_localist import LocalistTrainer\n"
        "import transformers\n"
        "assert issubclass(LocalistTrainer, transformers.Trainer) and 'transformers.trainer' in sys.modules\n"
        "assert hl.LocalistCallback.__name__ == 'LocalistCallback'\n"
        "try:\n    hl.NoSuchName\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')\n"
    )
    src = os.path.dirname(os.path.dirname(os.path.abspath(hl.__file__)))  # the hf_localist under test
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- real checkpoint
@pytest.mark.slow
def test_smollm2_lora_save_model_round_trip(smollm2, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    model = peft.get_peft_model(base, _lora_config())
    handle = hl.apply_localist(model, hl.LocalistConfig(alpha=0.7, block_assignment="explicit", max_blocks=3))
    ids = random_ids(4, 16, seed=3, high=1000)
    blocks = random_block_ids(4, 16, num_blocks=3, seed=3)
    data = [{"input_ids": ids[i], "labels": ids[i].clone(), "block_ids": blocks[i]} for i in range(4)]
    trainer = hl.LocalistTrainer(model=model, args=_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
                                 train_dataset=data)
    trainer.train()
    out = str(tmp_path / "adapter")
    trainer.save_model(out)
    assert not {"model.safetensors", "config.json"} & set(os.listdir(out))
    reloaded = hl.AutoLocalistModel.from_pretrained(out)
    assert reloaded.localist_handle.config.to_dict() == handle.config.to_dict()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids[:2], block_ids=blocks[:2]).logits
        got = reloaded(input_ids=ids[:2], block_ids=blocks[:2]).logits
    assert (got - want).abs().max() <= 1e-6
