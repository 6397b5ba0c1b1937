"""common/'s imports point one way: no module imports one that (directly or not) imports it."""

import ast

from conftest import ROOT


def imports_of(path):
    """The common/ modules a file imports: `from common.x import ...` and `from common import x`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("common."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "common":
            found.update(a.name for a in node.names if (ROOT / "common" / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("common."))
    return found


def test_common_has_no_import_cycles():
    graph = {p.stem: imports_of(p) for p in (ROOT / "common").glob("*.py")}
    assert graph["device"] == set() and graph["train"] == {"metrics"}, graph

    def reaches(start, goal, seen=()):
        return any(
            n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start]
        )

    cycles = [name for name in graph if reaches(name, name)]
    assert not cycles, f"import cycles through {cycles}: {graph}"


def test_no_formatter_or_linter_markers():
    """A learner reads every line: the code carries no per-line tool exceptions (issue 29)."""
    markers = ("fmt: " + "skip", "fmt: " + "off", "no" + "qa")  # split: this file is scanned too
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in ROOT.glob("**/*.py")
        if ".venv" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if any(m in line for m in markers)
    ]
    assert not found, f"formatter or linter markers: {found}"
