"""The ``hf-localist`` subcommands apply / inspect / train / bench, on a tiny Llama and a tiny word tokenizer."""

from __future__ import annotations

import json
import os

import pytest
from helpers import build_model, word_tokenizer

import hf_localist as hl
from hf_localist import cli

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "home", "red", "blue"]
TEXT = "the cat sat on the mat\n\nthe dog ran far away\n\nred blue home\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_llama")
    # generation keeps the config's eos (id 2, "[EOS]" of the tokenizer)
    build_model("llama", seed=0, vocab_size=32, fixed_length=False).save_pretrained(path)
    word_tokenizer(WORDS, specials=("[PAD]", "[BOS]", "[EOS]", "[UNK]")).save_pretrained(path)
    return str(path)


@pytest.fixture
def text_file(tmp_path) -> str:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "apply", "inspect", "train", "bench"):
        assert name in out


def test_apply_flags_come_from_config_metadata(capsys):
    with pytest.raises(SystemExit):
        cli.main(["apply", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--first_local_layer" in out and "--block_assignment {segment,explicit,centroid}" in out
    assert "The locality dial in [0, 1]" in out  # LocalistConfig.alpha's metadata help


def test_apply_saves_a_localist_model(model_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = cli.main(["apply", "--model_dir", model_dir, "--output_dir", out, "--alpha", "0.7", "--schedule",
                   "progressive", "--first_local_layer", "1", "--block_assignment", "explicit"])
    assert rc == 0
    assert "saved localist LlamaForCausalLM" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "localist_config.json"))
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    model = hl.AutoLocalistModel.from_pretrained(out)
    cfg = model.localist_handle.config
    assert (cfg.alpha, cfg.schedule, cfg.first_local_layer, cfg.block_assignment) == (0.7, "progressive", 1, "explicit")
    assert cfg.num_layers == 2 and cfg.model_type == "llama"


@pytest.mark.parametrize("argv, needle", [
    (["--alpha", "1.5"], "LocalistConfig.alpha=1.5 is invalid"),
    (["--first_local_layer", "5"], "first_local_layer"),
])
def test_apply_bad_values_exit_2_with_one_line(model_dir, tmp_path, capsys, argv, needle):
    rc = cli.main(["apply", "--model_dir", model_dir, "--output_dir", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err
    last = err.strip().splitlines()[-1]  # (transformers may draw a weight-loading progress bar before it)
    assert last.startswith("hf-localist apply: error:") and needle in last


def test_missing_model_dir_exits_1(tmp_path, capsys, text_file):
    assert cli.main(["apply", "--model_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["inspect", "--model_dir", str(tmp_path / "nope"), "--text_file", text_file]) == 1
    assert "is not a directory" in capsys.readouterr().err


def test_inspect_plain_model_paragraph_blocks(model_dir, text_file, capsys):
    rc = cli.main(["inspect", "--model_dir", model_dir, "--text_file", text_file, "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["localist_state"] == "defaults applied"
    assert result["tokens"] == 1 + 6 + 5 + 3  # BOS + three paragraphs
    assert result["blocks"].startswith("3 paragraphs")
    assert sorted(result["layers"]) == ["0", "1"]
    for row in result["layers"].values():
        assert row["alpha_l"] == 1.0
        # Hard mask (alpha = 1): every query attends inside its own block, so block mass is 1.
        assert row["block_mass"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= row["pointer_fidelity"] <= 1.0 and row["entropy"] >= 0.0
        assert row["n_pointer_fidelity"] > 0


def test_inspect_alpha_zero_table_and_loaded_state(model_dir, text_file, tmp_path, capsys):
    out = str(tmp_path / "loc")
    assert cli.main(["apply", "--model_dir", model_dir, "--output_dir", out, "--alpha", "0.5"]) == 0
    capsys.readouterr()
    assert cli.main(["inspect", "--model_dir", out, "--text_file", text_file, "--alpha", "0"]) == 0
    text = capsys.readouterr().out
    assert "localist state loaded" in text and "alpha=0.0" in text
    lines = text.splitlines()
    assert lines[1].split()[:5] == ["layer", "alpha_l", "entropy", "pointer_fid", "block_mass"]
    assert [line.split()[0] for line in lines[2:]] == ["0", "1", "mean"]
    # At alpha = 0 nothing is masked: some mass leaves the target block.
    assert all(float(line.split()[4]) < 1.0 for line in lines[2:4])


def test_inspect_segment_anchors(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    handle = hl.apply_localist(model)
    hl.add_block_tokens(tok, model, names=["a", "b"], config=handle.config)
    out = tmp_path / "seg"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert handle.config.anchor_token_ids
    text = tmp_path / "seg.txt"
    text.write_text("<blk_a> the cat sat <blk_b> the dog ran", encoding="utf-8")
    assert cli.main(["inspect", "--model_dir", str(out), "--text_file", str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["blocks"] == "segment assignment from 2 anchor tokens"
    assert result["layers"]["1"]["block_mass"] == pytest.approx(1.0, abs=1e-5)


def test_inspect_errors(model_dir, tmp_path, capsys):
    assert cli.main(["inspect", "--model_dir", model_dir, "--text_file", str(tmp_path / "none.txt")]) == 1
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    assert cli.main(["inspect", "--model_dir", model_dir, "--text_file", str(empty)]) == 1
    assert "holds no text" in capsys.readouterr().err


def _fake_repo(root, body: str) -> None:
    for rel in ("examples/train_localist.py", "benchmarks/bench_attention.py", "benchmarks/bench_penalty.py"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body.replace("NAME", rel), encoding="utf-8")


def test_train_and_bench_pass_arguments_through(tmp_path, monkeypatch, capsys):
    _fake_repo(tmp_path, "def main(argv=None):\n    print('NAME', argv)\n    return {'ok': True}\n")
    monkeypatch.setenv(cli.REPO_ENV, str(tmp_path))
    assert cli.main(["train", "--output_dir", "/tmp/x", "--quick", "--help"]) == 0
    assert "examples/train_localist.py ['--output_dir', '/tmp/x', '--quick', '--help']" in capsys.readouterr().out
    assert cli.main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "benchmarks/bench_attention.py ['--quick']" in out and "benchmarks/bench_penalty.py ['--quick']" in out
    assert cli.main(["bench", "--only", "penalty"]) == 0
    assert capsys.readouterr().out.strip() == "benchmarks/bench_penalty.py []"


def test_bench_exit_status_of_script(tmp_path, monkeypatch):
    _fake_repo(tmp_path, "def main(argv=None):\n    return 3\n")
    monkeypatch.setenv(cli.REPO_ENV, str(tmp_path))
    assert cli.main(["bench", "--only", "attention"]) == 3


def test_train_and_bench_without_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cli.REPO_ENV, str(tmp_path))
    assert cli.main(["train", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "examples/train_localist.py not found" in err and "source checkout" in err
    assert cli.main(["bench", "--quick"]) == 1
    assert "benchmarks/bench_attention.py not found" in capsys.readouterr().err


def test_real_scripts_are_found_in_this_checkout(monkeypatch):
    monkeypatch.delenv(cli.REPO_ENV, raising=False)
    for rel in ("examples/train_localist.py", "benchmarks/bench_attention.py", "benchmarks/bench_penalty.py"):
        assert os.path.isfile(cli.repo_script(rel))
