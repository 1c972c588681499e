"""Plumbing shared by the experiment scripts: arguments, where results go, and the docs page they update.

Every experiment script:

* takes ``--quick`` (a few tens of seconds, used by the tests), ``--seed``, ``--threads`` and ``--out_dir``;
* writes ``results.json`` and its PNG figures to ``--out_dir`` (default ``experiments/results/<name>``);
* with ``--write_docs`` (the way the numbers in ``docs/experiments.md`` are produced), also copies its figures to
  ``docs/figures/experiments/`` and replaces its own section of ``docs/experiments.md``: the text between
  ``<!-- begin:<name> -->`` and ``<!-- end:<name> -->``. Other sections are left as they are, so the scripts can be
  re-run one at a time. The replacement is atomic (temporary file + ``os.replace``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS_PAGE = REPO / "docs" / "experiments.md"
DOCS_FIGURES = REPO / "docs" / "figures" / "experiments"

PAGE_HEADER = """# Experiments: the papers' checks, run

Each section below is written by one script in `experiments/` (run it with `--write_docs` to regenerate the
section and its figures; `--quick` is a smoke-test size used by the tests, whose numbers are not the ones shown
here). The scripts run on CPU in at most 15 minutes each on 2 cores.
"""


def make_parser(name: str, description: str, render: bool = False) -> argparse.ArgumentParser:
    """The common arguments; ``render=True`` adds ``--render`` (rebuild the docs section and figures from the
    results.json already in --out_dir, without running the experiment)."""
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description)
    if render:
        parser.add_argument("--render", action="store_true", help="only re-render the docs section and figure "
                            "from the results.json already in --out_dir (no training)")
    parser.add_argument("--quick", action="store_true", help="smoke-test size (seconds, not minutes)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared "
                        "2-core machine)")
    parser.add_argument("--out_dir", default=None, help=f"where results.json and figures go (default "
                        f"experiments/results/{name})")
    parser.add_argument("--write_docs", action="store_true", help="also update this script's section of "
                        "docs/experiments.md and its figures under docs/figures/experiments/")
    return parser


def out_dir(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.out_dir) if args.out_dir else REPO / "experiments" / "results" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, args.threads))
    import matplotlib

    matplotlib.use("Agg")


def environment() -> dict[str, Any]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "argv": sys.argv[1:]}


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n")


def save_figure(fig, directory: Path, filename: str) -> Path:
    path = directory / filename
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def publish(name: str, section_markdown: str, figures: list[Path]) -> None:
    """Copy ``figures`` to docs/figures/experiments/ and replace the ``name`` section of docs/experiments.md.

    In the markdown, refer to a figure as ``figures/experiments/<filename>`` (relative to docs/).
    """
    DOCS_FIGURES.mkdir(parents=True, exist_ok=True)
    for fig in figures:
        shutil.copyfile(fig, DOCS_FIGURES / fig.name)
    replace_section(DOCS_PAGE, name, section_markdown)


def replace_section(page: Path, name: str, markdown: str) -> None:
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    import fcntl

    page.parent.mkdir(parents=True, exist_ok=True)
    with open(page.parent / ".experiments.lock", "w") as lock:  # scripts may finish at the same time
        fcntl.flock(lock, fcntl.LOCK_EX)
        _replace_locked(page, begin, end, block)


def _replace_locked(page: Path, begin: str, end: str, block: str) -> None:
    text = page.read_text() if page.exists() else PAGE_HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    _atomic_write(page, text)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; docs and results are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
