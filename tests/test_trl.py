"""TRL's ``SFTTrainer`` on a localist model (``hf_localist.integrations.trl``; the ``trl`` extra, which CI installs).

TRL's loss runs the model's backbone directly (its fused LM head) and its collator keeps only ``input_ids`` /
``labels``: these tests show that the block ids of a dataset column, and those of anchor tokens, reach the attention
of that call (the fused loss equals the loss of the model's own forward with those block ids, and differs at dial
0), in training too (the layouts of the training forwards), with peft LoRA, and that the docs' example runs.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, VOCAB, build_model, random_block_ids, random_ids, word_tokenizer

import hf_localist as hl
from hf_localist.blocks.ids import segment_block_ids
from hf_localist.training.callback import localist_handle_of as _handle

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: E402

from hf_localist.integrations.trl import LocalistSFTTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")

N, T = 8, 12
WORDS = [f"w{i}" for i in range(80)]  # ids 4..83; the anchor tokens come after them (< VOCAB: no resize)


def _tokenizer():
    return word_tokenizer(WORDS, specials=("[PAD]", "[UNK]", "[BOS]", "[EOS]"))


def _config(output_dir, **overrides) -> SFTConfig:
    kw = dict(output_dir=str(output_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
              report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    kw.update(overrides)
    return SFTConfig(**kw)


def _block_dataset(lengths=None) -> Dataset:
    """Ragged examples (so that the collator pads) with their own random block layouts."""
    ids, blocks = random_ids(N, T, seed=3, low=4, high=84).tolist(), random_block_ids(N, T, seed=3).tolist()
    lengths = lengths or [T - i % 4 for i in range(N)]
    return Dataset.from_dict({"input_ids": [r[:n] for r, n in zip(ids, lengths)],
                              "block_ids": [r[:n] for r, n in zip(blocks, lengths)]})


def _reference_loss(model, batch) -> torch.Tensor:
    """The mean next-token loss from the model's own forward (full logits) with the batch's block ids."""
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "block_ids") if k in batch}
    logits = model(**kw).logits[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)


def _fused_loss(trainer, batch, alpha) -> torch.Tensor:
    """SFTTrainer's own loss (the fused LM head: the backbone called directly) at dial ``alpha``."""
    with torch.no_grad(), _handle(trainer.model).dial(alpha):
        return trainer.compute_loss(trainer.model, dict(batch))


def _assert_blocks_reach_the_attention(trainer, batch) -> None:
    model = trainer.model
    model.eval()
    with torch.no_grad():
        with _handle(model).dial(1.0):
            reference = _reference_loss(model, batch)
    fused = _fused_loss(trainer, batch, 1.0)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    assert (fused - _fused_loss(trainer, batch, 0.0)).abs() > 1e-3  # the blocks change the loss at dial 1


def _train_and_capture(trainer):
    """Train; return the layouts of the training forwards (the fused loss calls)."""
    handle = _handle(trainer.model)
    with handle.capture_layouts() as calls:
        trainer.train()
    assert trainer.state.global_step == trainer.args.max_steps
    return calls


def _rows(calls):
    """The valid (non-padding) part of every row of every captured layout."""
    return [tuple(c.block_ids[i][c.query_valid[i]].tolist()) for c in calls for i in range(c.block_ids.shape[0])]


# ----------------------------------------------------------------------------------------------- block_ids column
@pytest.mark.parametrize("trainer_kind", ["LocalistSFTTrainer", "SFTTrainer"])
def test_block_ids_column_reaches_the_attention(tmp_path, trainer_kind):
    model = build_model("llama")
    hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit", alpha=1.0, penalty="prox",
                                               penalty_lambda=0.01))
    ds = _block_dataset()
    if trainer_kind == "LocalistSFTTrainer":
        trainer = LocalistSFTTrainer(model=model, args=_config(tmp_path), train_dataset=ds,
                                     processing_class=_tokenizer(), localist_log_every=1)
    else:  # a plain SFTTrainer: the collator wrapped by hand, and the block-id columns kept
        collator = hl.LocalistDataCollator(collator=DataCollatorForLanguageModeling(pad_token_id=0))
        trainer = SFTTrainer(model=model, args=_config(tmp_path, remove_unused_columns=False), train_dataset=ds,
                             processing_class=_tokenizer(), data_collator=collator,
                             callbacks=[hl.LocalistCallback(log_every=1)])
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "block_ids"}
    assert batch["attention_mask"].eq(0).any()  # ragged: padded on the right, the block ids with it
    _assert_blocks_reach_the_attention(trainer, batch)

    calls = _train_and_capture(trainer)
    expected = set(map(tuple, ds["block_ids"]))
    assert calls and set(_rows(calls)) <= expected  # every training forward ran with its examples' block ids
    logged = [h for h in trainer.state.log_history if "localist/block_mass" in h]
    assert logged and logged[-1]["localist/penalised_groups"] > 0  # LocalistCallback ran (prox, metrics)


