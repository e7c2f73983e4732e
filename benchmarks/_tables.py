"""Helpers the benchmark scripts share: ratios, target checks and Markdown tables."""

from __future__ import annotations


def ratio(a, b):
    """a / b, or None when either is missing (or b is 0)."""
    return None if a is None or not b else a / b


def check(name: str, value, op: str, limit) -> dict:
    """One target: ``value op limit`` with op '<=' or '>='; met is None when the value is missing."""
    ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"target": name, "value": value, "met": ok}


def markdown_table(rows: list[dict], columns: list[str]) -> list[str]:
    from stepdistill.eval.report import fmt

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]


def targets_table(checks: list[dict]) -> list[str]:
    from stepdistill.eval.report import fmt

    met = {True: "yes", False: "no", None: "—"}
    lines = ["| target | value | met |", "|---|---|---|"]
    return lines + [f"| {c['target']} | {fmt(c['value'])} | {met[c['met']]} |" for c in checks]
