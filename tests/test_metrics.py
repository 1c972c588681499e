"""The shipped ``evaluate`` metric modules: values against hand computation, offline loading by path."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from hf_localist import metrics
from hf_localist.errors import LocalistConfigError


@pytest.fixture(scope="module")
def loaded():
    return {name: metrics.load(name) for name in metrics.METRIC_NAMES}


ROWS = [[0.4, 0.3, 0.2, 0.1], [0.5, 0.25, 0.25], [1.0, 0.0]]


def test_paths_are_module_directories():
    for name in metrics.METRIC_NAMES:
        assert os.path.isfile(os.path.join(metrics.path(name), f"{name}.py"))
    with pytest.raises(LocalistConfigError, match="not one of"):
        metrics.path("accuracy")


def test_attention_entropy_by_hand(loaded):
    out = loaded["attention_entropy"].compute(predictions=ROWS)  # sink_index=0: drop key 0, renormalise
    q = [0.5, 1 / 3, 1 / 6]
    h0 = -sum(p * math.log(p) for p in q)
    h1 = math.log(2)
    # Row 3 has all its mass on the sink: undefined, skipped.
    assert out["num_queries"] == 2
    assert out["attention_entropy"] == pytest.approx((h0 + h1) / 2, rel=1e-12)
    keep_all = loaded["attention_entropy"].compute(predictions=[[0.5, 0.5]], sink_index=None)
    assert keep_all == {"attention_entropy": pytest.approx(math.log(2)), "num_queries": 1}


def test_pointer_fidelity_and_block_mass_by_hand(loaded):
    anchors = [[False, True, False, False], [False, False, True], [False, True]]
    blocks = [[False, True, True, False], [False, True, True], [False, True]]
    pf = loaded["pointer_fidelity"].compute(predictions=ROWS, references=anchors)
    bm = loaded["block_mass"].compute(predictions=ROWS, references=blocks)
    assert pf["num_queries"] == bm["num_queries"] == 2
    assert pf["pointer_fidelity"] == pytest.approx((0.3 / 0.6 + 0.25 / 0.5) / 2, rel=1e-12)
    assert bm["block_mass"] == pytest.approx((0.5 / 0.6 + 1.0) / 2, rel=1e-12)
    # The sink may be any key; None keeps it.
    assert loaded["pointer_fidelity"].compute(predictions=[[0.2, 0.8]], references=[[True, False]],
                                              sink_index=None)["pointer_fidelity"] == pytest.approx(0.2)
    assert loaded["pointer_fidelity"].compute(predictions=[[0.2, 0.3, 0.5]], references=[[True, False, False]],
                                              sink_index=-1)["pointer_fidelity"] == pytest.approx(0.4)


def test_add_batch_accumulates(loaded):
    metric = loaded["block_mass"]
    metric.add_batch(predictions=ROWS[:1], references=[[False, True, True, False]])
    metric.add_batch(predictions=ROWS[1:2], references=[[False, True, True]])
    assert metric.compute()["block_mass"] == pytest.approx((0.5 / 0.6 + 1.0) / 2)


def test_bad_inputs_name_the_problem(loaded):
    with pytest.raises(LocalistConfigError, match="references\\[0\\] has 2 entries"):
        loaded["pointer_fidelity"].compute(predictions=[[0.5, 0.3, 0.2]], references=[[True, False]])
    with pytest.raises(LocalistConfigError, match="sink_index=5"):
        loaded["attention_entropy"].compute(predictions=[[0.5, 0.5]], sink_index=5)


def test_matches_the_recorder():
    """The metric modules and DiagnosticsRecorder agree on one attention matrix."""
    import torch

    from hf_localist.attention.recorder import DiagnosticsRecorder

    torch.manual_seed(0)
    T = 6
    logits = torch.randn(1, 1, T, T).masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -math.inf)
    probs = logits.softmax(-1)
    blocks = torch.tensor([[0, 1, 1, 2, 2, 2]])
    anchor = torch.tensor([[False, True, False, True, False, False]])
    sink = torch.tensor([[True] + [False] * (T - 1)])
    rec = DiagnosticsRecorder()
    rec.record(0, probs, blocks, blocks, blocks, anchor, sink, torch.ones(1, T, dtype=torch.bool))
    rows = [probs[0, 0, t, : t + 1].tolist() for t in range(1, T)]
    in_block = [[bool(blocks[0, s] == blocks[0, t]) for s in range(t + 1)] for t in range(1, T)]
    is_anchor = [[bool(blocks[0, s] == blocks[0, t] and anchor[0, s]) for s in range(t + 1)] for t in range(1, T)]
    ent = metrics.load("attention_entropy").compute(predictions=rows)
    pf = metrics.load("pointer_fidelity").compute(predictions=rows, references=is_anchor)
    bm = metrics.load("block_mass").compute(predictions=rows, references=in_block)
    assert ent["attention_entropy"] == pytest.approx(float(rec.values(0, "entropy").mean()), abs=1e-5)
    assert pf["pointer_fidelity"] == pytest.approx(float(rec.values(0, "pointer_fidelity").mean()), abs=1e-5)
    assert bm["block_mass"] == pytest.approx(float(rec.values(0, "block_mass").mean()), abs=1e-5)


def test_evaluate_load_by_path_offline(tmp_path):
    code = (
        "import evaluate\n"
        "from hf_localist import metrics\n"
        "m = evaluate.load(metrics.path('pointer_fidelity'))\n"
        "print(m.compute(predictions=[[0.5, 0.3, 0.2]], references=[[False, True, False]]))\n"
        "m = evaluate.load(metrics.path('attention_entropy') + '/attention_entropy.py')\n"
        "print(round(m.compute(predictions=[[0.5, 0.5]], sink_index=None)['attention_entropy'], 6))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}  # an empty cache: nothing can come from a previous download
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["{'pointer_fidelity': 0.6, 'num_queries': 1}", "0.693147"]
