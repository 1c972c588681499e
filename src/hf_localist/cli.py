"""The ``hf-localist`` command line.

Subcommands follow the style of the ``transformers`` / ``accelerate`` CLIs: one top-level parser, one subparser
per command, each command a small class that registers its own arguments and runs. To add a command (``apply``,
``inspect``, ``train``, ``bench``, ...) write a :class:`Command` subclass and list it in :data:`COMMANDS`.

    hf-localist demo --quick                 # ~1 minute on 2 CPU cores
    hf-localist demo --output_dir ./report   # the full demo (a few minutes)
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


class Command:
    """One ``hf-localist`` subcommand: a name, a help line, its arguments, and what it does."""

    name: str = ""
    help: str = ""

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
    """Train a tiny Llama from scratch on bundled AG News articles (4 topics = 4 blocks) and sweep the
    localist dial: perplexity, attention entropy H_t, pointer fidelity PF_t and block mass BM_t per dial value.
    Writes report.md and results.json to --output_dir and prints the table. Runs on CPU; no downloads."""

    name = "demo"
    help = "train a tiny model on bundled data and sweep the localist dial"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default="./demo_report",
                            help="where report.md and results.json are written")
        parser.add_argument("--quick", action="store_true",
                            help="a shorter training budget (about a minute on 2 CPU cores instead of a few)")
        parser.add_argument("--seed", type=int, default=0, help="random seed (data order, initialisation)")
        parser.add_argument("--threads", type=int, default=1,
                            help="torch CPU threads. The tiny model gains little from more than one, and on a busy "
                                 "machine several OpenMP threads can make it many times slower")
        # Hidden: override the number of training steps (tests run the demo end to end in a few seconds).
        parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)

    def run(self) -> int:
        from .demo import run_demo  # imported here so that `hf-localist --help` stays fast

        run_demo(self.args.output_dir, quick=self.args.quick, seed=self.args.seed, steps=self.args.steps,
                 num_threads=self.args.threads)
        return 0


#: Every subcommand, in the order ``hf-localist --help`` lists them.
COMMANDS: list[type[Command]] = [DemoCommand]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hf-localist",
        description="Localist attention for Hugging Face Transformers: a locality dial from distributed to "
                    "block-sparse attention.",
        epilog="Run `hf-localist <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"hf-localist {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-localist`` console script. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    command_class = getattr(args, "command_class", None)
    if command_class is None:
        parser.print_help()
        return 1
    return command_class(args).run()


if __name__ == "__main__":
    sys.exit(main())
