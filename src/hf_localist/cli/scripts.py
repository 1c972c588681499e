"""``hf-localist train`` and ``hf-localist bench``: run ``main(argv)`` of a script of the source checkout."""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from ..errors import LocalistLoadError
from .base import Command, UsageError

#: Environment variable naming the hf_localist source checkout (holding examples/ and benchmarks/).
REPO_ENV = "HF_LOCALIST_REPO"


def repo_script(relative: str) -> str:
    """Path of ``relative`` (e.g. ``examples/train_localist.py``) in the source checkout: ``$HF_LOCALIST_REPO``
    when set, else the repository this package is installed from (editable install). Raises
    :class:`LocalistLoadError` when the script is not there (an installed wheel ships no examples)."""

    root = os.environ.get(REPO_ENV)
    if not root:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # <repo>/src/hf_localist
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
