"""The package layout: an import graph without cycles, lower layers never importing higher ones, function-local
imports only for optional dependencies, a light core import, and a design contract inside the repository.

The graph is derived from the source (``ast``), so a new module or import is checked without editing this test.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "hf_localist"

#: The order of the layers: a unit (a top-level module or subpackage of hf_localist) may import units of its own
#: layer or below, never above.
LAYERS = {
    "errors": 0, "utils": 0, "savedir": 0, "theory": 0, "distributed": 0,
    "arch": 1, "metrics": 1,
    "config": 2,
    "blocks": 3,
    "attention": 4,
    "patch": 5,
    "training": 6,
    "recruitment": 7,
    "trainer": 8, "router": 8,
    "demo": 9, "checkpoints": 9, "integrations": 9,
    "cli": 10,
}
#: Imports allowed inside functions: optional or heavy dependencies, and version-guarded ones.
LOCAL_IMPORT_OK = ("matplotlib", "sklearn", "evaluate", "peft", "torch.nn.attention.flex_attention",
                   "transformers.utils.output_capturing", "transformers.loss.loss_utils", "torch.distributed", "gguf")


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        # evaluate metric scripts (metrics/<name>/<name>.py) are loaded standalone by evaluate, not imported
        if len(parts) >= 3 and parts[1] == "metrics" and not parts[2].startswith("_"):
            continue
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(name: str) -> str:
    path = MODULES[name]
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _imports(name: str) -> list[tuple[str, bool, int]]:
    """(absolute hf_localist module imported, inside a function?, line) for every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    top_level = {id(n) for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    # ``if TYPE_CHECKING:`` imports are for annotations only: they never run, so they are no edge of the graph
    typing_only = {id(n) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
                   and getattr(stmt.test, "id", getattr(stmt.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(stmt)}
    package = _package_of(name)
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        local = id(node) not in top_level
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        else:
            continue
        found += [(t, local, node.lineno) for t in targets]
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        if name == "hf_localist":
            continue  # the package's public face imports everything
        for target, _, _ in _imports(name):
            if not target.startswith("hf_localist") or target == "hf_localist":
                continue
            graph[name].add(target)
            # importing hf_localist.a.b from another package first runs hf_localist.a's __init__
            parent = target.rsplit(".", 1)[0]
            if parent != "hf_localist" and parent in MODULES and not name.startswith(parent + ".") and name != parent:
                graph[name].add(parent)
    return graph


def _unit(name: str) -> str:
    return name.split(".")[1]


def test_every_unit_has_a_layer():
    assert {_unit(n) for n in MODULES if n != "hf_localist"} <= set(LAYERS)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_lower_layers_never_import_higher_ones():
    bad = []
    for name, targets in _graph().items():
        if name == "hf_localist":
            continue
        for target in targets:
            if LAYERS[_unit(target)] > LAYERS[_unit(name)]:
                bad.append(f"{name} (layer {LAYERS[_unit(name)]}) imports {target} (layer {LAYERS[_unit(target)]})")
    assert not bad, "\n".join(bad)


def test_function_local_imports_are_only_for_optional_dependencies():
    bad = [f"{MODULES[name].relative_to(ROOT)}:{line}: {target}"
           for name in MODULES for target, local, line in _imports(name)
           if local and not target.startswith(LOCAL_IMPORT_OK)]
    assert not bad, "\n".join(bad)


def test_core_import_does_not_load_the_demo_dependencies():
    code = "import sys, hf_localist; print(sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.stdout.strip() == "[]"


def test_the_design_contract_lives_in_the_repository():
    assert (ROOT / "docs" / "design.md").is_file()
    outside = []
    for path in list(SRC.rglob("*.py")) + list(ROOT.glob("docs/*.md")) + [ROOT / "README.md"]:
        text = path.read_text()
        for needle in ("DESIGN.md", "../shared", "NOTES-transformers", "NOTES-real-models"):
            if needle in text:
                outside.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not outside, "\n".join(outside)


def _table_rows_off(text: str) -> list[tuple[int, str]]:
    """Lines of markdown tables whose cell count differs from their header's: (line number, line)."""
    lines, bad, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith(("| ---", "| :--", "|---")):
            width = lines[i].replace("\\|", "").count("|")
            i += 1
            while i < len(lines) and "|" in lines[i]:  # a row glued to a stray cell may not start with "|"
                if not lines[i].startswith("|") or lines[i].replace("\\|", "").count("|") != width:
                    bad.append((i + 1, lines[i]))
                i += 1
        else:
            i += 1
    return bad


def test_docs_tables_are_well_formed():
    """Every row of every markdown table in the docs has its header's columns (the experiments write these tables)."""
    assert _table_rows_off("| a | b |\n| --- | --- |\n| 1 | 2 |\n| 1 | 2 | 3 |\n") == [(4, "| 1 | 2 | 3 |")]
    bad = [f"{p.relative_to(ROOT)}:{n}: {line[:80]}" for p in list(ROOT.glob("docs/**/*.md")) + [ROOT / "README.md"]
           for n, line in _table_rows_off(p.read_text(encoding="utf-8"))]
    assert not bad, "\n".join(bad)
