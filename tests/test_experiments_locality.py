"""Smoke test of experiments/locality_adamw.py (issue 12 item 2): own-block mass and PF at dial 0 against lambda.

Runs ``--quick`` (the interleaved copy task with block embeddings, and AG News, each without penalty and at the
calibrated threshold) in a temporary ``--out_dir`` and checks the measurements the docs rely on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import PNG_MAGIC, ROOT, load_script


@pytest.mark.slow
def test_locality_adamw_quick(tmp_path):
    module = load_script("experiments/locality_adamw.py", "_experiment_locality_adamw")
    out = tmp_path / "locality"
    docs_page = Path(ROOT) / "docs" / "experiments.md"
    before = docs_page.read_bytes() if docs_page.exists() else None
    module.main(["--quick", "--out_dir", str(out), "--threads", "1"])
    assert (docs_page.read_bytes() if docs_page.exists() else None) == before, "--quick must not touch the docs"
    res = json.loads((out / "results.json").read_text())
    assert res["name"] == "locality_adamw" and res["quick"] is True
    for fig in res["figures"]:
        assert (out / fig).read_bytes()[:8] == PNG_MAGIC
    # The per-head values, averaged over the heads, are the recorder's own per-query values.
    assert res["recorder_gap_max"] < 1e-5
    rows = {(r["setting"], r["multiplier"]): r for r in res["summary"]}
    assert set(rows) == {("copy/block", None), ("copy/block", 1.0), ("agnews/random", None), ("agnews/random", 1.0)}
    for (setting, m), r in rows.items():
        assert r["zero_fraction"] is None if m is None else 0.0 <= r["zero_fraction"] <= 1.0
        for layer in ("0", "1"):
            row = r["layers"][layer]
            for key in ("bm_all", "bm_own", "bm_other", "pf_all", "pf_own", "bm_uniform"):
                assert 0.0 <= row[key] <= 1.0, (setting, m, layer, key, row[key])
            # All heads = 2 owning heads and 6 others (8 heads, 4 blocks): the all-heads mean lies between.
            lo, hi = sorted((row["bm_own"], row["bm_other"]))
            assert lo - 1e-6 <= row["bm_all"] <= hi + 1e-6
    penalised = rows[("copy/block", 1.0)]
    # Block embeddings put each block's layer-0 inputs in its own coordinate group; random ones do not.
    assert penalised["layers"]["0"]["own_subspace_energy"] > 0.9
    assert rows[("agnews/random", None)]["layers"]["0"]["own_subspace_energy"] < 0.4
    # At the calibrated threshold the AdamW-aware prox zeroes the off-block groups of the copy model...
    assert penalised["zero_fraction"] >= 0.9 and penalised["off_group_norm"] < 1e-3 * penalised["own_group_norm"]
    # ...and the heads that do not own a query's block cannot read it: at layer 0 (inputs = embeddings) they give
    # that query the block mass of uniform attention.
    layer0 = penalised["layers"]["0"]
    assert abs(layer0["bm_other"] - layer0["bm_uniform"]) < 0.02
    assert res["reading"] and "copy/block" in (out / "results.json").read_text()
