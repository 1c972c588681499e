"""The demo end to end (tiny training budget), its data, and the ``hf-localist`` command line."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from hf_localist import LocalistConfig, add_block_tokens
from hf_localist.blocks import segment_block_ids
from hf_localist.cli import build_parser, main
from hf_localist.demo import (
    DIAL_VALUES,
    TOPICS,
    build_tokenizer,
    data_path,
    encode_articles,
    held_out_sequences,
    load_articles,
    make_sequence,
    run_demo,
)

STEPS = 3  # smaller than --quick: the checks below are about the plumbing, not the quality


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = run_demo(out, quick=True, seed=0, steps=STEPS, print_table=False)
    return out, results


# ------------------------------------------------------------------------------------------- bundled data
def test_bundled_data_is_class_balanced_and_small():
    path = data_path()
    assert os.path.getsize(path) < 300_000
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for split, per_class in (("train", 240), ("test", 25)):
        counts = [sum(r["split"] == split and int(r["label"]) == k for r in rows) for k in range(4)]
        assert counts == [per_class] * 4, (split, counts)
    assert {r["topic"] for r in rows} == set(TOPICS)
    train_texts = {r["text"] for r in rows if r["split"] == "train"}
    assert not train_texts & {r["text"] for r in rows if r["split"] == "test"}, "held-out articles leak into training"
    assert os.path.isfile(os.path.join(os.path.dirname(path), "README.md"))


def test_segments_follow_the_topic_anchors():
    articles = load_articles("train")[:40]
    tokenizer = build_tokenizer([a.text for a in articles])
    config = add_block_tokens(tokenizer, None, list(TOPICS), LocalistConfig())
    enc = encode_articles(tokenizer, articles, 16)
    parts = [next(p for p in enc if p[0] == t) for t in (2, 0, 3)]
    seq = make_sequence(parts, tokenizer.bos_token_id, config.anchor_token_ids)
    blocks = segment_block_ids(torch.tensor([seq]), config.anchor_token_ids, config.general_token_id)[0].tolist()
    expected = [0] + [t + 1 for t, ids in parts for _ in range(len(ids) + 1)]
    assert blocks == expected
    assert tokenizer.convert_ids_to_tokens(seq[1]) == "<blk_business>"


def test_held_out_sequences_use_each_article_once_and_mix_topics():
    articles = load_articles("test")
    tokenizer = build_tokenizer([a.text for a in load_articles("train")])
    config = add_block_tokens(tokenizer, None, list(TOPICS), LocalistConfig())
    enc = encode_articles(tokenizer, articles, 64)
    seqs = held_out_sequences(enc, tokenizer.bos_token_id, config.anchor_token_ids, seed=0)
    anchors = set(config.anchor_token_ids)
    per_seq = [[t for t in s if t in anchors] for s in seqs]
    assert sum(len(a) for a in per_seq) == len(enc)
    assert all(2 <= len(a) <= 4 and len(set(a)) == len(a) for a in per_seq)
    assert seqs == held_out_sequences(enc, tokenizer.bos_token_id, config.anchor_token_ids, seed=0)


# ------------------------------------------------------------------------------------------- the demo
def test_demo_writes_report_and_results(tiny_demo):
    out, results = tiny_demo
    report = (out / "report.md").read_text(encoding="utf-8")
    on_disk = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert on_disk["table_markdown"] in report
    assert [run["train_alpha"] for run in on_disk["runs"]] == [1.0, 0.0]
    assert on_disk["runs"][0]["backend_counts"].get("segment", 0) > 0, "alpha=1 training did not use the segment backend"
    for run in on_disk["runs"]:
        assert run["steps"] == STEPS and len(run["train_losses"]) == STEPS


def test_table_has_every_dial_value(tiny_demo):
    out, results = tiny_demo
    table = results["table_markdown"].splitlines()
    assert len(table) == 2 + len(DIAL_VALUES) * len(results["runs"])
    for run in results["runs"]:
        assert [row["alpha"] for row in run["sweep"]] == list(DIAL_VALUES)
    dial_column = [line.split("|")[2].strip() for line in table[2:]]
    assert dial_column == [f"{a:.2f}" for a in DIAL_VALUES] * len(results["runs"])


def test_metrics_are_finite_and_block_mass_follows_the_dial(tiny_demo):
    _, results = tiny_demo
    for run in results["runs"]:
        rows = run["sweep"]
        for row in rows:
            assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1.0
            assert 0.0 <= row["entropy"] and math.isfinite(row["entropy"])
            assert 0.0 <= row["pointer_fidelity"] <= row["block_mass"] <= 1.0 + 1e-6
        assert rows[-1]["alpha"] == 1.0
        assert rows[-1]["block_mass"] == pytest.approx(1.0, abs=1e-5)  # hard mode: only the own block is visible
        masses = [row["block_mass"] for row in rows]
        assert all(b >= a - 1e-6 for a, b in zip(masses, masses[1:])), masses
        assert masses[-1] > masses[0] + 0.1
        assert rows[-1]["entropy"] < rows[0]["entropy"]


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_demo_is_deterministic(tmp_path, tiny_demo, capsys):
    _, expected = tiny_demo
    assert main(["demo", "--quick", "--steps", str(STEPS), "--output_dir", str(tmp_path)]) == 0
    assert "| trained at | dial α |" in capsys.readouterr().out
    got = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    for run, ref in zip(got["runs"], expected["runs"]):
        assert run["train_losses"] == ref["train_losses"]
        assert run["sweep"] == ref["sweep"]


def test_cli_parser():
    args = build_parser().parse_args(["demo"])
    assert (args.output_dir, args.quick, args.seed, args.steps) == ("./demo_report", False, 0, None)
    assert main([]) == 1  # no subcommand: prints help
    with pytest.raises(SystemExit):
        main(["no-such-command"])


@pytest.mark.slow
def test_cli_demo_quick(tmp_path):
    assert main(["demo", "--quick", "--output_dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    localist = results["runs"][0]["sweep"]
    assert localist[-1]["block_mass"] == pytest.approx(1.0, abs=1e-5)
    assert all(math.isfinite(r["perplexity"]) for run in results["runs"] for r in run["sweep"])
    assert (tmp_path / "report.md").is_file()
