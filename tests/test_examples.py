"""The training example runs end to end (tiny settings) and writes its results."""

from __future__ import annotations

import json
import math

import pytest
from helpers import load_script


@pytest.mark.slow
def test_train_localist_example_runs(tmp_path):
    example = load_script("examples/train_localist.py", "train_localist")
    results = example.main([
        "--output_dir", str(tmp_path), "--steps", "4", "--batch_size", "4", "--hidden_size", "32",
        "--num_layers", "2", "--train_articles", "120", "--dial_values", "0,1", "--penalty_lambda", "0.5",
    ])
    assert set(results["runs"]) == {"distributed", "localist"}
    for run in results["runs"].values():
        assert [r["alpha"] for r in run["sweep"]] == [0.0, 1.0]
        assert all(math.isfinite(r["perplexity"]) for r in run["sweep"])
        assert run["sweep"][-1]["block_mass"] == pytest.approx(1.0)  # the hard mask leaves no mass outside
    # The localist run trained with the prox penalty: the callback logged its group statistics.
    assert results["runs"]["localist"]["last_localist_log"]["localist/penalised_groups"] > 0
    for name in ("results.json", "table.md", "dial_sweep.png"):
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "results.json").read_text())["args"]["steps"] == 4


@pytest.mark.slow
def test_rag_block_cache_example_encodes_each_document_once(smollm2, tmp_path):
    example = load_script("examples/rag_block_cache.py", "rag_block_cache")
    args = ["--model", smollm2, "--queries", "2", "--top_k", "3", "--corpus", "40", "--doc_tokens", "48",
            "--max_new_tokens", "4", "--store_dir", str(tmp_path / "kv"), "--output_dir", str(tmp_path / "out")]
    results = example.main(args)
    assert len(results["queries"]) == 2 and (tmp_path / "out" / "results.json").exists()
    assert results["store"]["encoded"] <= 6  # at most top_k new documents per query
    for row in results["queries"]:
        assert row["ttft_cached_s"] > 0 and row["ttft_full_prefill_s"] > 0
    again = example.main(args)  # a second run reads every block from the store directory: nothing is encoded
    assert again["store"]["encoded"] == 0 and again["store"]["disk_hits"] == results["store"]["encoded"]
    assert [r["cached_text"] for r in again["queries"]] == [r["cached_text"] for r in results["queries"]]
