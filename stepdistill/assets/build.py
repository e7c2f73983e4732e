"""``stepdistill assets build NAME``: run an asset's recipe (its pretrain configs through the one
:class:`~stepdistill.training.Trainer`, then its measurements) into a staging folder, write ``asset.json``
and swap the folder in atomically, refusing when the shipped total would exceed the size budget."""

from __future__ import annotations

import datetime
import importlib
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from ..errors import UsageError
from . import BUDGET_BYTES, ROOT, path, rebuild_command, shipped_bytes, write_manifest
from .registry import AssetSpec, spec

REPO = Path(__file__).resolve().parents[2]  # source checkout holding configs/


def config_path(config: str) -> Path:
    """A repository-relative config, found from the current directory or the source checkout."""
    for p in (Path(config), REPO / config):
        if p.is_file():
            return p
    raise UsageError(f"config {config} not found; build assets from a source checkout (configs/ ships with the "
                     f"repository)")


class Builder:
    """What a recipe uses: ``pretrain`` configs, ``install`` exports into ``out``, open other assets."""

    def __init__(self, spec: AssetSpec, out: Path, runs: Path, root: Path, overrides: Sequence[str] = (),
                 quiet: bool = False):
        self.spec, self.out, self.runs, self.root = spec, Path(out), Path(runs), Path(root)
        self.overrides, self.quiet = list(overrides), quiet
        self.records: list[dict] = []

    def pretrain(self, config: str, overrides: Sequence[str] = (), tag: str | None = None) -> Path:
        """Run one pretrain config (plus the build's own overrides) to the end; returns its ``export/``."""
        import json

        from ..config import load_config
        from ..registry import method_class
        from ..training import Trainer

        all_overrides = [*overrides, *self.overrides]
        cfg = load_config(config_path(config), all_overrides)
        method = method_class(cfg.method.name)
        if method.kind != "pretrain":
            raise UsageError(f"{config}: asset recipes run pretrain methods, not {cfg.method.name!r}")
        run_dir = self.runs / (tag or Path(config).stem)
        shutil.rmtree(run_dir, ignore_errors=True)
        t0, c0 = time.time(), time.process_time()
        export = Trainer(cfg, method, run_dir, show_progress=not self.quiet).fit()
        minutes, cpu_minutes = (time.time() - t0) / 60, (time.process_time() - c0) / 60
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        last = rows[-1] if rows else {}
        self.records.append({
            "config": config, "overrides": all_overrides, "method": cfg.method.name, "steps": cfg.train.steps,
            "batch_size": cfg.train.batch_size, "seed": cfg.train.seed, "train_minutes": round(minutes, 2),
            "cpu_minutes": round(cpu_minutes, 2),  # all threads; wall time depends on other load
            "it_per_s": round(sum(r.get("it_per_s", 0) for r in rows) / max(len(rows), 1), 2),
            "final_log": {k: round(v, 5) for k, v in last.items() if k not in ("step", "it_per_s")},
            "run_dir": str(run_dir), "resolved_config": cfg.model_dump(mode="json")})
        return export

    def install(self, src: Path, subfolder: str = "") -> Path:
        """Copy a folder (an export) into the asset, at its root or under ``subfolder``."""
        dest = self.out / subfolder
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest

    def asset(self, name: str) -> Path:
        """Another asset of the same root (must be listed in ``requires``)."""
        if name not in self.spec.requires:
            raise RuntimeError(f"recipe of {self.spec.name!r} opens {name!r}; list it in AssetSpec.requires")
        return path(name, self.root)


def build(name: str, root: Path | None = None, runs: Path = Path("runs/assets"),
          overrides: Sequence[str] = (), quiet: bool = False) -> dict:
    """Build asset ``name`` into ``root`` (default: the package's asset folder); returns its manifest."""
    s = spec(name)
    root = Path(root) if root is not None else ROOT
    for req in s.requires:
        path(req, root)  # fails with the command that builds the requirement
    root.mkdir(parents=True, exist_ok=True)
    stage = root / f".{name}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        b = Builder(s, stage, Path(runs) / name, root, overrides, quiet)
        recipe = s.recipe
        if isinstance(recipe, str):
            module, _, fn = recipe.partition(":")
            recipe = getattr(importlib.import_module(module), fn)
        metrics = recipe(b)
        manifest = write_manifest(stage, _info(s, b, metrics))
        total = shipped_bytes(root, exclude=name) + manifest["total_bytes"]
        if total > BUDGET_BYTES:
            raise UsageError(f"asset {name!r} ({manifest['total_bytes'] / 1e6:.1f} MB) would bring the shipped "
                             f"assets to {total / 1e6:.1f} MB, over the {BUDGET_BYTES / 1e6:.1f} MB budget")
        final = root / name
        old = root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _info(s: AssetSpec, b: Builder, metrics: dict) -> dict:
    import diffusers
    import torch

    from .. import __version__

    return {"name": s.name, "description": s.description, "rebuild": rebuild_command(s.name),
            "configs": list(s.configs), "overrides": b.overrides,
            "built": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"stepdistill": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
            "train_minutes": round(sum(r["train_minutes"] for r in b.records), 2),
            "cpu_minutes": round(sum(r["cpu_minutes"] for r in b.records), 2),
            "metrics": metrics, "runs": b.records}
