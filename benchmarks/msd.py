"""Multi-student distillation on digits, measured in one run side by side: the teacher at DDIM-50, K = 1 (plain
one-step DMD through the same trainer), K = 2 and K = 4 same-size students at the same per-student training steps,
and K = 4 smaller students (TSM stage + DMD). One ``stepdistill eval`` report holds every row (and a row per part
of each routed student); each student row is trained with two seeds. Columns: FID, precision, recall, class
accuracy, diversity, parameters per student, ms per image at batch 100 and images/s against the teacher's DDIM-50
and against the same-size one-step student, training minutes.

    python benchmarks/msd.py --out benchmarks/results/msd
    python benchmarks/msd.py --steps 1000 --runs-dir runs/msd_bench --out runs/msd_bench/out
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _runs import train_jobs, training_minutes
from _tables import markdown_table, ratio

ROOT = Path(__file__).resolve().parents[1]
ROWS = {  # row name -> (config, overrides)
    "K=1 (one-step DMD)": ("configs/digits/msd.yaml", ["method.num_students=1"]),
    "K=2 same size": ("configs/digits/msd.yaml", ["method.num_students=2"]),
    "K=4 same size": ("configs/digits/msd.yaml", ["method.num_students=4"]),
    "K=4 smaller (TSM + DMD)": ("configs/digits/msd_small.yaml", []),
}
COLUMNS = ["name", "seed", "part", "nfe", "fid", "precision", "recall", "condition_accuracy", "diversity",
           "params_per_student", "ms_per_image", "speedup_vs_teacher", "speedup_vs_k1", "train_minutes"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def student_params(run: Path) -> int | None:
    """Parameters of one student network of a run's artifact (its first network)."""
    import safetensors

    files = sorted((run / "student").rglob("*.safetensors"))
    if not files:
        return None
    with safetensors.safe_open(str(files[0]), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/msd")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/msd_bench")
    p.add_argument("--steps", type=int, default=2000, help="DMD steps of every run (the smaller students' TSM "
                                                           "stage comes on top, scaled alike)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    command = "python benchmarks/msd.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tsm = round(args.steps * 0.75)
    plan = []
    for name, (config, overrides) in ROWS.items():
        steps = [f"train.steps={args.steps + tsm}", f"method.tsm_steps={tsm}"] if "small" in config \
            else [f"train.steps={args.steps}"]
        for seed in seeds:
            plan.append((name, seed, args.runs_dir / f"{slug(name)}-seed{seed}", config,
                         [*overrides, *steps, f"train.seed={seed}", "train.num_threads=1"]))
    t0 = time.time()
    train_jobs([(run, config, o) for _, _, run, config, o in plan], args.jobs)
    print(f"trained in {(time.time() - t0) / 60:.1f} min", flush=True)
    out = args.out / "digits"
    if not (out / "report.json").exists():
        cmd = [sys.executable, "-m", "stepdistill", "eval", "--model", "digits", "--steps", "50", "--run",
               *[str(r) for _, _, r, _, _ in plan], "--num-samples", str(args.num_samples), "--batch-size", "100",
               "--out", str(out), "--quiet"]
        print("+", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((out / "report.json").read_text())["rows"]
    teacher = next(r for r in report if r["method"] == "teacher" and r["steps"] == 50)
    rows = [{**teacher, "name": f"teacher {teacher['name']}"}]
    by_run: dict[str, list[dict]] = {}
    for r in report:
        if r["method"] != "teacher":
            by_run.setdefault(str(Path(r["model"]).resolve()), []).append(r)
    k1 = [r for name, _, run, _, _ in plan if name.startswith("K=1") for r in by_run.get(str(run.resolve()), [])[:1]]
    k1_speed = sum(r["images_per_s"] for r in k1) / len(k1) if k1 else None
    for name, seed, run, _, _ in plan:
        for r in by_run.get(str(run.resolve()), []):
            rows.append({**r, "name": name if r.get("part") is None else f"{name} · {r['part']}", "seed": seed,
                         "params_per_student": student_params(run),
                         "speedup_vs_teacher": ratio(r.get("images_per_s"), teacher.get("images_per_s")),
                         "speedup_vs_k1": ratio(r.get("images_per_s"), k1_speed),
                         "train_minutes": training_minutes(run) if r.get("part") is None else None})
    summary = {}
    for name in ROWS:
        rs = [r for r in rows if r["name"] == name]
        for key in ("fid", "condition_accuracy", "speedup_vs_k1"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                summary[f"{name}: {key}"] = f"{sum(vals) / len(vals):.4g} (spread {max(vals) - min(vals):.3g}, n={len(vals)})"
    result = {"command": command, "steps": args.steps, "tsm_steps": tsm, "seeds": seeds, "rows": rows,
              "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "msd.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join(markdown_table(rows, COLUMNS) + ["", "| summary | value |", "|---|---|"] +
                     [f"| {k} | {v} |" for k, v in summary.items()]) + "\n"
    (args.out / "msd.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
