"""``hf-localist demo --model DIR --data FILE.csv``: the demo's dial and routing parts on a pretrained checkpoint.

The labels of the CSV are the blocks (see :mod:`hf_localist.demo.passages`): held-out sequences of a sink and
``passages`` passages of distinct labels, one block each, ``block_assignment="explicit"``.

1. **The dial.** Per-block perplexity at each dial value under both position policies (``"continuous"``:
   the positions the tokens have in the long sequence; ``"restart"``: each block positioned as if read alone after
   the sink), against the reference of each passage read alone by the unmodified model. Then a LoRA adapter
   (peft; the base weights frozen) is fine-tuned at dial 1 with ``"restart"`` on training sequences built the same
   way, and the sweep is repeated: what a short block fine-tune buys.
2. **Routing** (:mod:`hf_localist.demo.pretrained_route`): one LoRA specialist per label on the same base behind a
   ``LocalistRouterModel``; routing accuracy of the fitted router and of the training-free prototype router, and a
   calibrated confidence threshold (route to a specialist only when confident, else the base).

Block recruitment on a pretrained model is not part of this demo yet (the bundled run has it).
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..config.localist import LocalistConfig
from ..errors import LocalistConfigError, LocalistLoadError
from ..patch.apply import apply_localist
from ..utils import pad_right
from .passages import (
    alone_nll,
    block_nll,
    encode_passages,
    load_labeled_csv,
    passage_sequences,
    perplexities,
    sink_token_id,
)
from .pretrained_report import pretrained_report, write_pretrained_figure
from .pretrained_route import PretrainedRouteSettings, run_pretrained_routing

POLICIES = ("continuous", "restart")


@dataclass
class PretrainedSettings:
    """Every knob of the pretrained-model demo (the CLI exposes ``--quick``, ``--seed``, ``--threads``)."""

    passages: int = 4  # blocks per sequence (distinct labels)
    passage_tokens: int = 96
    eval_sequences: int = 8
    eval_batch_size: int = 4
    dial_values: tuple[float, ...] = (0.0, 0.5, 0.9, 1.0)
    schedule: str = "uniform"
    lora_steps: int = 16  # LoRA steps at dial 1, "restart"
    lora_batch_size: int = 2
    lora_lr: float = 1e-3
    lora_r: int = 8
    max_labels: int = 8
    route: PretrainedRouteSettings = field(default_factory=PretrainedRouteSettings)


FULL = PretrainedSettings()
QUICK = PretrainedSettings(eval_sequences=4, lora_steps=6, route=PretrainedRouteSettings(
    train_per_label=80, test_per_label=25, specialist_steps=4))


def plumbing_settings(base: PretrainedSettings, steps: int) -> PretrainedSettings:
    """Tiny budgets for tests: ``steps`` LoRA steps in each part, 2 sequences, short passages."""
    route = replace(base.route, train_per_label=6, test_per_label=4, specialist_steps=steps, prompts_per_label=2,
                    eval_batch_size=4, max_tokens=24)
    return replace(base, passage_tokens=24, eval_sequences=2, lora_steps=steps, lora_batch_size=2, route=route)


def _lora(model, r: int):
    from peft import LoraConfig, get_peft_model  # peft is a dependency; imported here like the other adapters

    # target_modules=None: peft's own per-architecture defaults (q_proj/v_proj for Llama, ...), so any model works.
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM"))


def lora_block_tune(model, train_seqs, s: PretrainedSettings, pad_id: int, seed: int, progress: bool):
    """LoRA at dial 1 (the model's handle is set to ``"restart"``): AdamW, linear decay; returns (peft model, log)."""
    peft_model = _lora(model, s.lora_r)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lora_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - 0.9 * k / max(s.lora_steps, 1))
    rng = random.Random(seed)
    losses = []
    peft_model.train()
    for _ in tqdm(range(s.lora_steps), desc="dial: LoRA at α=1 (restart)", unit="step", disable=not progress):
        batch = rng.sample(train_seqs, min(s.lora_batch_size, len(train_seqs)))
        ids, mask = pad_right([b.input_ids for b in batch], pad_id)
        blocks, _ = pad_right([b.block_ids for b in batch], 0)
        labels = ids.masked_fill(mask == 0, -100)
        loss = peft_model(input_ids=ids, attention_mask=mask, block_ids=blocks, labels=labels,
                          localist_alpha=1.0).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    peft_model.eval()
    trainable = sum(p.numel() for p in params)
    return peft_model, {"steps": s.lora_steps, "trainable_parameters": trainable,
                        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


def dial_sweep(model, handle, seqs, labels, s: PretrainedSettings, pad_id: int, desc: str, progress: bool):
    """Rows {policy, alpha, perplexity per label and "all"} for every dial value under both position policies."""
    rows = []
    jobs = [(p, a) for p in POLICIES for a in s.dial_values]
    for policy, alpha in tqdm(jobs, desc=desc, unit="setting", disable=not progress):
        handle.update(block_positions=policy)
        totals = block_nll(model, seqs, pad_id, s.eval_batch_size, localist_alpha=alpha)
        rows.append({"policy": policy, "alpha": alpha, "perplexity": perplexities(totals, labels)})
    handle.update(block_positions="restart")
    return rows


def run_pretrained_demo(model_dir: str, data: str, text_column: str, label_column: str,
                        output_dir: str | os.PathLike = "./demo_report", *, quick: bool = False, seed: int = 0,
                        steps: int | None = None, print_table: bool = True, num_threads: int | None = None,
                        progress: bool = True, max_labels: int | None = None) -> dict[str, Any]:
    """Run the dial and routing parts on the causal LM in ``model_dir`` and the labelled CSV ``data``; write
    ``report.md``, ``results.json`` and the figure into ``output_dir``; return the results dict."""
    if num_threads is not None and num_threads < 1:
        raise LocalistConfigError(f"num_threads={num_threads} must be >= 1")
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _run(model_dir, data, text_column, label_column, os.fspath(output_dir), quick, seed, steps,
                    print_table, progress, max_labels)
    finally:
        torch.set_num_threads(previous)


def _run(model_dir, data, text_column, label_column, output_dir, quick, seed, steps, print_table, progress,
         max_labels) -> dict[str, Any]:
    wall = time.perf_counter()
    s = QUICK if quick else FULL
    if steps is not None:
        if steps < 1:
            raise LocalistConfigError(f"steps={steps} must be >= 1")
        s = plumbing_settings(s, steps)
    if max_labels is not None:
        s = replace(s, max_labels=max_labels)
    if not os.path.isdir(model_dir):
        raise LocalistLoadError(f"--model {model_dir!r} is not a directory; pass a transformers model directory "
                                "(e.g. from `hf-localist fetch smollm2-135m --output_dir DIR`)")
    os.makedirs(output_dir, exist_ok=True)
    torch.manual_seed(seed)
    times: dict[str, float] = {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model_type = model.config.model_type
        times["load"] = time.perf_counter() - t0
        text = load_labeled_csv(data, text_column, label_column, max_labels=s.max_labels, seed=seed)
        labels, sink = text.labels, sink_token_id(tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sink

        # ---- part 1: the dial, before and after a LoRA block fine-tune
        t0 = time.perf_counter()
        test_enc = encode_passages(tokenizer, text.test, labels, s.passage_tokens)
        train_enc = encode_passages(tokenizer, text.train, labels, s.passage_tokens)
        eval_seqs = passage_sequences(test_enc, labels, sink, s.eval_sequences, s.passages, seed + 1)
        train_seqs = passage_sequences(train_enc, labels, sink, max(4 * s.lora_steps, 8), s.passages, seed + 2)
        alone = perplexities(alone_nll(model, eval_seqs, sink, pad_id, 2 * s.eval_batch_size), labels)
        config = LocalistConfig(alpha=0.0, block_assignment="explicit", schedule=s.schedule,
                                max_blocks=max(16, len(labels) + 1))
        handle = apply_localist(model, config)
        before = dial_sweep(model, handle, eval_seqs, labels, s, pad_id, "dial: sweep (pretrained)", progress)
        times["dial_sweep"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        handle.update(block_positions="restart")
        peft_model, lora_log = lora_block_tune(model, train_seqs, s, pad_id, seed + 3, progress)
        times["dial_lora"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        after = dial_sweep(peft_model, handle, eval_seqs, labels, s, pad_id, "dial: sweep (after LoRA)", progress)
        times["dial_sweep_after"] = time.perf_counter() - t0
        del peft_model, model, handle

        # ---- part 2: routing between LoRA specialists on the same base
        t0 = time.perf_counter()
        routing = run_pretrained_routing(model_dir, tokenizer, text, s.route, seed, progress)
        times["route"] = time.perf_counter() - t0
    finally:
        hf_logging.set_verbosity(verbosity)

    n_tokens = sum(len(q.input_ids) for q in eval_seqs)
    results: dict[str, Any] = {
        "command": (f"hf-localist demo --model {model_dir} --data {data} --text_column {text_column} "
                    f"--label_column {label_column}" + (" --quick" if quick else "")
                    + (f" --seed {seed}" if seed else "") + (f" (steps={steps})" if steps is not None else "")),
        "kind": "pretrained", "quick": quick, "seed": seed, "settings": asdict(s),
        "model": {"path": model_dir, "model_type": model_type, "parameters": routing["base_parameters"]},
        "data": {"source": text.source, "labels": labels, "train_rows": {k: len(v) for k, v in text.train.items()},
                 "test_rows": {k: len(v) for k, v in text.test.items()}, "eval_sequences": len(eval_seqs),
                 "eval_tokens": n_tokens, "sink_token_id": sink},
        "dial": {"alone": alone, "before_lora": before, "after_lora": after, "lora": lora_log},
        "routing": routing,
        "machine": {"cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
    }
    results["figures"] = [write_pretrained_figure(results, output_dir)]
    results["part_times_s"] = times
    results["wall_time_s"] = time.perf_counter() - wall
    report = pretrained_report(results)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    with open(os.path.join(output_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(report)
    if print_table:
        print(report)
        print(f"\nreport: {os.path.join(output_dir, 'report.md')}  ({results['wall_time_s']:.0f} s)")
    return results
