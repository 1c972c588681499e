"""Recruitment experiments on real text and the K = 2 termination run (``--quick`` sizes unless said otherwise).

Each runs in a temporary ``--out_dir`` without ``--write_docs`` (docs are never touched here). Real text comes from
the bundled AG News sample, written in the shared-data layout into a temporary ``--data_dir`` where a script needs it.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
from helpers import load_script

from hf_localist import LocalistConfigError, LocalistLoadError
from hf_localist.demo.run import data_path

TOPICS = ("world", "sports", "business", "scitech")


def _load(name: str):
    return load_script(f"experiments/{name}.py", f"experiment_{name}")


def _shared_layout(root, rows: int = 200):
    """``root/ag_news/train_sample_5k.csv`` (``text,label`` without header) from the bundled sample."""
    with open(data_path(), newline="", encoding="utf-8") as fh:
        sample = list(csv.DictReader(fh))[:rows]
    (root / "ag_news").mkdir(parents=True)
    with open(root / "ag_news" / "train_sample_5k.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([(r["text"], TOPICS.index(r["topic"])) for r in sample])
    return root


@pytest.mark.slow
def test_recruitment_real_text_quick(tmp_path):
    results = _load("recruitment_real_text").main(["--quick", "--arms", "normal_context", "--out_dir",
                                                    str(tmp_path), "--rows", "400"])
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["name"] == "recruitment_real_text" and r["quick"] is True and r["reading"]
    (run,) = r["runs"]
    assert run["arm"] == "normal_context" and run["settings"]["unassigned_visible"] is False
    assert run["passes"] == len(run["timeline"]) >= 1
    for p in run["proposals"]:
        assert p["heldout_tokens"] == 0 or 0.25 - 1e-9 <= p["purity"] <= 1.0
    for d in run["decisions"]:
        if d["dL_total"] is not None:
            assert d["dL_total"] == pytest.approx(d["dL_data"] + d["dL_model"])
            assert d["accepted"] == (d["reason"] == "accepted")
    assert math.isfinite(run["nll_with"]) and math.isfinite(run["nll_without"])
    if not run["blocks"]:  # no block: disabling none changes nothing
        assert run["nll_with"] == run["nll_without"] and run["mean_purity"] is None
    assert results["runs"][0]["arm"] == "normal_context"


def test_recruitment_real_text_errors(tmp_path):
    mod = _load("recruitment_real_text")
    with pytest.raises(LocalistConfigError, match="--model"):
        mod.main(["--quick", "--arms", "smollm2_lora_context", "--out_dir", str(tmp_path)])
    with pytest.raises(LocalistLoadError, match="train_sample_5k"):
        mod.main(["--quick", "--arms", "normal_token", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path)])


@pytest.mark.slow
def test_topic_features_probe_on_smollm2(tmp_path, smollm2):
    data = _shared_layout(tmp_path / "data")
    results = _load("topic_features").main(["--quick", "--model", smollm2, "--data_dir", str(data), "--layers", "2",
                                            "25", "--horizons", "1", "8", "--ks", "4", "--out_dir",
                                            str(tmp_path / "out")])
    rows = results["rows"]
    assert [(r["layer"], r["horizon"], r["k"]) for r in rows] == [(2, 1, 4), (2, 8, 4), (25, 1, 4), (25, 8, 4)]
    for r in rows:  # k = 4 nearest-centroid clusters of 4 topics: purity is at least the largest topic's share
        assert 0.25 - 1e-9 <= r["purity"] <= 1.0
    assert results["best"]["purity"] == max(r["purity"] for r in rows)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["best"] == results["best"]


@pytest.mark.slow
def test_termination_k2_recruits_two_blocks_from_context(tmp_path):
    """docs/recruitment.md: with the rest group hidden and assignment over ~2 positions, K = 2 recruits 2 blocks."""
    results = _load("recruitment_termination").main(["--ks", "2", "--hide_unassigned", "--assign_horizon", "2",
                                                      "--out_dir", str(tmp_path)])
    (run,) = results["runs"]
    assert run["final_blocks"] == 2 and run["clusters_covered"] == 2
    assert min(run["purity"]) > 0.9
    assert run["heldout_nll_final"] < run["heldout_nll_before_recruitment"]


@pytest.mark.slow
def test_locality_pretrained_quick(tmp_path, smollm2):
    """experiments/locality_pretrained.py on SmolLM2 (4 steps per arm): the per-head measurement reproduces the
    recorder, and the prox arm's groups are exactly zero where the step says so."""
    with open(data_path(), newline="", encoding="utf-8") as fh:
        sample = list(csv.DictReader(fh))
    (tmp_path / "data" / "ag_news").mkdir(parents=True)
    with open(tmp_path / "data" / "ag_news" / "test.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([(TOPICS.index(r["topic"]) + 1, r["text"][:40], r["text"][40:]) for r in sample])
    results = _load("locality_pretrained").main(["--quick", "--model", smollm2, "--data_dir", str(tmp_path / "data"),
                                                 "--out_dir", str(tmp_path / "out")])
    none, prox = results["runs"]
    assert none["multiplier"] is None and "zero_fraction" not in none and prox["multiplier"] == 1.0
    for run in (none, prox):
        assert run["recorder_gap"] < 1e-5 and math.isfinite(run["loss"])
        assert all(0.0 <= v <= 1.0 for v in run["mean"].values())
    assert 0.0 <= prox["zero_fraction"] <= 1.0 and prox["penalised_groups"] > 0
    assert len(none["layers"]) == 30  # every layer of SmolLM2 measured


def test_locality_pretrained_source_blocks(tmp_path, smollm2):
    """``--blocks source``: passages of 4 sources (AG News split in two, Shakespeare, SST-2), each >= 20 tokens;
    a data folder without the Shakespeare / SST-2 files is a clear error naming them."""
    from transformers import AutoTokenizer

    script = _load("locality_pretrained")
    tok = AutoTokenizer.from_pretrained(smollm2)
    root = tmp_path / "data"
    (root / "ag_news").mkdir(parents=True)
    with open(data_path(), newline="", encoding="utf-8") as fh:
        sample = list(csv.DictReader(fh))
    with open(root / "ag_news" / "test.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([(TOPICS.index(r["topic"]) + 1, r["text"][:40], r["text"][40:]) for r in sample])
    with pytest.raises(LocalistLoadError, match="input.txt"):
        script.load_sources(root, tok)
    (root / "tinyshakespeare").mkdir()
    (root / "sst2").mkdir()
    verse = "First Citizen:\nBefore we proceed any further, hear me speak, for we are all resolved rather to die."
    (root / "tinyshakespeare" / "input.txt").write_text("\n\n".join([verse] * 5 + ["Short."]), encoding="utf-8")
    review = "a charming and often affecting journey through the streets of the old city"
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + f"{review}\t1\n" * 9, encoding="utf-8")
    passages = script.load_sources(root, tok)
    counts = {b: sum(1 for k, _ in passages if k == b) for b in range(4)}
    assert counts[2] == 5 and counts[3] == 3 and counts[0] + counts[1] > 0  # "Short." is under 20 tokens
    assert all(20 <= len(x) <= script.MAX_ARTICLE for _, x in passages)
