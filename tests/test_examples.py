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
