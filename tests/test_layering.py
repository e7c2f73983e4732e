"""Layering, read from the source: every import between stepdistill modules (module level and inside functions)
forms no cycle; sampling (``pipelines/``) and what it builds on never reach ``eval/``; ``models`` never imports
``pipelines/``; ``assets/`` never imports ``trainers/``."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "stepdistill"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != mod:
                    edges[mod].add(t)
    return edges


def reachable(edges, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in edges[m]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_no_import_cycles():
    edges = graph()
    cycles = sorted(m for m in edges if m in reachable(edges, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_layers():
    edges = graph()
    pipelines = [m for m in edges if m.startswith("stepdistill.pipelines")]
    for m in pipelines:
        bad = sorted(n for n in reachable(edges, m) | {m} if n.startswith("stepdistill.eval"))
        assert not bad, f"{m} reaches {bad}"
    assert not [n for n in reachable(edges, "stepdistill.models") if n.startswith("stepdistill.pipelines")]
    for m in (m for m in edges if m.startswith("stepdistill.assets")):
        assert not [n for n in edges[m] if n.startswith("stepdistill.trainers")], m


def test_the_checker_sees_imports():
    """Not vacuous: known edges are found, relative and lazy ones included."""
    edges = graph()
    assert "stepdistill.pipelines.sampling" in edges["stepdistill.pipelines.runner"]
    assert "stepdistill.pipelines.plan" in edges["stepdistill.pipelines.loading"]
    assert "stepdistill.eval.report" in edges["stepdistill.eval.cli"]  # imported inside a function
