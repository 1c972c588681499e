"""``hf-localist recruit``: recruit blocks on the text of any CSV file and report what they are.

The run is the recruitment part of ``hf-localist demo`` (:func:`hf_localist.demo.recruit.run_recruitment`) on
the user's text: sequences of 2-4 rows, one after the other without anchors, a tiny Llama trained from scratch on
them (word-level tokenizer built from the text; a normal model: learnable Q and K) with a recruitment pass every
``--every`` steps; tokens join blocks from context (running mean, minimum run) and blocks do not see unassigned
tokens, unless the flags say otherwise. Rows are split into training and held-out text (per label when
``--label_column`` is given); every number in the report is measured on the held-out rows. Writes
``results.json`` and ``report.md`` to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
from dataclasses import asdict, replace
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..demo.passages import sink_token_id
from ..demo.recruit import RecruitSettings, run_recruitment
from ..demo.run import Article, build_tokenizer, encode_articles
from ..errors import LocalistConfigError, LocalistLoadError
from ..utils import atomic_write_text
from .base import Command, UsageError, check_output_dir, positive_int
from .models import add_localist_config_arguments, localist_overrides

#: The least text a run needs: rows with text, and words in them.
MIN_ROWS, MIN_WORDS = 8, 200
#: LocalistConfig fields the command exposes (they are RecruitSettings fields of the same name too).
CONFIG_FLAGS = ("first_local_layer", "assign_threshold", "assign_horizon", "assign_min_run", "unassigned_visible")


def read_text_csv(path: str, text_column: str, label_column: str | None) -> tuple[list[str], list[str] | None]:
    """The non-empty texts of ``text_column`` (and their labels, as strings) of a CSV file with a header row.

    Rows whose text (or label, with a label column) is empty are skipped. Raises ``LocalistLoadError`` when the file
    cannot be read as CSV, ``LocalistConfigError`` when a named column is missing (naming the columns there are).
    """
    if not os.path.isfile(path):
        raise LocalistLoadError(f"--data {path!r}: no such file; pass a CSV file with a header row")
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            missing = [c for c in (text_column, label_column) if c is not None and c not in columns]
            if not columns:
                raise LocalistLoadError(f"--data {path!r} is empty: pass a CSV file with a header row")
            if missing:
                raise LocalistConfigError(
                    f"--data {path!r} has no column(s) {missing}; its columns are {columns}: pass --text_column "
                    "(and --label_column) naming columns of the file")
            texts, labels = [], []
            for row in reader:
                text = " ".join(str(row.get(text_column) or "").split())
                label = str(row.get(label_column) or "").strip() if label_column is not None else ""
                if text and (label_column is None or label):
                    texts.append(text)
                    labels.append(label)
    except (UnicodeDecodeError, csv.Error) as e:
        raise LocalistLoadError(f"--data {path!r} cannot be read as a UTF-8 CSV file ({type(e).__name__}: {e})") \
            from None
    words = sum(len(t.split()) for t in texts)
    if len(texts) < MIN_ROWS or words < MIN_WORDS:
        raise LocalistLoadError(
            f"--data {path!r}: column {text_column!r} holds {len(texts)} non-empty row(s) with {words} words"
            f"{' (rows without a label skipped)' if label_column else ''}; recruitment needs at least {MIN_ROWS} rows "
            f"and {MIN_WORDS} words: pass more text")
    if label_column is not None and len(set(labels)) < 2:
        raise LocalistConfigError(
            f"--label_column {label_column!r} of {path!r} has {len(set(labels))} distinct value(s); purity needs at "
            "least 2 labels: pass another column, or leave --label_column out")
    return texts, (labels if label_column is not None else None)


def split_rows(texts: list[str], labels: list[str] | None, seed: int, test_fraction: float = 0.2):
    """(train, held-out) lists of ``Article`` (topic = label index, 0 without labels), split per label; and the
    label names in index order (empty without labels)."""
    names = sorted(set(labels)) if labels is not None else []
    index = {name: i for i, name in enumerate(names)}
    groups: dict[int, list[str]] = {}
    for i, text in enumerate(texts):
        groups.setdefault(index[labels[i]] if labels is not None else 0, []).append(text)
    rng = random.Random(seed)
    train, held = [], []
    for topic in sorted(groups):
        rows = groups[topic]
        rng.shuffle(rows)
        n_held = max(1, int(round(len(rows) * test_fraction))) if len(rows) > 1 else 0
        held += [Article(topic, t) for t in rows[:n_held]]
        train += [Article(topic, t) for t in rows[n_held:]]
    return train, held, names


def load_pretrained(model_dir: str, lora_r: int = 8):
    """(peft LoRA model, tokenizer, sink id, pad id) of a local causal-LM directory; only the adapters train."""
    from peft import LoraConfig, get_peft_model  # peft is a dependency; imported where it is used

    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise LocalistLoadError(f"--model {model_dir!r} is not a model directory with a config.json: pass a directory "
                                "written by save_pretrained (e.g. `hf-localist fetch smollm2-135m --output_dir DIR`)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LocalistLoadError(f"--model {model_dir!r} has no usable tokenizer ({type(e).__name__}: {e}): save the "
                                "model's tokenizer into the directory") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sink = sink_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # target_modules=None: peft's own per-architecture defaults (q_proj / v_proj for Llama, ...), so any model works.
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                                  task_type="CAUSAL_LM"))
    return peft_model, tokenizer, sink, (sink if pad is None else pad)


def recruit_csv(data: str, text_column: str, label_column: str | None, settings: RecruitSettings, seed: int = 0,
                progress: bool = True, model_dir: str | None = None) -> dict[str, Any]:
    """Run recruitment on the text of a CSV file (see the module docstring); returns the results dict.

    ``model_dir``: fine-tune that pretrained causal LM with LoRA (its own tokenizer) instead of training a tiny
    Llama from scratch."""
    texts, labels = read_text_csv(data, text_column, label_column)
    train, held, names = split_rows(texts, labels, seed)
    model = bos = pad = None
    if model_dir is None:
        tokenizer = build_tokenizer([a.text for a in train])
    else:
        torch.manual_seed(seed)
        model, tokenizer, bos, pad = load_pretrained(model_dir)
    train_enc = encode_articles(tokenizer, train, settings.max_article_tokens)
    held_enc = encode_articles(tokenizer, held, settings.max_article_tokens)
    if len(train_enc) < 2 or not held_enc:
        raise LocalistLoadError(f"--data {data!r}: after tokenizing, {len(train_enc)} training and {len(held_enc)} "
                                "held-out rows hold words; pass more text")
    run = run_recruitment(tokenizer, train_enc, held_enc, settings, seed, max(len(names), 1), progress,
                          model=model, bos_id=bos, pad_id=pad)
    blocks = []
    for row in run["blocks"]:
        block = {"slot": row["slot"], "heldout_tokens": row["tokens"],
                 "share_of_heldout_tokens": row["share_of_tokens"],
                 "top_tokens": row["top_tokens"], "recruited_at_step": row.get("recruited_at_step"),
                 "dL_data": row.get("dL_data"), "dL_model": row.get("dL_model"), "dL_total": row.get("dL_total")}
        if labels is not None:
            block["purity"] = row["purity"]
            block["majority_label"] = names[row["majority_topic"]] if row["majority_topic"] is not None else None
            block["label_counts"] = dict(zip(names, row["topic_counts"]))
        blocks.append(block)
    return {
        "model": os.path.abspath(model_dir) if model_dir else None,
        "trainable_parameters": run["trainable_parameters"],
        "data": {"file": os.path.abspath(data), "text_column": text_column, "label_column": label_column,
                 "rows": len(texts), "train_rows": len(train), "heldout_rows": len(held), "labels": names,
                 "vocabulary": len(tokenizer)},
        "blocks": blocks,
        "mean_purity": run["weighted_purity"] if labels is not None else None,
        "heldout_nll_with_blocks": run["heldout_nll"],
        "heldout_nll_without_blocks": run["heldout_nll_blocks_disabled"],
        "heldout_tokens": run["heldout_tokens"], "coverage": run["coverage"],
        "timeline": run["timeline"], "decisions": run["decisions"], "passes": run["passes"],
        "proposals": run["proposals_by_pass"],
        "stop_reason": run["stop_reason"], "settings": asdict(settings),
        "recruitment_config": run["recruitment_config"], "model_parameters": run["model_parameters"],
        "final_train_loss": run["final_train_loss"], "seed": seed, "time_s": run["time_s"],
    }


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinite floats as None (results.json is strict JSON) and tensors as lists."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _finite(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _num(value: Any, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def report_markdown(res: dict[str, Any]) -> str:
    """``report.md``: the blocks found, what they are worth, and the recruitment timeline."""
    d, labelled = res["data"], res["data"]["label_column"] is not None
    lines = [
        "# Recruited blocks", "",
        f"Data: `{os.path.basename(d['file'])}`, column `{d['text_column']}`"
        + (f", labels from `{d['label_column']}` ({len(d['labels'])} values)" if labelled else ", no labels")
        + f"; {d['rows']} rows ({d['train_rows']} training, {d['heldout_rows']} held out), vocabulary "
        f"{d['vocabulary']} tokens. "
        + (f"A tiny Llama ({res['model_parameters']} parameters) trained from scratch for " if not res["model"] else
           f"`{os.path.basename(res['model'])}` ({res['model_parameters']} parameters) fine-tuned with LoRA "
           f"({res['trainable_parameters']} trainable) for ")
        + f"{res['settings']['steps']} steps on sequences of 2-4 rows without anchors; a recruitment pass every "
        f"{res['settings']['every']} steps ({res['passes']} passes, stopped: `{res['stop_reason']}`).", "",
        f"Held-out NLL (nats per token, {res['heldout_tokens']} tokens, the same weights): with the blocks "
        f"{_num(res['heldout_nll_with_blocks'])}, every block disabled {_num(res['heldout_nll_without_blocks'])}.",
        "",
    ]
    if not res["blocks"]:
        lines += ["No block was accepted: no proposal's held-out gain paid its code length (see the timeline and "
                  "the decisions in results.json).", ""]
    else:
        head = "| slot | held-out tokens | " + ("majority label | purity | " if labelled else "") + "top tokens |"
        lines += [head, "|" + " --- |" * (head.count("|") - 1)]
        for b in res["blocks"]:
            top = ", ".join(t["token"] for t in b["top_tokens"]) or "–"
            lab = f"{b['majority_label']} | {_num(b['purity'], 3)} | " if labelled else ""
            lines.append(f"| {b['slot']} | {b['heldout_tokens']} | {lab}{top} |")
        if labelled:
            lines += ["", f"Mean purity (token-weighted): {_num(res['mean_purity'], 3)}."]
        lines.append("")
    lines += ["## Timeline", "", "| step | blocks before | accepted | blocks after | held-out NLL before | after |",
              "| --- | --- | --- | --- | --- | --- |"]
    for t in res["timeline"]:
        lines.append(f"| {t['step']} | {t['blocks_before']} | {int(t['accepted'])} | {t['blocks_after']} | "
                     f"{_num(t['heldout_nll_before'])} | {_num(t['heldout_nll_after'])} |")
    return "\n".join(lines) + "\n"


def _layers(model_dir: str) -> int:
    """Number of hidden layers in a model directory's config.json (0 when it cannot be read: load errors later)."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return 0
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    n = text.get("num_hidden_layers", text.get("n_layer", 0))
    return n if isinstance(n, int) else 0


