"""The house's shape (issue 23): the reading path's files within their line budgets, imports running one way
(from the folders' low-level code up to the scripts and on to reporting, comparisons, the synthetic world and
benchmarks) with no cycle, and no test seam in production code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# docs/layout.md states these budgets and the measured lines beside them
BUDGETS = {
    "freeze.py": 300,
    "train_uc2.py": 600,
    "engine.py": 800,
    "train_cclm.py": 900,
    "data.py": 1000,
    "eval_zeroshot.py": 600,
    "README.md": 200,
}
LOOP_BUDGET = 250
# Layer of each module (a module may import its own layer or lower ones; the folders' low-level code is 0)
LAYERS = [
    ("formats.", 0),
    ("scoring.metrics", 0),
    ("data", 1),
    ("freeze", 1),
    ("console.", 1),
    ("training.", 1),
    ("checks.", 2),
    ("engine", 2),
    ("scoring.", 2),
    ("integrations.", 2),
    ("train_uc2", 3),
    ("train_cclm", 3),
    ("eval_zeroshot", 4),
    ("report", 5),
    ("comparisons.", 5),
    ("synthetic.", 5),
    ("bench.", 6),
]
PACKAGES = ("formats", "checks", "console", "training", "scoring", "integrations", "report", "comparisons")
PACKAGES += ("synthetic", "bench")
TOP = ("data", "freeze", "engine", "train_uc2", "train_cclm", "eval_zeroshot")


def production_modules() -> dict[str, Path]:
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            found[name.removesuffix(".__init__")] = p
    return found


def layer_of(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix.rstrip(".") or module.startswith(prefix):
            return layer
    raise AssertionError(f"{module}: no layer (add it to LAYERS)")


def own_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules imported by `path` (at any depth of the file: a function-level import counts too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import")
        for n in names:
            if n in modules:
                out.add(n)
            elif n.split(".")[0] in modules and n.split(".")[0] not in PACKAGES:
                out.add(n.split(".")[0])
    return out - {str(path.relative_to(ROOT).with_suffix("")).replace("/", ".")}


def test_reading_path_files_within_their_line_budgets():
    over = {f: n for f, b in BUDGETS.items() if (n := len((ROOT / f).read_text().splitlines())) > b}
    assert not over, f"over budget: {over} (budgets {BUDGETS})"


def test_the_training_loop_fits_one_screen_budget():
    lines = (ROOT / "engine.py").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("# ---- the training loop"))
    end = next(i for i, l in enumerate(lines) if i > start and l.startswith("# ---- "))
    assert end - start <= LOOP_BUDGET, f"engine.py's loop section is {end - start} lines"


def test_top_level_holds_only_the_design_card():
    assert sorted(p.name for p in ROOT.glob("*.py")) == sorted(f"{m}.py" for m in TOP)


def test_imports_run_one_way():
    modules = production_modules()
    upward = []
    for name, path in modules.items():
        for dep in own_imports(path, modules):
            if layer_of(dep) > layer_of(name):
                upward.append(f"{name} imports {dep}")
    assert not upward, upward


def test_import_graph_has_no_cycle():
    modules = production_modules()
    graph = {name: own_imports(path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [n, d]))
            if d not in state:
                visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


def test_nothing_imports_the_tests():
    modules = production_modules()
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m == "tests" or m.startswith("tests.") for m in mods), f"{name} imports tests"
        assert "sys.path.insert" not in path.read_text() or name.startswith("bench"), f"{name} edits sys.path"


@pytest.mark.parametrize("seam", ["SUF_FAULT", "fault_point"])
def test_no_test_seam_in_production_code(seam):
    holders = [n for n, p in production_modules().items() if re.search(rf"\b{seam}\b", p.read_text())]
    assert not holders, f"{seam} in {holders}"
