"""The recruitment-termination and routing-fidelity experiments run end to end (``--quick``) and write sane results.

Each runs in a temporary ``--out_dir`` without ``--write_docs`` (docs/experiments.md is never touched here).
routing_fidelity.py runs on the bundled test split only (no ``--data_dir``, so no official AG News test articles).
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import PNG_MAGIC, load_script

from hf_localist import LocalistLoadError


def _load(name: str):
    return load_script(f"experiments/{name}.py", f"experiment_{name}")


def _check_outputs(out, results: dict) -> dict:
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["name"] == results["name"] and on_disk["quick"] is True
    assert on_disk["figures"] and on_disk["reading"]
    for name in on_disk["figures"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name
    return on_disk


@pytest.mark.slow
def test_recruitment_termination_quick(tmp_path):
    results = _load("recruitment_termination").main(["--quick", "--out_dir", str(tmp_path)])
    r = _check_outputs(tmp_path, results)
    assert [run["K"] for run in r["runs"]] == r["settings"]["ks"]
    from hf_localist.theory import p_max

    for run in r["runs"] + r["limit_runs"]:
        assert run["p_max"] == p_max(64, 0.0, run["theta_H"])
        assert 0 <= run["final_blocks"] <= min(run["p_max"], run["max_blocks"])
        assert len(run["purity"]) == run["final_blocks"]
        assert all(0.0 <= p <= 1.0 for p in run["purity"] if not math.isnan(p))
        assert 0 <= run["clusters_covered"] <= min(run["K"], run["final_blocks"])
        assert run["stop_reason"] in {"pass_accepted_nothing", "3_passes_accepted_nothing", "no_free_slot",
                                      "p_max_reached", "still_running_at_end"}
        assert run["passes"] >= 1
        # The block count never decreases over training, and matches the accepted decisions.
        counts = [row["blocks"] for row in run["timeline"]]
        assert counts == sorted(counts) and counts[-1] == run["final_blocks"]
        assert sum(d["accepted"] for d in run["decisions"]) == run["final_blocks"]
        assert all(d["dL_total"] <= -run["theta_block"] for d in run["decisions"] if d["accepted"])
        for key in ("heldout_nll_initial", "heldout_nll_before_recruitment", "heldout_nll_final"):
            assert math.isfinite(run[key]) and run[key] > 0
    # theta_block = 0 with a bound below K: recruitment stops at the bound.
    for run in r["limit_runs"]:
        bound = min(run["p_max"], run["max_blocks"])
        assert bound < run["K"] and run["final_blocks"] <= bound
        if run["stop_reason"] in {"p_max_reached", "no_free_slot"}:
            assert run["final_blocks"] == bound


@pytest.mark.slow
def test_routing_fidelity_quick(tmp_path):
    results = _load("routing_fidelity").main(["--quick", "--out_dir", str(tmp_path)])
    r = _check_outputs(tmp_path, results)
    assert r["data"]["test_sources"] == {"bundled test split": r["data"]["test_articles"]}
    assert r["data"]["official_test_option"] is None
    rows = {row["mode"]: row for row in r["rows"]}
    assert list(rows) == ["base alone", "hard", "soft", "top-2", "oracle"]
    for row in rows.values():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert len(row["per_topic_perplexity"]) == 4
    labels, argmax, probs = r["labels"], r["router_argmax"], r["router_probs"]
    assert len(labels) == len(argmax) == len(probs) == r["data"]["test_articles"]
    # Hard routing accuracy is the share of articles whose router argmax is their topic.
    matches = sum(a == y for a, y in zip(argmax, labels)) / len(labels)
    assert rows["hard"]["routing_accuracy"] == pytest.approx(matches)
    assert r["routing_accuracy"] == pytest.approx(matches)
    assert all(a == max(range(4), key=lambda m: p[m]) for a, p in zip(argmax, probs))
    confusion = r["confusion"]
    assert sum(map(sum, confusion)) == len(labels)
    assert sum(confusion[t][t] for t in range(4)) / len(labels) == pytest.approx(matches)
    # The headline perplexities came from LocalistRouterModel.forward, and match the per-token mixtures.
    for mode in ("hard", "soft", "top-2", "oracle"):
        assert rows[mode]["perplexity"] == pytest.approx(r["forward_perplexity"][mode])
    # Hard and oracle routes: one specialist per prediction; mixtures spread the weight.
    assert rows["hard"]["attribution"] == pytest.approx(1.0) and rows["oracle"]["attribution"] == pytest.approx(1.0)
    assert 0.25 - 1e-6 <= rows["soft"]["attribution"] <= rows["top-2"]["attribution"] + 1e-6
    assert rows["top-2"]["attribution"] >= 0.5 - 1e-6
    assert rows["oracle"]["weight_on_true_topic"] == pytest.approx(1.0)
    assert rows["hard"]["weight_on_true_topic"] == pytest.approx(matches)
    for row in list(rows.values())[1:]:
        assert 0.0 <= row["locality_block_mass"] <= 1.0 + 1e-6
        assert 0.0 <= row["locality_pointer_fidelity"] <= 1.0 + 1e-6
        assert 0.0 <= row["locality_coverage"] <= 1.0
        assert 0.0 <= row["locality_entropy"] <= math.log(65)
    for t in range(4):
        for m in range(4):
            assert 0.0 <= r["locality_matrix"]["block_mass"][t][m] <= 1.0 + 1e-6
    # Temperature: hard routing does not depend on it; colder routers put more weight on their argmax.
    sweep = r["temperature_sweep"]
    assert len({round(e["perplexity_hard"], 6) for e in sweep}) == 1
    assert all(a["mean_pi_max"] >= b["mean_pi_max"] - 1e-6 for a, b in zip(sweep, sweep[1:]))
    assert all(0.0 <= e["mean_H_domain"] <= math.log(4) + 1e-6 for e in sweep)



def test_routing_fidelity_refuses_a_missing_data_dir(tmp_path):
    script = _load("routing_fidelity")
    with pytest.raises(LocalistLoadError, match="ag_news/test.csv"):
        script.main(["--quick", "--out_dir", str(tmp_path), "--data_dir", str(tmp_path / "nowhere")])
    with pytest.raises(LocalistLoadError, match="--test_csv"):
        script.main(["--quick", "--out_dir", str(tmp_path), "--test_csv", str(tmp_path / "missing.csv")])