# ----------------------------------------------------------------------------------------------- anchor tokens
@pytest.mark.parametrize("trainer_kind", ["LocalistSFTTrainer", "SFTTrainer"])
def test_anchor_tokens_reach_the_attention_without_a_column(tmp_path, trainer_kind):
    model = build_model("llama")
    tok = _tokenizer()
    cfg = hl.add_block_tokens(tok, model, ["a", "b"], hl.LocalistConfig(alpha=1.0, block_assignment="segment"))
    assert max(cfg.anchor_token_ids + [cfg.general_token_id]) < VOCAB
    hl.apply_localist(model, cfg)
    g = torch.Generator().manual_seed(0)

    def text():
        words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (9,), generator=g)]
        return " ".join(["<blk_a>"] + words[:4] + ["<blk_b>"] + words[4:7] + ["<blk_general>"] + words[7:])

    ds = Dataset.from_dict({"text": [text() for _ in range(N)]})  # plain text: SFTTrainer tokenizes it
    cls = LocalistSFTTrainer if trainer_kind == "LocalistSFTTrainer" else SFTTrainer
    trainer = cls(model=model, args=_config(tmp_path), train_dataset=ds, processing_class=tok,
                  callbacks=[hl.LocalistCallback(log_every=1)])
    batch = next(iter(trainer.get_train_dataloader()))
    assert "block_ids" not in batch
    _assert_blocks_reach_the_attention(trainer, batch)  # the reference lays out the same anchor tokens

    calls = _train_and_capture(trainer)
    ids = torch.tensor(trainer.train_dataset["input_ids"])  # every text has its anchors at the same positions
    expected = segment_block_ids(ids, cfg.anchor_token_ids, cfg.general_token_id)
    assert (expected == expected[0]).all() and {0, 1, 2} <= set(expected[0].tolist())
    assert calls and all((call.block_ids == expected[0]).all() for call in calls)


# ----------------------------------------------------------------------------------------------- peft LoRA
def test_lora_peft_config_trains_with_block_ids(tmp_path):
    model = build_model("llama")
    hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit", alpha=1.0))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = LocalistSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_block_dataset(),
                                 processing_class=_tokenizer(), peft_config=lora)
    assert type(trainer.model).__name__.startswith("Peft")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    batch = next(iter(trainer.get_train_dataloader()))
    calls = _train_and_capture(trainer)
    assert set(_rows(calls)) <= set(map(tuple, _block_dataset()["block_ids"]))
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapters trained
    _assert_blocks_reach_the_attention(trainer, batch)


# ----------------------------------------------------------------------------------------------- truncation
@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_block_ids_are_truncated_with_input_ids(tmp_path, mode):
    model = build_model("llama")
    hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit"))
    ds = _block_dataset(lengths=[T] * N)
    trainer = LocalistSFTTrainer(model=model, args=_config(tmp_path, max_length=8, truncation_mode=mode),
                                 train_dataset=ds, processing_class=_tokenizer())
    cut = slice(None, 8) if mode == "keep_start" else slice(-8, None)
    expected = {tuple(i[cut]): b[cut] for i, b in zip(ds["input_ids"], ds["block_ids"])}
    features = [trainer.train_dataset[i] for i in range(4)]
    assert all(len(f["block_ids"]) == T and len(f["input_ids"]) == 8 for f in features)  # SFTTrainer cut input_ids
    batch = trainer.data_collator(features)
    for ids, blocks in zip(batch["input_ids"].tolist(), batch["block_ids"].tolist()):
        assert blocks == expected[tuple(ids)]


# ----------------------------------------------------------------------------------------------- penalty='loss'
def test_penalty_loss_is_added_once_by_localist_sft_trainer(tmp_path):
    from hf_localist.training.penalty import penalty

    model = build_model("llama")
    handle = hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit", alpha=1.0, penalty="loss",
                                                        penalty_lambda=0.1, localist_loss_coef=0.5))
    trainer = LocalistSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_block_dataset(),
                                 processing_class=_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*penalty='loss'")  # no warning: the trainer adds the penalty
        loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        data_loss = SFTTrainer.compute_loss(trainer, model, dict(batch))  # SFTTrainer's loss alone (no grad)
        pen = penalty(handle)
    assert float(pen) > 0
    torch.testing.assert_close(loss.detach(), data_loss + 0.5 * pen, rtol=1e-5, atol=1e-6)
    assert loss.requires_grad
    trainer.train()
    assert any("localist_loss" in h for h in trainer.state.log_history)


