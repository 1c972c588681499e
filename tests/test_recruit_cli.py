"""``hf-localist recruit`` (cli/recruit.py): recruitment on any CSV, results.json / report.md, and its errors.

The runs are tiny (a few steps, budgets of 2 steps): they check the plumbing and the files, not what is recruited
(docs/recruitment.md reports a full run on the bundled sample).
"""

from __future__ import annotations

import csv
import json
import math

import pytest

from hf_localist import cli
from hf_localist.demo.run import data_path

FAST = ["--steps", "4", "--every", "2", "--budget_steps", "2", "--no_progress"]


def _small_csv(path, n_per_label: int = 15, text="body", label="category") -> str:
    """A CSV with other column names than the bundled one: ``n_per_label`` bundled articles per topic, plus a column
    that is neither text nor label."""
    with open(data_path(), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    seen: dict[str, int] = {}
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", label, text])
        for i, r in enumerate(rows):
            if seen.get(r["topic"], 0) < n_per_label:
                seen[r["topic"]] = seen.get(r["topic"], 0) + 1
                w.writerow([i, r["topic"], r["text"]])
    return str(path)


def _run(capsys, *argv):
    rc = cli.main(["recruit", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _check_results(res: dict, labelled: bool) -> None:
    for key in ("blocks", "mean_purity", "heldout_nll_with_blocks", "heldout_nll_without_blocks", "timeline"):
        assert key in res
    assert math.isfinite(res["heldout_nll_with_blocks"]) and math.isfinite(res["heldout_nll_without_blocks"])
    assert res["timeline"] and all("heldout_nll_before" in t and "blocks_after" in t for t in res["timeline"])
    assert isinstance(res["blocks"], list)
    for b in res["blocks"]:
        assert {"slot", "heldout_tokens", "top_tokens"} <= set(b)
        assert ("purity" in b and "majority_label" in b) == labelled
    if not labelled:
        assert res["mean_purity"] is None
    elif res["blocks"]:
        total = sum(b["heldout_tokens"] for b in res["blocks"])
        weighted = sum(b["purity"] * b["heldout_tokens"] for b in res["blocks"]) / total
        assert res["mean_purity"] == pytest.approx(weighted)
    if not res["blocks"]:  # nothing recruited: the two numbers are of one model
        assert res["heldout_nll_with_blocks"] == pytest.approx(res["heldout_nll_without_blocks"])


def test_recruit_on_a_small_csv_with_labels(tmp_path, capsys):
    data = _small_csv(tmp_path / "news.csv")
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, "--data", data, "--text_column", "body", "--label_column", "category",
                           "--output_dir", str(out), "--max_blocks", "3", *FAST)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    _check_results(res, labelled=True)
    assert res["data"]["labels"] == ["business", "scitech", "sports", "world"]
    assert res["data"]["rows"] == 60 and len(res["timeline"]) == 2  # a pass at steps 2 and 4
    # the defaults: a normal model, rows one after the other, assignment from context, the rest group hidden
    st = res["settings"]
    assert st["freeze_qk"] is False and st["chunk_tokens"] == 0
    assert (st["assign_horizon"], st["assign_min_run"], st["unassigned_visible"]) == (8.0, 4, False)
    assert isinstance(res["proposals"], list) and len(res["proposals"]) == len(res["timeline"])
    report = (out / "report.md").read_text()
    assert "# Recruited blocks" in report and "Held-out NLL" in report and "## Timeline" in report
    assert "held-out NLL" in stdout


def test_recruit_without_labels(tmp_path, capsys):
    data = _small_csv(tmp_path / "plain.csv", text="content")
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "--data", data, "--text_column", "content", "--output_dir", str(out), *FAST,
                      "--assign_horizon", "4", "--unassigned_visible", "false")
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    _check_results(res, labelled=False)
    assert res["data"]["labels"] == [] and res["settings"]["assign_horizon"] == 4.0
    assert res["settings"]["unassigned_visible"] is False


def test_recruit_errors_are_one_line(tmp_path, capsys):
    data = _small_csv(tmp_path / "news.csv")
    out = str(tmp_path / "out")
    rc, _, err = _run(capsys, "--data", data, "--text_column", "text", "--output_dir", out, *FAST)
    assert rc == 2 and err.count("\n") == 1 and "'text'" in err and "body" in err  # names the columns there are
    rc, _, err = _run(capsys, "--data", data, "--text_column", "body", "--label_column", "topic", "--output_dir",
                      out, *FAST)
    assert rc == 2 and "topic" in err and "category" in err
    rc, _, err = _run(capsys, "--data", str(tmp_path / "missing.csv"), "--text_column", "body", "--output_dir", out)
    assert rc == 1 and "no such file" in err
    tiny = _small_csv(tmp_path / "tiny.csv", n_per_label=1)
    rc, _, err = _run(capsys, "--data", tiny, "--text_column", "body", "--output_dir", out, *FAST)
    assert rc == 1 and "needs at least" in err and err.count("\n") == 1
    one_label = tmp_path / "one.csv"
    one_label.write_text("t,l\n" + "".join(f"\"word{i} " + "some text here " * 10 + "\",x\n" for i in range(20)))
    rc, _, err = _run(capsys, "--data", str(one_label), "--text_column", "t", "--label_column", "l", "--output_dir",
                      out, *FAST)
    assert rc == 2 and "at least 2 labels" in err
    rc, _, err = _run(capsys, "--data", data, "--text_column", "body", "--output_dir", out, *FAST,
                      "--assign_horizon", "0.5")
    assert rc == 2 and "assign_horizon" in err
    with pytest.raises(SystemExit) as e:  # a required flag missing: argparse's usage error
        cli.main(["recruit", "--data", data, "--output_dir", out])
    assert e.value.code == 2
    assert not (tmp_path / "out" / "results.json").exists()


def test_recruit_fine_tunes_a_pretrained_model_with_lora(tmp_path, capsys):
    from helpers import build_model, word_tokenizer

    data = _small_csv(tmp_path / "news.csv", n_per_label=10)
    with open(data, newline="", encoding="utf-8") as fh:
        words = sorted({w for row in csv.DictReader(fh) for w in row["body"].split()})
    tokenizer = word_tokenizer(words, specials=("[PAD]", "[BOS]", "[EOS]", "[UNK]"))
    model_dir = tmp_path / "tiny"
    build_model("llama", seed=0, vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "--data", data, "--text_column", "body", "--label_column", "category", "--model",
                      str(model_dir), "--output_dir", str(out), "--max_blocks", "2", *FAST)
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    _check_results(res, labelled=True)
    assert res["model"] == str(model_dir) and 0 < res["trainable_parameters"] < res["model_parameters"]
    assert res["settings"]["first_local_layer"] == 1 and res["settings"]["freeze_qk"] is False  # half of 2 layers
    assert "fine-tuned with LoRA" in (out / "report.md").read_text()
    rc, _, err = _run(capsys, "--data", data, "--text_column", "body", "--model", str(tmp_path / "nothing"),
                      "--output_dir", str(out), *FAST)
    assert rc == 1 and "not a model directory" in err
