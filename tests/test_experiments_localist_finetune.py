"""experiments/localist_finetune.py: its data (held-out texts disjoint from training texts, one block per passage)
and its ``--quick`` run on SmolLM2 (every arm trains or is reported pending, dial 1 / restart is block mass 1 and
equals each passage read alone, ratios against the dense fine-tune).

The data folder is built in the shared-data layout (``ag_news/test.csv``, ``tinyshakespeare/input.txt``,
``sst2/dev.tsv``) from the AG News sample bundled with the package, so the test needs nothing outside the repository.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from helpers import PNG_MAGIC, ROOT, load_script

from hf_localist import LocalistConfigError

SAMPLE = Path(ROOT) / "src" / "hf_localist" / "data" / "ag_news_sample.csv"


@pytest.fixture(scope="module")
def script():
    return load_script("experiments/localist_finetune.py", "_experiment_localist_finetune")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    with open(SAMPLE, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    root = tmp_path_factory.mktemp("shared_data")
    (root / "ag_news").mkdir()
    (root / "tinyshakespeare").mkdir()
    (root / "sst2").mkdir()
    with open(root / "ag_news" / "test.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL)
        for r in rows:  # AG News columns: class index 1-4, title, description
            title, _, desc = r["text"].partition(" ")
            writer.writerow([int(r["label"]) + 1, title, desc])
    # Stand-ins for the two other sources: lines / sentences cut from the sample's articles.
    words = " ".join(r["text"] for r in rows[::7]).split()
    lines = [" ".join(words[i: i + 9]) for i in range(0, len(words), 9)]
    (root / "tinyshakespeare" / "input.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "sst2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{x}\t1\n" for x in lines[::-1]),
                                           encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def _passages(seqs) -> set:
    return {tuple(q.input_ids[b:e]) for q in seqs for _, b, e in q.spans}


@pytest.mark.parametrize("layout", ["mixed", "one_text"])
def test_held_out_texts_are_disjoint_from_training(script, data_dir, tokenizer, layout):
    s = script.Settings(steps=6, batch=2, passage_tokens=24, eval_sequences=3, eval_texts=4, train_texts=12)
    data = script.build_data(tokenizer, data_dir, s, layout, seed=0)
    assert len(data["eval"]) == 3 and len(data["train"]) == 12
    assert not _passages(data["eval"]) & _passages(data["train"])
    for q in data["eval"] + data["train"]:
        assert q.input_ids[0] == data["sink"] and q.block_ids[0] == 0
        labels = [label for label, _, _ in q.spans]
        assert len(labels) == s.passages and len(set(labels)) == s.passages  # one block per passage, all distinct
        for label, b, e in q.spans:
            assert 0 < e - b <= s.passage_tokens
            assert set(q.block_ids[b:e]) == {data["labels"].index(label) + 1}
    if layout == "one_text":  # consecutive pieces of one text, block id = position in the sequence
        assert all([label for label, _, _ in q.spans] == data["labels"] for q in data["eval"])
    # The held-out set does not depend on the training seed.
    other = script.build_data(tokenizer, data_dir, s, layout, seed=5)
    assert [q.input_ids for q in other["eval"]] == [q.input_ids for q in data["eval"]]


@pytest.mark.slow
def test_quick_run(script, data_dir, smollm2, tmp_path, capsys):
    docs_page = Path(ROOT) / "docs" / "experiments.md"
    before = docs_page.read_bytes()
    res = script.main(["--quick", "--model", smollm2, "--data_dir", str(data_dir), "--out_dir", str(tmp_path)])
    assert docs_page.read_bytes() == before, "a run without --write_docs must not modify docs/experiments.md"
    assert json.loads((tmp_path / "results.json").read_text())["reference_perplexity"] == res["reference_perplexity"]
    assert (tmp_path / res["figures"][0]).read_bytes()[:8] == PNG_MAGIC
    printed = capsys.readouterr().out
    assert "× dense fine-tune" in printed
    # Every row of the main table has the header's columns (a missing "+" once glued all rows into one cell).
    head = next(line for line in printed.splitlines() if "× dense fine-tune" in line)
    table = printed[printed.index(head):].split("\n\n")[0].splitlines()
    assert len(table) >= 5 and all(line.startswith("| ") and line.count("|") == head.count("|") for line in table)

    pre = res["pretrained"]
    # Dial 1 with restarted positions computes what reading each passage alone computes.
    assert math.isclose(pre["evals"]["uniform dial 1"]["perplexity"]["all"], pre["alone"]["all"], rel_tol=1e-4)
    runs = res["runs"]["0"]
    for arm in ("dense", "uniform", "progressive"):
        assert runs[arm]["status"] == "trained" and len(runs[arm]["losses"]) >= 1
    # Training changed the adapters: the dense fine-tune no longer reads like the pretrained model.
    assert runs["dense"]["evals"]["dial 0"]["perplexity"]["all"] != pre["evals"]["dial 0"]["perplexity"]["all"]
    uniform_evals = runs["uniform"]["evals"]
    uniform = uniform_evals["uniform dial 1"]
    assert uniform["bm_min"] == pytest.approx(1.0, abs=1e-6)  # block mass 1 in every layer
    progressive = runs["progressive"]["evals"]["progressive dial 1"]
    assert progressive["bm_last"] == pytest.approx(1.0, abs=1e-6) and progressive["bm_min"] < 0.999
    assert progressive["layer_alphas"][-1] == 1.0 and progressive["layer_alphas"][0] < 0.1
    # The locality the training ran at: block mass 1 on the diagnostics batch for the uniform arm.
    assert runs["uniform"]["train_locality"][-1]["localist/block_mass"] == pytest.approx(1.0, abs=1e-6)

    rows = {(r["model"], r["evaluated"]): r for r in res["table"]}
    ref = rows[("dense fine-tune", "dial 0")]
    assert ref["ratio"] == 1.0 and res["reference_perplexity"] == ref["perplexity"]
    row = rows[("uniform fine-tune", "uniform dial 1")]
    assert row["ratio"] == pytest.approx(row["perplexity"] / ref["perplexity"])
    assert res["commands"] == ["python experiments/localist_finetune.py --quick --model SMOLLM2_DIR --data_dir DATA"]
    lasso = runs["lasso"]
    if lasso["status"] == "pending":  # the penalty cannot reach a LoRA adapter in this version of the library
        assert "LoRA" in lasso["reason"] and rows[("lasso fine-tune", "uniform dial 1")]["pending"]
    else:
        assert lasso["status"] == "trained" and lasso["penalty_start"] > 0 and math.isfinite(lasso["penalty_end"])

    # --merge adds arms to the results.json in --out_dir and keeps the rest; other settings are refused.
    args = ["--quick", "--model", smollm2, "--data_dir", str(data_dir), "--out_dir", str(tmp_path)]
    merged = script.main(args + ["--arms", "lasso", "--merge"])
    assert merged["arms"] == ["dense", "uniform", "progressive", "lasso"] and len(merged["commands"]) == 2
    assert merged["runs"]["0"]["uniform"]["evals"] == json.loads(json.dumps(uniform_evals))
    assert merged["pretrained"]["alone"] == pre["alone"]
    with pytest.raises(LocalistConfigError, match="other settings"):
        script.main(args + ["--arms", "dense", "--merge", "--lr", "0.5"])