def test_plain_sft_trainer_warns_that_penalty_loss_is_missing(tmp_path):
    model = build_model("llama")
    hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit", alpha=1.0, penalty="loss"))
    collator = hl.LocalistDataCollator(collator=DataCollatorForLanguageModeling(pad_token_id=0))
    trainer = SFTTrainer(model=model, args=_config(tmp_path, remove_unused_columns=False),
                         train_dataset=_block_dataset(), processing_class=_tokenizer(), data_collator=collator)
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    with pytest.warns(UserWarning, match="penalty='loss'.*LocalistSFTTrainer"):
        trainer.compute_loss(model, dict(batch))


# ----------------------------------------------------------------------------------------------- errors
def test_errors(tmp_path):
    model = build_model("llama")
    with pytest.raises(hl.LocalistStateError, match="apply_localist"):
        LocalistSFTTrainer(model=model, args=_config(tmp_path), train_dataset=_block_dataset(),
                           processing_class=_tokenizer())
    hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit"))
    for bad in ({"padding_free": True, "max_length": None}, {"packing": True, "packing_strategy": "bfd"}):
        with pytest.raises(hl.LocalistConfigError, match="one row"):
            LocalistSFTTrainer(model=model, args=_config(tmp_path, **bad), train_dataset=_block_dataset(),
                               processing_class=_tokenizer())
    with pytest.raises(hl.LocalistConfigError, match="packing=True drops"):
        LocalistSFTTrainer(model=model, args=_config(tmp_path, packing=True, packing_strategy="wrapped"),
                           train_dataset=_block_dataset(), processing_class=_tokenizer())
    with pytest.raises(hl.BlockIdsError, match="padding_free"):
        hl.LocalistDataCollator(collator=DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    with pytest.raises(hl.BlockIdsError, match="pads on the right"):
        hl.LocalistDataCollator(collator=DataCollatorForLanguageModeling(pad_token_id=0), padding_side="left")
    collator = hl.LocalistDataCollator(collator=DataCollatorForLanguageModeling(pad_token_id=0), max_length=4)
    with pytest.raises(hl.BlockIdsError, match="same length"):  # not truncated to max_length: a real mismatch
        collator([{"input_ids": [5, 6, 7], "block_ids": [1, 1, 1, 2]}])


# ----------------------------------------------------------------------------------------------- the docs
def _doc_blocks(path, section):
    text = Path(ROOT, path).read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)


def test_howto_train_trl_examples_run(tmp_path, monkeypatch):
    section = "## With a plain `Trainer`, or TRL's `SFTTrainer`"
    blocks = [b for b in _doc_blocks("docs/howto-train.md", section) if "from trl" in b]
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}  # the second example continues the first
    for code in blocks:
        exec(compile(code, "docs/howto-train.md", "exec"), namespace)  # the docs' own example
        trainer = namespace["trainer"]
        assert trainer.state.global_step == trainer.args.max_steps
        assert any(k.startswith("localist/") for h in trainer.state.log_history for k in h)


# ----------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_sft_trainer_with_block_ids_and_lora(smollm2, tmp_path):
    """The reported setting: SmolLM2-135M, a dataset with input_ids and block_ids columns, LocalistCallback (here
    through LocalistSFTTrainer, with a LoRA peft_config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(smollm2)
    hl.apply_localist(model, hl.LocalistConfig(block_assignment="explicit", alpha=1.0))
    texts = [("The match ended in a draw after extra time.", "Shares of the chip maker rose on Monday."),
             ("The striker scored twice in the final.", "The central bank left its rates unchanged."),
             ("Fans filled the stadium for the derby.", "Oil prices fell for a third week."),
             ("The coach praised his young defenders.", "The startup raised money from investors.")]
    rows = []
    for sport, business in texts:
        a, b = tok(sport)["input_ids"], tok(" " + business)["input_ids"]
        rows.append({"input_ids": a + b, "block_ids": [1] * len(a) + [2] * len(b)})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = LocalistSFTTrainer(model=model, args=_config(tmp_path, max_steps=2, per_device_train_batch_size=2,
                                                           learning_rate=1e-3),
                                 train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=lora,
                                 localist_log_every=1)
    batch = next(iter(trainer.get_train_dataloader()))
    calls = _train_and_capture(trainer)
    assert set(_rows(calls)) <= {tuple(r["block_ids"]) for r in rows}
    assert any("localist/block_mass" in h for h in trainer.state.log_history)
    _assert_blocks_reach_the_attention(trainer, batch)