class RecruitCommand(Command):
    """Discover semantic blocks in the text of a CSV file. Rows of --text_column are concatenated 2-4 at a time
    without any marker, a tiny Llama is trained from scratch on them (or --model is fine-tuned with LoRA) in centroid
    mode with no block, and recruitment passes add the blocks whose held-out gain pays their code length. Writes
    results.json (blocks with their held-out tokens, top tokens and, with --label_column, purity and majority label;
    held-out NLL with and without the blocks; the timeline) and report.md to --output_dir. Unless the flags say
    otherwise, tokens are assigned from context (--assign_horizon 8 --assign_min_run 4) and recruited blocks do not
    see unassigned tokens (--unassigned_visible false); the LocalistConfig defaults shown below are per-token."""

    name = "recruit"
    help = "recruit blocks on the text of a CSV file and report them"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", required=True, help="a CSV file with a header row")
        parser.add_argument("--text_column", "--text-column", dest="text_column", required=True,
                            help="the CSV column holding the text")
        parser.add_argument("--label_column", "--label-column", dest="label_column", default=None,
                            help="optional: a CSV column with a label per row (the report then gives each block's "
                                 "purity and majority label)")
        parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                            help="where results.json and report.md are written")
        parser.add_argument("--model", default=None,
                            help="a pretrained causal-LM directory with its tokenizer (e.g. from `hf-localist fetch`): "
                                 "fine-tune it with LoRA instead of training a tiny Llama from scratch (its Q/K "
                                 "stay learnable; --first_local_layer defaults to half its layers)")
        parser.add_argument("--lr", type=float, default=RecruitSettings.lr, help="learning rate (AdamW)")
        parser.add_argument("--max_blocks", "--max-blocks", dest="max_blocks", type=positive_int, default=6,
                            help="block slots recruitment may fill")
        parser.add_argument("--steps", type=positive_int, default=RecruitSettings.steps, help="training steps")
        parser.add_argument("--every", type=positive_int, default=None,
                            help="a recruitment pass every this many steps (default: steps // 3)")
        parser.add_argument("--budget_steps", "--budget-steps", dest="budget_steps", type=positive_int,
                            default=RecruitSettings.budget_steps,
                            help="training steps given to the model with and without the proposals in a pass")
        parser.add_argument("--max_clusters", "--max-clusters", dest="max_clusters", type=positive_int,
                            default=RecruitSettings.max_clusters, help="at most this many proposals per pass")
        parser.add_argument("--theta_block", "--theta-block", dest="theta_block", type=float,
                            default=RecruitSettings.theta_block,
                            help="a block is accepted when its held-out gain beats its code length by this (nats)")
        parser.add_argument("--seed", type=int, default=0, help="random seed (split, data order, initialisation)")
        parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
        parser.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true",
                            help="no progress bar")
        add_localist_config_arguments(parser, only=CONFIG_FLAGS)

    def run(self) -> int:
        a = self.args
        check_output_dir(a.output_dir)
        every = a.every or max(1, a.steps // 3)
        try:
            # Rows one after the other (chunk_tokens=0; the demo interleaves its articles), assigned from context
            # (assign_horizon 8, assign_min_run 4: experiments/recruitment_real_text.py); the flags override them.
            settings = replace(RecruitSettings(), steps=a.steps, every=every, budget_steps=a.budget_steps,
                               max_blocks=a.max_blocks, max_clusters=a.max_clusters, theta_block=a.theta_block,
                               **{"chunk_tokens": 0, "assign_horizon": 8.0, "assign_min_run": 4,
                                  **{k: v for k, v in localist_overrides(a).items() if k in CONFIG_FLAGS}})
            if not settings.theta_block >= 0:
                raise LocalistConfigError(f"--theta_block {a.theta_block} must be a number >= 0")
            if not (math.isfinite(a.lr) and a.lr > 0):
                raise LocalistConfigError(f"--lr {a.lr} must be a number > 0")
            settings = replace(settings, lr=a.lr, budget_lr=a.lr)
            if a.model is not None:
                settings = replace(settings, freeze_qk=False)  # a pretrained model keeps its attention
                if "first_local_layer" not in localist_overrides(a):
                    settings = replace(settings, first_local_layer=_layers(a.model) // 2)
        except LocalistConfigError as e:
            raise UsageError(str(e)) from e
        previous = torch.get_num_threads()
        torch.set_num_threads(a.threads)
        try:
            res = recruit_csv(a.data, a.text_column, a.label_column, settings, a.seed, progress=not a.no_progress,
                              model_dir=a.model)
        finally:
            torch.set_num_threads(previous)
        os.makedirs(a.output_dir, exist_ok=True)
        atomic_write_text(os.path.join(a.output_dir, "results.json"),
                          json.dumps(_finite(res), indent=2, allow_nan=False) + "\n")
        atomic_write_text(os.path.join(a.output_dir, "report.md"), report_markdown(res))
        pur = f", mean purity {_num(res['mean_purity'], 3)}" if res["mean_purity"] is not None else ""
        print(f"recruited {len(res['blocks'])} block(s){pur}; held-out NLL {_num(res['heldout_nll_with_blocks'])} "
              f"with the blocks, {_num(res['heldout_nll_without_blocks'])} without; wrote "
              f"{os.path.join(a.output_dir, 'report.md')} and results.json")
        return 0
