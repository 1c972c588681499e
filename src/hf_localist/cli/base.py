"""The pieces every ``hf-localist`` subcommand shares: the one-line-error parser, the :class:`Command` base class,
argument types and output-directory checks."""

from __future__ import annotations

import argparse
import os

from ..errors import LocalistError, LocalistLoadError


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
