"""The demo end to end (tiny training budget), its data, and the ``hf-localist`` command line."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch
from helpers import PNG_MAGIC

from hf_localist import LocalistConfig, add_block_tokens
from hf_localist.blocks.ids import segment_block_ids
from hf_localist.cli import build_parser, main
from hf_localist.demo.recruit import describe_recruited, plain_sequence
from hf_localist.demo.run import (
    DIAL_VALUES,
    MASS_DIAL_VALUES,
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
    results = run_demo(out, quick=True, seed=0, steps=STEPS, print_table=False, progress=False)
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
    assert on_disk["runs"][0]["backend_counts"].get("segment", 0) > 0, \
        "alpha=1 training did not use the segment backend"
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


def test_attention_mass_rows_are_distributions_and_follow_the_dial(tiny_demo):
    _, results = tiny_demo
    mass = results["attention_mass"]
    assert [p["alpha"] for p in mass["by_alpha"]] == list(MASS_DIAL_VALUES)
    diagonals = []
    for panel in mass["by_alpha"]:
        matrix = panel["matrix"]
        assert len(matrix) == len(TOPICS) and all(len(row) == len(TOPICS) for row in matrix)
        for row, n in zip(matrix, panel["queries"]):
            assert n > 0 and sum(row) == pytest.approx(1.0, abs=1e-3) and min(row) >= 0.0
        diagonals.append(sum(matrix[i][i] for i in range(len(TOPICS))) / len(TOPICS))
    assert diagonals[-1] == pytest.approx(1.0, abs=1e-3)  # hard mask: nothing reaches the other articles
    assert all(b >= a - 1e-6 for a, b in zip(diagonals, diagonals[1:])), diagonals
    # the diagonal is the block mass BM_t of the sweep (same model, same queries, same sink rule)
    sweep = {row["alpha"]: row["block_mass"] for row in results["runs"][1]["sweep"]}
    assert diagonals[0] < 1.0 and sweep[0.0] < 1.0


def test_recruitment_section_is_consistent(tiny_demo):
    _, results = tiny_demo
    rec = results["recruitment"]
    theta = rec["recruitment_config"]["theta_block"]
    assert rec["passes"] == len(rec["timeline"]) == 2  # every STEPS steps, 2 * STEPS steps
    assert [t["step"] for t in rec["timeline"]] == [STEPS, 2 * STEPS]
    assert rec["settings"]["max_blocks"] >= 4 and rec["timeline"][0]["blocks_before"] == 0
    # a normal model (issue: the demo recruits on learnable Q/K), assigning from context, the rest group hidden
    assert rec["settings"]["freeze_qk"] is False and rec["trainable_parameters"] == rec["model_parameters"]
    assert rec["settings"]["assign_horizon"] > 1 and rec["settings"]["unassigned_visible"] is False
    for t in rec["timeline"]:
        assert t["blocks_after"] - t["blocks_before"] == t["accepted"]
        assert math.isfinite(t["heldout_nll_before"]) and math.isfinite(t["heldout_nll_after"])
    assert rec["n_blocks"] == rec["timeline"][-1]["blocks_after"] == len(rec["blocks"])
    patience = rec["recruitment_config"]["patience"]
    assert rec["stop_reason"] in ("pass_accepted_nothing", "training_ended", "no_free_slot", "p_max_reached")
    if rec["stop_reason"] == "pass_accepted_nothing":
        assert all(t["accepted"] == 0 for t in rec["timeline"][-patience:])
    scored = [d for d in rec["decisions"] if d["dL_total"] is not None]
    assert scored, "no proposal was scored"
    for d in scored:
        assert d["dL_total"] == pytest.approx(d["dL_data"] + d["dL_model"])
        assert d["dL_model"] > 0
        if d["reason"] in ("accepted", "no_gain"):
            assert d["accepted"] == (d["dL_total"] <= -theta)
    for rows in [rec["blocks"], rec["proposals"]]:
        for b in rows:
            assert sum(b["topic_counts"]) == b["tokens"]
            assert b["tokens"] == 0 or 0.25 - 1e-9 <= b["purity"] <= 1.0
            assert all(isinstance(t["token"], str) and t["lift"] > 1 for t in b["top_tokens"])
    # every scanned proposal is one of the pass's decisions
    for rows in rec["proposals_by_pass"]:
        for b in rows:
            assert any(d["step"] == b["step"] and d["cluster"] == b["cluster"] for d in rec["decisions"])
    assert 0.0 <= rec["coverage"] <= 1.0


def test_describe_recruited_purity_and_top_tokens():
    class Tok:
        def convert_ids_to_tokens(self, i):
            return f"w{i}"

    # block 1: 6 tokens of topic 0 and 2 of topic 1; token 7 only occurs in block 1; block 2: topic 2 only
    assign = [(7, 0, 1)] * 4 + [(8, 0, 1)] * 2 + [(8, 1, 1)] * 2 + [(9, 2, 2)] * 3 + [(8, 3, 0)] * 5
    rows = describe_recruited(assign, [1, 2], Tok(), 4, top=5, min_count=2)
    assert rows[0]["tokens"] == 8 and rows[0]["topic_counts"] == [6, 2, 0, 0]
    assert rows[0]["majority_topic"] == 0 and rows[0]["purity"] == pytest.approx(0.75)
    assert [t["token"] for t in rows[0]["top_tokens"]] == ["w7"]  # w8 is no more frequent in block 1 than overall
    assert rows[0]["top_tokens"][0]["in_block"] == 1.0
    assert rows[1]["purity"] == 1.0 and rows[1]["share_of_tokens"] == pytest.approx(3 / 16)


def test_ticker_layout_keeps_each_article_in_order():
    import random

    parts = [(0, [10, 11, 12, 13, 14]), (2, [20, 21, 22]), (3, [30, 31, 32, 33])]
    ids, topics = plain_sequence(parts, 2, chunk=2, rng=random.Random(0))
    assert ids[0] == 2 and topics[0] == -1 and len(ids) == 13
    for topic, x in parts:
        assert [i for i, t in zip(ids, topics) if t == topic] == x
    assert plain_sequence(parts, 2) == ([2] + [i for _, x in parts for i in x], [-1] + [t for t, x in parts for _ in x])


def test_routing_section_is_consistent(tiny_demo):
    _, results = tiny_demo
    route = results["routing"]
    modes = [row["mode"] for row in route["rows"]]
    assert modes == ["base alone", "all-topic fine-tune (control)", "hard", "soft", "top-2", "oracle (true topic)"]
    for row in route["rows"]:
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1.0
        if "routing_accuracy" in row:
            assert 0.0 <= row["routing_accuracy"] <= 1.0 and 0.0 <= row["mean_pi_true"] <= 1.0
            assert 0.0 <= row["mean_H_domain"] <= math.log(len(TOPICS)) + 1e-6
    confusion = route["confusion"]
    assert [sum(row) for row in confusion] == [25] * len(TOPICS)  # the held-out articles of each topic
    assert sum(map(sum, confusion)) == route["test_articles"] == results["data"]["test_articles"]
    assert route["routing_accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(len(TOPICS))) / 100)


def test_figures_are_pngs_and_in_the_report(tiny_demo):
    out, results = tiny_demo
    report = (out / "report.md").read_text(encoding="utf-8")
    figures = results["figures"]
    assert {"attention_mass", "dial", "recruitment", "confusion"} <= set(figures)
    for name in figures.values():
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        assert f"]({name})" in report
    for section in ("## 1. The dial", "## 2. Recruiting blocks from none", "## 3. Routing between specialists"):
        assert section in report
    on_disk = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert set(on_disk["part_times_s"]) == {"dial", "recruit", "route", "figures"}


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_demo_is_deterministic(tmp_path, tiny_demo, capsys):
    _, expected = tiny_demo
    assert main(["demo", "--quick", "--steps", str(STEPS), "--no_progress", "--output_dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| trained at | dial α |" in printed and "| routing | held-out perplexity |" in printed
    got = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    for run, ref in zip(got["runs"], expected["runs"]):
        assert run["train_losses"] == ref["train_losses"]
        assert run["sweep"] == ref["sweep"]
    assert got["attention_mass"] == expected["attention_mass"]
    for key in ("train_losses", "decisions", "proposals"):
        assert got["recruitment"][key] == expected["recruitment"][key]
    assert got["routing"]["rows"] == expected["routing"]["rows"]
    assert got["routing"]["confusion"] == expected["routing"]["confusion"]


def test_cli_parser():
    args = build_parser().parse_args(["demo"])
    assert (args.output_dir, args.quick, args.seed, args.steps, args.no_progress) == ("./demo_report", False, 0, None,
                                                                                      False)
    args = build_parser().parse_args(["demo", "--quick", "--no_progress", "--output-dir", "/tmp/x", "--threads", "2"])
    assert (args.quick, args.no_progress, args.output_dir, args.threads) == (True, True, "/tmp/x", 2)
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
    assert results["routing"]["routing_accuracy"] > 0.3  # 4 topics: chance is 0.25
