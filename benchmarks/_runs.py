"""Training the runs a benchmark compares: missing students are trained ``jobs`` at a time in subprocesses; runs
that would make the same regression pairs start from a copy of another run's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_jobs(runs: list[tuple[Path, str, list[str]]], jobs: int) -> None:
    """Train every run that has no student yet, ``jobs`` at a time; a run whose regression pairs another run
    already made (same file key) starts from a copy of them."""
    todo = [r for r in runs if not (r[0] / "student" / "sampling.json").exists()]
    running: list[tuple[subprocess.Popen, Path]] = []
    while todo or running:
        for p, run in list(running):
            if p.poll() is not None:
                running.remove((p, run))
                if p.returncode != 0:
                    raise SystemExit(f"training {run} failed (exit {p.returncode}); see {run}/train.log")
        while todo and len(running) < jobs:
            run, config, overrides = todo.pop(0)
            run.mkdir(parents=True, exist_ok=True)
            seed = next(o for o in overrides if o.startswith("train.seed="))
            twin = next((r for r, _, o in runs if r != run and seed in o and (r / "regression_pairs.safetensors").exists()
                         and Path(config).parent == Path(_).parent), None)
            if twin is not None and not (run / "regression_pairs.safetensors").exists():
                shutil.copy(twin / "regression_pairs.safetensors", run / "regression_pairs.safetensors")
            cmd = [sys.executable, "-m", "stepdistill", "train", config, *overrides, "--out", str(run), "--resume",
                   "--quiet"]
            print("+", " ".join(cmd[2:]), flush=True)
            running.append((subprocess.Popen(cmd, cwd=ROOT, stdout=open(run / "train.log", "a"),
                                             stderr=subprocess.STDOUT), run))
        time.sleep(2)


def training_minutes(run: Path) -> float | None:
    f = run / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []
    return rows[-1]["wall_s"] / 60 if rows and "wall_s" in rows[-1] else None


