"""Train a small causal LM from scratch on bundled multi-topic AG News text, with and without locality.

Two runs with transformers' Trainer (``LocalistTrainer``), same data, same steps, same seed:

- ``distributed``: the dial held at 0 during training, no penalty (the ordinary model);
- ``localist``: the dial held at ``--locality_alpha`` during training, and the group-lasso penalty on the Q/K head
  slices (``--penalty prox`` by default: exact zeros), coordinate block subspaces (a model trained from scratch).

Each training sequence is ``[BOS] <blk_topic1> article1 <blk_topic2> article2 ...`` (2-4 AG News articles of
distinct topics; segment block assignment from the anchor tokens). After training, both models are evaluated on
held-out sequences across the inference dial: perplexity (anchor tokens and padding excluded), mean attention
entropy ``H_t`` (nats) and pointer fidelity ``PF_t`` and block mass ``BM_t``. The table is printed and written with
a plot (``dial_sweep.png``) and ``results.json`` into ``--output_dir``.

    python examples/train_localist.py --output_dir outputs/train_localist          # ~6 min on 2 CPU cores
    python examples/train_localist.py --output_dir /tmp/tl --quick                  # ~1 min
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import logging as hf_logging

from hf_localist import LocalistConfig, apply_localist
from hf_localist.demo import run as D
from hf_localist.trainer import LocalistTrainer


@dataclass
class ScriptArguments:
    output_dir: str = field(default="outputs/train_localist", metadata={"help": "Where results, plot and logs go."})
    steps: int = field(default=160, metadata={"help": "Optimizer steps per run (more overfits the bundled sample)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step (2-4 articles each)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate (linear decay, warm-up 20)."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_layers: int = field(default=2, metadata={"help": "Decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    locality_alpha: float = field(default=1.0, metadata={"help": "Dial held during training of the localist run."})
    penalty: str = field(default="prox", metadata={"help": "Penalty of the localist run: none, loss or prox."})
    penalty_lambda: float = field(default=0.05, metadata={"help": "Fixed group-lasso lambda of the localist run."})
    general_head_fraction: float = field(default=0.25, metadata={"help": "Query heads per layer that stay general."})
    train_articles: int = field(default=0, metadata={"help": "Use only this many training articles (0 = all)."})
    seed: int = field(default=0, metadata={"help": "Seed of data sampling and model init."})
    threads: int = field(default=1, metadata={"help": "torch threads (1 is fastest on a shared 2-core machine)."})
    quick: bool = field(default=False, metadata={"help": "A ~1 minute run: 40 steps, batch 8."})
    dial_values: str = field(default="0,0.25,0.5,0.75,0.9,1", metadata={"help": "Inference dial values to sweep."})


class _SequenceDataset(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return {"input_ids": self.seqs[i]}


def _collator(pad_id: int, anchor_ids):
    def collate(rows):
        ids, mask = D.pad_batch([r["input_ids"] for r in rows], pad_id)
        labels = ids.masked_fill(~D.scored_targets(ids, mask, anchor_ids), -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def run(args: ScriptArguments) -> dict:
    if args.quick:
        args.steps, args.batch_size = 40, 8
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    train_articles = D.load_articles("train")
    if args.train_articles:
        train_articles = train_articles[: args.train_articles]
    test_articles = D.load_articles("test")
    tokenizer = D.build_tokenizer([a.text for a in train_articles])
    settings = D.DemoSettings(hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                              num_layers=args.num_layers, num_heads=args.num_heads)
    dial_values = [float(x) for x in args.dial_values.split(",")]
    results: dict = {"args": asdict(args), "runs": {}}
    for name in ("distributed", "localist"):
        localist = name == "localist"
        model = D.build_model(len(tokenizer), settings, tokenizer.bos_token_id, tokenizer.pad_token_id, args.seed)
        cfg = LocalistConfig(alpha=args.locality_alpha if localist else 0.0, block_assignment="segment",
                             max_blocks=len(D.TOPICS), penalty=args.penalty if localist else "none",
                             penalty_lambda=args.penalty_lambda, general_head_fraction=args.general_head_fraction)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the note about how resized embeddings are initialised
        try:
            D.add_block_tokens(tokenizer, model, list(D.TOPICS), cfg)
        finally:
            hf_logging.set_verbosity(verbosity)
        handle = apply_localist(model, cfg)
        anchor_ids = cfg.anchor_token_ids
        encoded_train = D.encode_articles(tokenizer, train_articles, settings.max_article_tokens)
        sampler = D.TrainingSampler(encoded_train, tokenizer.bos_token_id, anchor_ids, args.seed)
        train_seqs = sampler.batch(args.steps * args.batch_size)
        targs = TrainingArguments(
            output_dir=os.path.join(args.output_dir, name), max_steps=args.steps,
            per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=20,
            lr_scheduler_type="linear", weight_decay=0.1, max_grad_norm=1.0, logging_steps=max(args.steps // 5, 1),
            save_strategy="no", report_to=[], seed=args.seed, use_cpu=True, remove_unused_columns=False,
            dataloader_num_workers=0, disable_tqdm=False,
        )
        trainer = LocalistTrainer(model=model, args=targs, train_dataset=_SequenceDataset(train_seqs),
                                  data_collator=_collator(tokenizer.pad_token_id, anchor_ids))
        out = trainer.train()
        held_out = D.held_out_sequences(D.encode_articles(tokenizer, test_articles, settings.max_article_tokens),
                                        tokenizer.bos_token_id, anchor_ids, args.seed + 1)
        rows = D.sweep(model, handle, held_out, dial_values, tokenizer.pad_token_id, 8, desc=f"dial sweep ({name})")
        logs = [entry for entry in trainer.state.log_history if any(k.startswith("localist/") for k in entry)]
        results["runs"][name] = {"train_loss": out.training_loss, "train_runtime_s": out.metrics["train_runtime"],
                                 "sweep": rows, "last_localist_log": logs[-1] if logs else {}}
    _write(args, results, dial_values)
    return results


def _write(args: ScriptArguments, results: dict, dial_values) -> None:
    lines = ["| run | dial | perplexity | H_t (nats) | PF_t | BM_t |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, run_ in results["runs"].items():
        for r in run_["sweep"]:
            lines.append(f"| {name} | {r['alpha']:.2f} | {r['perplexity']:.1f} | {r['entropy']:.3f} | "
                         f"{r['pointer_fidelity']:.3f} | {r['block_mass']:.3f} |")
    table = "\n".join(lines)
    print("\n" + table + "\n")
    for name, run_ in results["runs"].items():
        last = run_["last_localist_log"]
        print(f"{name}: train loss {run_['train_loss']:.3f}, {run_['train_runtime_s']:.0f} s; zero groups "
              f"{last.get('localist/zero_groups', 0):.0f}/{last.get('localist/penalised_groups', 0):.0f}, "
              f"KKT holds {last.get('localist/kkt_holds_fraction', float('nan')):.2f}")
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, default=float)
    with open(os.path.join(args.output_dir, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, run_ in results["runs"].items():
        rows = run_["sweep"]
        xs = [r["alpha"] for r in rows]
        axes[0].plot(xs, [r["perplexity"] for r in rows], marker="o", label=name)
        axes[1].plot(xs, [r["entropy"] for r in rows], marker="o", label=name)
        axes[2].plot(xs, [r["pointer_fidelity"] for r in rows], marker="o", label=name)
    for ax, title in zip(axes, ("perplexity", "attention entropy H_t (nats)", "pointer fidelity PF_t")):
        ax.set_xlabel("inference dial alpha")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.output_dir, "dial_sweep.png"), dpi=110)
    plt.close(fig)
    if not all(math.isfinite(r["perplexity"]) for run_ in results["runs"].values() for r in run_["sweep"]):
        print("warning: a perplexity is not finite", file=sys.stderr)


def main(argv=None) -> dict:
    (args,) = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses(args=argv)
    return run(args)


if __name__ == "__main__":
    main()
