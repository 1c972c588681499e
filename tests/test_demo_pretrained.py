"""``hf-localist demo --model DIR --data FILE.csv``: the dial and routing parts on a (here tiny) saved checkpoint."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from helpers import PNG_MAGIC
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_localist import LocalistConfig, LocalistConfigError, apply_localist
from hf_localist.cli import main
from hf_localist.demo.passages import (
    alone_nll,
    block_nll,
    encode_passages,
    load_labeled_csv,
    passage_sequences,
    perplexities,
    sink_token_id,
)
from hf_localist.demo.pretrained import run_pretrained_demo
from hf_localist.demo.run import build_tokenizer, data_path

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama (RoPE, GQA) with a word-level tokenizer of the bundled articles, saved as a model directory."""
    d = tmp_path_factory.mktemp("tiny_pretrained")
    with open(data_path(), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    tok = build_tokenizer([r["text"] for r in rows], vocab_size=2000)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=None,
                      initializer_range=0.3)  # sharp attention: positions change the outputs visibly
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_labeled_csv_errors_name_the_columns_and_labels(tmp_path):
    with pytest.raises(LocalistConfigError, match=r"no column\(s\) \['body'\].*'text'"):
        load_labeled_csv(data_path(), "body", "label")
    one = tmp_path / "one.csv"
    one.write_text("text,label\nhello world,a\nanother one,a\n")
    with pytest.raises(LocalistConfigError, match="at least 2"):
        load_labeled_csv(str(one), "text", "label")
    text = load_labeled_csv(data_path(), "text", "label")
    assert text.labels == ["0", "1", "2", "3"]  # numeric labels in numeric order
    assert not set(text.train["0"]) & set(text.test["0"])


def test_restart_at_dial_one_reads_every_passage_as_if_alone(checkpoint):
    """The claim the dial table rests on: with block_positions='restart' at dial 1, the per-block perplexity of a
    multi-passage input equals that of each passage read alone after the sink (fp32 rounding only)."""
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    text = load_labeled_csv(data_path(), "text", "label")
    sink = sink_token_id(tok)
    assert sink == tok.bos_token_id  # this tokenizer adds [BOS] itself
    seqs = passage_sequences(encode_passages(tok, text.test, text.labels, 32), text.labels, sink, 3, 4, seed=0)
    alone = perplexities(alone_nll(model, seqs, sink, tok.pad_token_id), text.labels)
    handle = apply_localist(model, LocalistConfig(alpha=1.0, block_assignment="explicit", block_positions="restart"))
    restart = perplexities(block_nll(model, seqs, tok.pad_token_id), text.labels)
    handle.update(block_positions="continuous")
    continuous = perplexities(block_nll(model, seqs, tok.pad_token_id), text.labels)
    for label in [*text.labels, "all"]:
        assert math.isclose(restart[label], alone[label], rel_tol=1e-5), (label, restart[label], alone[label])
    # positions matter in this model, so the equality above is not a no-op:
    assert not math.isclose(continuous["all"], alone["all"], rel_tol=1e-3), (continuous, alone)


def test_pretrained_demo_writes_the_report(checkpoint, tmp_path):
    out = tmp_path / "report"
    results = run_pretrained_demo(checkpoint, data_path(), "text", "label", out, steps=1, print_table=False,
                                  progress=False)
    assert (out / "report.md").read_text().startswith("# hf-localist demo on a pretrained model")
    assert json.loads((out / "results.json").read_text())["kind"] == "pretrained"
    assert (out / "dial_pretrained.png").read_bytes()[:8] == PNG_MAGIC
    dial = results["dial"]
    assert [(r["policy"], r["alpha"]) for r in dial["before_lora"]] == [
        (p, a) for p in ("continuous", "restart") for a in (0.0, 0.5, 0.9, 1.0)]
    assert dial["lora"]["trainable_parameters"] > 0
    restart1 = next(r for r in dial["before_lora"] if r["policy"] == "restart" and r["alpha"] == 1.0)
    assert math.isclose(restart1["perplexity"]["all"], dial["alone"]["all"], rel_tol=1e-5)
    r = results["routing"]
    assert 0.0 <= r["routing_accuracy"] <= 1.0 and 0.0 <= r["prototype_routing_accuracy"] <= 1.0
    assert [row["mode"] for row in r["rows"]][0] == "base alone"
    assert sum(map(sum, r["confusion"])) == r["test_texts"]
    assert 0.0 <= r["confidence"]["threshold"] <= 1.0


def test_cli_demo_with_a_model_and_its_errors(checkpoint, tmp_path, capsys):
    # A usage error (a flag combination) exits 2, another user error 1; one line naming the fix, no traceback.
    assert main(["demo", "--data", data_path(), "--output_dir", str(tmp_path / "x")]) == 2
    assert "--data needs --model" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "x")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert main(["demo", "--model", checkpoint, "--steps", "1", "--no_progress", "--output_dir",
                 str(tmp_path / "r")]) == 0
    assert "## 2. Routing between LoRA specialists" in capsys.readouterr().out
