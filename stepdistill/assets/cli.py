"""``stepdistill assets list`` (names, sizes, state, metrics) and ``stepdistill assets build NAME [NAME...]
[key=value ...]`` (rebuild shipped assets from their pretrain configs; overrides apply to every config)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("assets", help="list or rebuild the shipped weights of the embedded benchmarks",
                              description="Shipped assets (stepdistill/assets/<name>/ with asset.json).")
    sub = p.add_subparsers(dest="assets_command", metavar="ACTION", parser_class=type(p))
    sub.required = True
    lp = sub.add_parser("list", help="names, sizes, state and measured metrics")
    lp.add_argument("--root", type=Path, help="asset folder (default: the package's)")
    lp.set_defaults(func=cmd_list)
    bp = sub.add_parser("build", help="rebuild assets by running their pretrain configs",
                        description="Run each asset's pretrain config(s) through the training loop, measure it, "
                                    "write stepdistill/assets/<name>/ with asset.json. key=value overrides apply "
                                    "to every config (e.g. train.steps=20 for a smoke build into --root).")
    bp.add_argument("names", nargs="+", metavar="NAME|key=value", help="asset names, then optional overrides")
    bp.add_argument("--root", type=Path, help="where to write assets (default: the package's asset folder)")
    bp.add_argument("--runs", type=Path, default=Path("runs/assets"), help="run directories (default: runs/assets)")
    bp.add_argument("--quiet", action="store_true", help="no progress bar")
    bp.set_defaults(func=cmd_build)
    return p


def cmd_list(args) -> int:
    from . import BUDGET_BYTES, ROOT, check, read_manifest, shipped_bytes
    from .registry import ASSETS

    root = args.root or ROOT
    names = sorted(set(ASSETS) | {p.name for p in root.glob("*") if p.is_dir() and (p / "asset.json").exists()})
    for name in names:
        folder = root / name
        if not folder.is_dir():
            print(f"{name:20s} {'-':>8s}  missing   (build: stepdistill assets build {name})")
            continue
        problem = check(folder)
        try:
            m = read_manifest(folder)
        except (OSError, ValueError):
            m = {}
        size = f"{m.get('total_bytes', 0) / 1e6:.2f} MB"
        state = "ok" if problem is None else f"corrupt ({problem})"
        print(f"{name:20s} {size:>8s}  {state}  {m.get('train_minutes', '?')} min  "
              f"{json.dumps(m.get('metrics', {}), separators=(',', ':'))}")
    total = shipped_bytes(root)
    print(f"{'total':20s} {total / 1e6:.2f} MB of {BUDGET_BYTES / 1e6:.1f} MB")
    return 0


def cmd_build(args) -> int:
    from .build import build
    from .registry import ASSETS, spec

    names = [n for n in args.names if "=" not in n]
    overrides = [n for n in args.names if "=" in n]
    if not names:
        raise UsageError("assets build: name at least one asset (known: " + ", ".join(sorted(ASSETS)) + ")")
    for n in names:
        spec(n)
    for name in _dependency_order(names):
        manifest = build(name, args.root, args.runs, overrides, args.quiet)
        print(f"stepdistill: built asset {name} ({manifest['total_bytes'] / 1e6:.2f} MB, "
              f"{manifest['train_minutes']} min): {json.dumps(manifest['metrics'])}")
    return 0


def _dependency_order(names: list[str]) -> list[str]:
    """Asked-for assets with their requirements (when also asked for) built first."""
    from .registry import ASSETS

    out: list[str] = []

    def visit(n: str) -> None:
        if n in out:
            return
        for req in ASSETS[n].requires:
            if req in names:
                visit(req)
        out.append(n)

    for n in names:
        visit(n)
    return out
