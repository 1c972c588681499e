"""End-to-end smoke tests of three experiment scripts (GitHub issue 6): concentration, threshold, quality_cost.

Each runs its ``--quick`` mode in a temporary ``--out_dir`` (never ``--write_docs``: tests do not touch docs/) and
checks the fields of ``results.json``, that the claims the docs make hold at the quick size, and that every figure
is a valid PNG. quality_cost.py reads ``tinyshakespeare/input.txt`` from ``--data_dir`` (the shared data folder):
here a stand-in dialogue built from the AG News sample bundled with the package, so the tests need nothing outside
the repository.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from helpers import PNG_MAGIC, ROOT, load_script

from hf_localist import LocalistConfigError, LocalistLoadError

SAMPLE = Path(ROOT) / "src" / "hf_localist" / "data" / "ag_news_sample.csv"
SPEAKERS = ("FIRST CITIZEN", "MENENIUS", "CORIOLANUS", "VOLUMNIA", "SICINIUS", "BRUTUS", "COMINIUS", "VIRGILIA",
            "LARTIUS")


def shakespeare_stand_in(root: Path) -> Path:
    """``root/tinyshakespeare/input.txt``: a dialogue in Tiny Shakespeare's format (``NAME:`` then 1-3 lines of
    about 9 words, turns separated by a blank line), ASCII, cut from the bundled AG News sample; returns ``root``."""
    with open(SAMPLE, newline="", encoding="utf-8") as fh:
        text = " ".join(r["text"] for r in csv.DictReader(fh))
    words = text.encode("ascii", "ignore").decode().split()
    turns, i = [], 0
    while i < len(words) and len(turns) < 700:
        n_lines = 1 + len(turns) % 3
        lines = [" ".join(words[i + 9 * j: i + 9 * (j + 1)]) for j in range(n_lines)]
        i += 9 * n_lines
        turns.append(f"{SPEAKERS[(len(turns) * 5) % len(SPEAKERS)]}:\n" + "\n".join(lines) + "\n")
    (root / "tinyshakespeare").mkdir(parents=True, exist_ok=True)
    (root / "tinyshakespeare" / "input.txt").write_text("\n".join(turns), encoding="ascii")
    return root


def _run(name: str, tmp_path: Path, *extra: str) -> tuple[dict, Path]:
    module = load_script(f"experiments/{name}.py", f"_experiment_{name}")
    out = tmp_path / name
    docs_page = Path(ROOT) / "docs" / "experiments.md"
    before = docs_page.read_bytes() if docs_page.exists() else None
    module.main(["--quick", "--out_dir", str(out), "--threads", "1", *extra])
    after = docs_page.read_bytes() if docs_page.exists() else None
    assert before == after, "a --quick run without --write_docs must not modify docs/experiments.md"
    res = json.loads((out / "results.json").read_text())
    assert res["name"] == name and res["quick"] is True
    assert res["figures"], "no figure written"
    for fig in res["figures"]:
        _check_png(out / fig)
    return res, out


def _check_png(path: Path) -> None:
    from PIL import Image

    assert path.exists(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        w, h = img.size
        assert w > 200 and h > 100, (path, img.size)


@pytest.mark.slow
def test_concentration_quick(tmp_path):
    res, _ = _run("concentration", tmp_path)
    c, d = res["controlled"], res["tiny_llama"]
    # Controlled logits: the margin is measured exactly and both bounds hold on every row; ties attain the PF bound.
    assert c["n_rows"] > 1000
    assert c["margin_max_abs_error"] < 1e-9
    assert c["pf_bound_holds"] == 1.0
    assert c["entropy_bound_holds"] == 1.0
    assert c["pf_bound_gap_worst_case_max"] < 1e-9
    assert c["entropy_bound_gap_worst_case_max"] < 1e-9
    bounds = [row["pf_bound_mean"] for row in c["by_delta"]]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:])), "PF bound must grow with delta/tau"
    hb = [row["entropy_bound_mean"] for row in c["by_delta"]]
    assert all(h2 <= h1 + 1e-12 for h1, h2 in zip(hb, hb[1:])), "entropy bound must fall with delta/tau"
    assert c["by_delta"][-1]["pf_mean"] > 0.99 > c["by_delta"][0]["pf_mean"]
    # Tiny Llama across the dial: bounds hold per (query, head); the probe agrees with the recorder.
    assert d["pf_bound_holds"] == 1.0 and d["entropy_bound_holds"] == 1.0
    assert d["recorder_pf_max_abs_gap"] < 1e-5
    assert d["pf_monotone_in_alpha_fraction"] == 1.0
    rows = d["per_alpha"]
    assert [r["alpha"] for r in rows] == d["alphas"] and rows[0]["alpha"] == 0.0 and rows[-1]["alpha"] == 1.0
    for r in rows:
        assert r["n"] > 0
        assert r["library_pf_bound_holds"] == 1.0 and r["library_entropy_bound_holds"] == 1.0
        assert r["pf_mean"] == pytest.approx(r["pf_recorder_mean"], abs=1e-5)
        assert r["pf_mean"] >= r["pf_bound_mean"] and r["entropy_mean"] <= r["entropy_bound_mean"]
    assert rows[-1]["block_mass_recorder_mean"] == pytest.approx(1.0, abs=1e-6)
    assert rows[-1]["pf_mean"] > rows[0]["pf_mean"] + 0.2
    assert rows[-1]["entropy_mean"] < rows[0]["entropy_mean"]
    assert rows[-1]["margin_median"] > rows[0]["margin_median"]


@pytest.mark.slow
def test_threshold_quick(tmp_path):
    res, _ = _run("threshold", tmp_path)
    p = res["predicted"]
    thr = p["threshold_penalised"]
    assert len(thr) == 16  # 2 layers x 4 heads x 2 other blocks
    assert all(math.isfinite(v) and v > 0 for v in thr)
    assert len(p["per_layer"]) == 2 and all(row["tau"] > 0 and row["R_x"] > 0 for row in p["per_layer"])
    sgd = {r["multiplier"]: r for r in res["summary"] if r["optimizer"] == "sgd"}
    low, high = sgd[min(sgd)], sgd[max(sgd)]
    assert min(sgd) < 1.0 < max(sgd)
    # Far above the predicted threshold most off-block groups are exactly zero; far below, few are.
    assert high["zero_fraction"] >= 0.9, high
    assert low["zero_fraction"] <= 0.1, low
    assert high["zero_fraction"] > low["zero_fraction"]
    assert high["off_group_norm_mean"] < low["off_group_norm_mean"]
    assert high["own_group_norm_mean"] > 10 * high["off_group_norm_mean"]  # own-block features survive
    # KKT on a fresh batch for the zero groups: data gradient below lambda (up to batch noise).
    assert high["kkt_ratio_max"] is not None and high["kkt_ratio_max"] <= 1.5
    assert res["empirical"]["max_grad_at_zero"] and len(res["empirical"]["max_grad_at_zero"]) == 16
    assert "sgd" in res["baseline"] and res["reading"]
    # AdamW with the preconditioned proximal step: zeros far above the threshold too (the plain step gave none).
    adamw = {r["multiplier"]: r for r in res["summary"] if r["optimizer"] == "adamw"}
    assert adamw[max(adamw)]["zero_fraction"] >= 0.9, adamw[max(adamw)]
    assert adamw[max(adamw)]["kkt_ratio_max"] is not None and adamw[max(adamw)]["kkt_ratio_max"] <= 1.5


@pytest.mark.slow
def test_quality_cost_quick(tmp_path):
    data_dir = shakespeare_stand_in(tmp_path / "shared_data")
    res, _ = _run("quality_cost", tmp_path, "--data_dir", str(data_dir))
    assert res["data"]["source"] == "tinyshakespeare/input.txt"
    table = res["table"]
    by = {(r["model"], r["evaluated"]): r for r in table}
    base = by[("distributed", "dial 0")]
    assert base["perplexity"] == res["baseline_perplexity"]
    vocab = res["data"]["vocab"]
    for r in table:
        assert 1.0 < r["perplexity"] < 2 * vocab, r  # a model that learned anything beats 2x uniform
        assert math.isclose(r["perplexity"], math.exp(r["nll"]), rel_tol=1e-9)
    assert len(table) == 1 + 5 + 3
    # Block mass 1 wherever the dial is 1 (by construction); below 1 for the distributed model at dial 0.
    for name in ("uniform", "late", "progressive"):
        assert by[(name, "own setting")]["bm_last"] == pytest.approx(1.0, abs=1e-6)
    assert by[("uniform", "own setting")]["bm_local_mean"] == pytest.approx(1.0, abs=1e-6)
    assert by[("late", "own setting")]["layer_alphas"] == [0.0, 0.0, 1.0, 1.0]
    assert base["bm_all_mean"] < 0.99
    prog = by[("progressive", "own setting")]["layer_alphas"]
    assert prog == sorted(prog) and prog[-1] == 1.0 and prog[0] < 0.1
    # The anchor bonus raises pointer fidelity.
    for sweep in res["beta_sweep"].values():
        pf = [r["pf_last"] for r in sweep]
        assert pf[-1] > pf[0] + 0.3
    assert set(res["ratios"]) and res["reading"]


def test_quality_cost_needs_its_data(tmp_path):
    module = load_script("experiments/quality_cost.py", "_experiment_quality_cost")
    with pytest.raises(LocalistConfigError, match="--data_dir is required"):
        module.main(["--quick", "--out_dir", str(tmp_path / "out")])
    with pytest.raises(LocalistLoadError, match="tinyshakespeare/input.txt"):
        module.main(["--quick", "--out_dir", str(tmp_path / "out"), "--data_dir", str(tmp_path / "nowhere")])
