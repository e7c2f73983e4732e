"""Phased DMD against DMD2 with backward simulation at the same step count and the same training steps, measured in
one run side by side.

digits-sd (4 steps): the teacher at DDIM-50 (w = 3); DMD2 4-step (``configs/digits_sd/dmd_lora.yaml`` with timesteps
999/749/499/249, backward simulation); Phased DMD 4 phases x 1 step and 2 phases x 2 steps
(``configs/digits_sd/phased_dmd_lora.yaml``); each student row trained with two seeds; and the ablation row (DM
loss timesteps inside the phase, (t_k, t_{k-1}], instead of (t_k, T]). One ``stepdistill eval`` report holds every
row (FID, per-prompt diversity, precision, recall, prompt accuracy, NFE, ms per image); training minutes come from
each run's metrics, and the peak resident memory of training steps (fresh process each, ``ru_maxrss``) from a
few steps of each method, one-step DMD included.

toy2d (the exact teacher): DMD 2- and 4-step against Phased DMD 2 x 1 and 4 x 1: modes covered and sliced W2.

Runs missing a student are trained first (``--jobs`` at a time, one thread each); regression pairs made for one
run are copied to the runs that would make the same ones (same teacher, seed and settings).

    python benchmarks/phased_dmd.py --out benchmarks/results/phased_dmd
    python benchmarks/phased_dmd.py --steps 800 --batch-size 32 --runs-dir runs/phased_bench --out runs/phased_bench/out
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _runs import train_jobs, training_minutes
from _tables import markdown_table, ratio

ROOT = Path(__file__).resolve().parents[1]
FOUR = "[999,749,499,249]"
DIGITS_SD = {  # row name -> (config, overrides)
    "DMD2 4-step": ("configs/digits_sd/dmd_lora.yaml", [f"method.timesteps={FOUR}"]),
    "Phased DMD 4x1": ("configs/digits_sd/phased_dmd_lora.yaml", [f"method.boundaries={FOUR}", "method.steps_per_phase=1"]),
    "Phased DMD 2x2": ("configs/digits_sd/phased_dmd_lora.yaml", ["method.boundaries=[999,499]", "method.steps_per_phase=2"]),
    "Phased DMD 4x1, t in phase": ("configs/digits_sd/phased_dmd_lora.yaml",
                                   [f"method.boundaries={FOUR}", "method.steps_per_phase=1", "method.dm_range=phase"]),
}
ABLATION = "Phased DMD 4x1, t in phase"  # one seed
TOY2D = {
    "DMD 2-step": ("configs/toy2d/dmd.yaml", ["method.timesteps=[999,499]"]),
    "DMD 4-step": ("configs/toy2d/dmd.yaml", [f"method.timesteps={FOUR}"]),
    "Phased DMD 2x1": ("configs/toy2d/phased_dmd.yaml", ["method.boundaries=[999,499]"]),
    "Phased DMD 4x1": ("configs/toy2d/phased_dmd.yaml", [f"method.boundaries={FOUR}"]),
}
MEMORY = {  # the memory rows: digits-sd, a few steps each, regression off (its pairs are made once, not per step)
    "DMD2 1-step": ("configs/digits_sd/dmd_lora.yaml", []),
    **{k: v for k, v in DIGITS_SD.items() if k != ABLATION},
}
COLUMNS = ["benchmark", "name", "seed", "nfe", "fid", "diversity", "diversity_vs_teacher", "recall", "precision",
           "condition_accuracy", "sw2", "modes_covered", "ms_per_image", "train_minutes", "peak_rss_mb"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def memory_child(config: str, overrides: list[str], out: str) -> None:
    from stepdistill.config import load_config
    from stepdistill.registry import method_class
    from stepdistill.training import Trainer

    extra = ["train.steps=4", "method.regression=null", "method.student_every=1", "train.log_with=none",
             "train.num_threads=1"] + (["method.phase_steps=null"] if "phased" in config else [])
    cfg = load_config(ROOT / config, [*overrides, *extra])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(cfg, method_class(cfg.method.name), Path(tmp) / "run", show_progress=False).fit()
    Path(out).write_text(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                     "rss_before_training_mb": before / 1024}))


def memory_rows(batch_size: int) -> dict[str, dict]:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, overrides) in MEMORY.items():
            res = Path(tmp) / "mem.json"
            subprocess.run([sys.executable, __file__, "--memory-child", config, json.dumps(
                [*overrides, f"train.batch_size={batch_size}"]), str(res)], check=True, cwd=ROOT)
            out[name] = json.loads(res.read_text())
            print(f"memory {name}: {out[name]}", flush=True)
    return out


def evaluate(model: str, runs: list[Path], out: Path, num_samples: int, extra: list[str]) -> list[dict]:
    if not (out / "report.json").exists():
        cmd = [sys.executable, "-m", "stepdistill", "eval", "--model", model, "--steps", "50", *extra, "--run",
               *map(str, runs), "--num-samples", str(num_samples), "--out", str(out), "--quiet"]
        print("+", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "report.json").read_text())["rows"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/phased_dmd")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/phased_dmd_bench")
    p.add_argument("--steps", type=int, default=2000, help="training steps of every digits-sd run")
    p.add_argument("--batch-size", type=int, default=64, help="digits-sd training batch")
    p.add_argument("--toy-steps", type=int, default=2000)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: toy2d, digits-sd, memory")
    p.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child[0], json.loads(args.memory_child[1]), args.memory_child[2])
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    command = "python benchmarks/phased_dmd.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    plans = {}
    if "toy2d" not in skip:
        plans["toy2d"] = [(name, seed, args.runs_dir / "toy2d" / f"{slug(name)}-seed{seed}", config,
                           [*o, f"train.seed={seed}", f"train.steps={args.toy_steps}"])
                          for name, (config, o) in TOY2D.items() for seed in seeds]
    if "digits-sd" not in skip:
        plans["digits-sd"] = [(name, seed, args.runs_dir / "digits_sd" / f"{slug(name)}-seed{seed}", config,
                               [*o, f"train.seed={seed}", f"train.steps={args.steps}",
                                f"train.batch_size={args.batch_size}", "train.num_threads=1"])
                              for name, (config, o) in DIGITS_SD.items()
                              for seed in (seeds[:1] if name == ABLATION else seeds)]
    for bench, plan in plans.items():
        t0 = time.time()
        train_jobs([(run, config, o) for _, _, run, config, o in plan], args.jobs)
        print(f"{bench}: trained in {(time.time() - t0) / 60:.1f} min", flush=True)
        extra = ["--guidance", "3"] if bench == "digits-sd" else []
        report = evaluate(bench, [run for _, _, run, _, _ in plan], args.out / bench, args.num_samples, extra)
        teacher = next(r for r in report if r["method"] == "teacher")
        by_run = {str(Path(r.get("model", "")).resolve()): r for r in report if r["method"] != "teacher"}
        rows.append({"benchmark": bench, **teacher, "name": f"teacher {teacher['name']}", "seed": None,
                     "diversity_vs_teacher": 1.0})
        for name, seed, run, _, _ in plan:
            r = by_run.get(str(run.resolve()), {})
            rows.append({"benchmark": bench, **r, "name": name, "seed": seed, "run": str(run),
                         "diversity_vs_teacher": ratio(r.get("diversity"), teacher.get("diversity")),
                         "train_minutes": training_minutes(run)})
    memory = memory_rows(args.batch_size) if "memory" not in skip else {}
    for r in rows:
        if r["benchmark"] == "digits-sd" and r["name"] in memory:
            r["peak_rss_mb"] = memory[r["name"]]["peak_rss_mb"]
    summary = summarise(rows, memory)
    out = {"command": command, "steps": args.steps, "batch_size": args.batch_size, "toy_steps": args.toy_steps,
           "seeds": seeds, "num_samples": args.num_samples, "rows": rows, "memory": memory, "summary": summary}
    (args.out / "phased_dmd.json").write_text(json.dumps(out, indent=2) + "\n")
    text = "\n".join(markdown_table(rows, COLUMNS) + ["", "| summary | value |", "|---|---|"] +
                     [f"| {k} | {v} |" for k, v in summary.items()]) + "\n"
    (args.out / "phased_dmd.md").write_text(text)
    print(text)
    return 0


def summarise(rows: list[dict], memory: dict) -> dict:
    """Mean and seed-to-seed spread (max - min) of each digits-sd method, and the memory ratios to one-step DMD."""
    out = {}
    for name in DIGITS_SD:
        rs = [r for r in rows if r["benchmark"] == "digits-sd" and r["name"] == name]
        for key in ("fid", "diversity_vs_teacher", "condition_accuracy", "recall"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                out[f"{name}: {key}"] = f"{sum(vals) / len(vals):.4g} (spread {max(vals) - min(vals):.3g}, n={len(vals)})"
    one = memory.get("DMD2 1-step", {}).get("peak_rss_mb")
    for name, m in memory.items():
        if one:
            out[f"{name}: peak RSS / one-step DMD"] = f"{m['peak_rss_mb'] / one:.3f}"
    return out


if __name__ == "__main__":
    raise SystemExit(main())
