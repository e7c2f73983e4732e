"""Multi-student distillation measured in one run side by side, one ``stepdistill eval`` report per benchmark (with
a row per part of each routed student).

digits (class-conditional): the teacher at DDIM-50, K = 1 (plain one-step DMD through the same trainer), K = 2 and
K = 4 same-size students at the same per-student training steps (every ``student_every``-th step updates each
student once), and K = 4 smaller students (TSM stage + DMD); each student row trained with two seeds. Columns: FID,
precision, recall, class accuracy, diversity, parameters per student, ms per image at batch 100 and images/s
against the teacher's DDIM-50 and against the same-size one-step student, training minutes.

digits-sd (text-to-image): the teacher at DDIM-50 (w = 3), the one-student DMD LoRA (K = 1) and K LoRA students
behind the prompt-embedding router: FID, prompt accuracy, CLIP score, diversity, ms per image.

Runs missing a student are trained first (``--jobs`` at a time, one thread each); finished runs are reused.

    python benchmarks/msd.py --out benchmarks/results/msd
    python benchmarks/msd.py --steps 1000 --batch-size 32 --runs-dir runs/msd_bench --out runs/msd_bench/out
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _runs import train_jobs, training_minutes
from _tables import check, markdown_table, ratio, targets_table

ROOT = Path(__file__).resolve().parents[1]
DIGITS = {  # row name -> (config, overrides)
    "K=1 (one-step DMD)": ("configs/digits/msd.yaml", ["method.num_students=1"]),
    "K=2 same size": ("configs/digits/msd.yaml", ["method.num_students=2"]),
    "K=4 same size": ("configs/digits/msd.yaml", ["method.num_students=4"]),
    "K=4 smaller (TSM + DMD)": ("configs/digits/msd_small.yaml", []),
}
DIGITS_SD = {
    "one-student DMD LoRA": ("configs/digits_sd/msd_lora.yaml", ["method.num_students=1"]),
    "K=4 LoRAs, prompt router": ("configs/digits_sd/msd_lora.yaml", ["method.num_students=4"]),
}
COLUMNS = ["benchmark", "name", "seed", "part", "nfe", "fid", "precision", "recall", "condition_accuracy",
           "clip_score", "diversity", "params_per_student", "ms_per_image", "speedup_vs_teacher", "speedup_vs_k1",
           "train_minutes"]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def student_params(run: Path) -> int | None:
    """Parameters of one student network of a run's artifact (its first network)."""
    import safetensors

    files = sorted((run / "student").rglob("*.safetensors"))
    if not files:
        return None
    with safetensors.safe_open(str(files[0]), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def evaluate(model: str, runs: list[Path], out: Path, num_samples: int, extra: list[str]) -> list[dict]:
    if not (out / "report.json").exists():
        cmd = [sys.executable, "-m", "stepdistill", "eval", "--model", model, "--steps", "50", *extra, "--run",
               *map(str, runs), "--num-samples", str(num_samples), "--batch-size", "100", "--out", str(out),
               "--quiet"]
        print("+", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((out / "report.json").read_text())["rows"]


def table_rows(bench: str, plan: list, report: list[dict], first: str) -> list[dict]:
    """The teacher's DDIM-50 row, then each run's row and its parts, with speed ratios against the teacher and
    against the mean of the ``first`` row's runs (the one-student DMD)."""
    teacher = next(r for r in report if r["method"] == "teacher" and r["steps"] == 50)
    rows = [{**teacher, "benchmark": bench}]
    by_run: dict[str, list[dict]] = {}
    for r in report:
        if r["method"] != "teacher":
            by_run.setdefault(str(Path(r["model"]).resolve()), []).append(r)
    k1 = [r for name, _, run, _, _ in plan if name == first for r in by_run.get(str(run.resolve()), [])[:1]]
    k1_speed = sum(r["images_per_s"] for r in k1) / len(k1) if k1 else None
    for name, seed, run, _, _ in plan:
        for r in by_run.get(str(run.resolve()), []):
            rows.append({**r, "benchmark": bench, "name": name, "seed": seed,
                         "params_per_student": student_params(run),
                         "speedup_vs_teacher": ratio(r.get("images_per_s"), teacher.get("images_per_s")),
                         "speedup_vs_k1": ratio(r.get("images_per_s"), k1_speed),
                         "train_minutes": training_minutes(run) if r.get("part") is None else None})
    return rows


def mean_spread(rows: list[dict], name: str, key: str) -> tuple[float | None, float | None]:
    vals = [r[key] for r in rows if r["name"] == name and r.get("part") is None and r.get(key) is not None]
    return (sum(vals) / len(vals), max(vals) - min(vals)) if vals else (None, None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/msd")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/msd_bench")
    p.add_argument("--steps", type=int, default=2000, help="DMD steps of every digits run (the smaller students' "
                                                           "TSM stage comes on top: 0.75 x as many)")
    p.add_argument("--batch-size", type=int, default=64, help="digits training batch")
    p.add_argument("--sd-steps", type=int, default=500, help="DMD steps of every digits-sd run")
    p.add_argument("--sd-batch-size", type=int, default=16, help="digits-sd training batch")
    p.add_argument("--seeds", default="0,1", help="seeds of every digits student row")
    p.add_argument("--sd-seeds", default="0", help="seeds of every digits-sd student row")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--eval-only", action="store_true", help="train nothing: score the runs that have a student and "
                                                             "list the missing ones")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out (digits, digits-sd)")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    command = "python benchmarks/msd.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tsm = round(args.steps * 0.75)
    plans: dict[str, list] = {"digits": [], "digits-sd": []}
    for seed in map(int, args.seeds.split(",")):
        for name, (config, overrides) in DIGITS.items():
            steps = [f"train.steps={args.steps + tsm}", f"method.tsm_steps={tsm}"] if "small" in config \
                else [f"train.steps={args.steps}"]
            plans["digits"].append((name, seed, args.runs_dir / "digits" / f"{slug(name)}-seed{seed}", config,
                                    [*overrides, *steps, f"train.batch_size={args.batch_size}", f"train.seed={seed}",
                                     "train.num_threads=1"]))
    for seed in map(int, args.sd_seeds.split(",")):
        for name, (config, overrides) in DIGITS_SD.items():
            plans["digits-sd"].append((name, seed, args.runs_dir / "digits-sd" / f"{slug(name)}-seed{seed}", config,
                                       [*overrides, f"train.steps={args.sd_steps}",
                                        f"train.batch_size={args.sd_batch_size}", f"train.seed={seed}",
                                        "train.num_threads=1"]))
    plans = {k: v for k, v in plans.items() if k not in skip}
    # training order: the rows the targets compare first (K = 1 and K = 4, then the smaller students, then
    # digits-sd), K = 2 last, so an interrupted benchmark has the comparisons that matter
    first = {"K=1 (one-step DMD)": 0, "K=4 same size": 0, "K=4 smaller (TSM + DMD)": 1, "K=2 same size": 3}
    queue = sorted(((first.get(name, 2), seed, run, config, o) for plan in plans.values()
                    for name, seed, run, config, o in plan), key=lambda x: (x[0], x[1]))
    missing = []
    if args.eval_only:
        done = lambda run: (run / "student" / "sampling.json").exists()  # noqa: E731
        missing = [f"{b}: {name} seed {seed}" for b, plan in plans.items() for name, seed, run, _, _ in plan
                   if not done(run)]
        plans = {b: [x for x in plan if done(x[2])] for b, plan in plans.items()}
        plans = {b: plan for b, plan in plans.items() if plan}
    else:
        t0 = time.time()
        train_jobs([(run, config, o) for _, _, run, config, o in queue], args.jobs)
        print(f"trained in {(time.time() - t0) / 60:.1f} min", flush=True)

    rows, checks, summary = [], [], {}
    for bench, plan in plans.items():
        extra = ["--guidance", "3"] if bench == "digits-sd" else []
        report = evaluate(bench, [run for _, _, run, _, _ in plan], args.out / bench, args.num_samples, extra)
        names = list(DIGITS if bench == "digits" else DIGITS_SD)
        rs = table_rows(bench, plan, report, names[0])
        rows += rs
        for name in names:
            for key in ("fid", "condition_accuracy", "speedup_vs_k1"):
                m, s = mean_spread(rs, name, key)
                if m is not None:
                    summary[f"{bench} {name}: {key}"] = f"{m:.4g} (spread {s:.3g})"
        teacher_fid = rs[0]["fid"]
        if bench == "digits":
            k1, k1_spread = mean_spread(rs, names[0], "fid")
            k4, k4_spread = mean_spread(rs, names[2], "fid")
            small, _ = mean_spread(rs, names[3], "fid")
            small_acc, _ = mean_spread(rs, names[3], "condition_accuracy")
            small_speed, _ = mean_spread(rs, names[3], "speedup_vs_k1")
            gap = None if k1 is None or k4 is None else k1 - k4
            checks += [check("digits: FID(K=1) - FID(K=4), above the larger seed spread "
                             f"({max(k1_spread or 0, k4_spread or 0):.3g})", gap, ">=",
                             max(k1_spread or 0, k4_spread or 0)),
                       check("digits (stretch): K=4 FID <= teacher DDIM-50 FID", k4, "<=", teacher_fid),
                       check("digits: smaller students' images/s vs same-size one-step", small_speed, ">=", 2.0),
                       check("digits: smaller students' FID <= 1.5 x teacher", small, "<=", 1.5 * teacher_fid),
                       check("digits: smaller students' class accuracy", small_acc, ">=", 0.95)]
        else:
            one, _ = mean_spread(rs, names[0], "fid")
            many, _ = mean_spread(rs, names[1], "fid")
            acc, _ = mean_spread(rs, names[1], "condition_accuracy")
            checks += [check("digits-sd: routed students' prompt accuracy", acc, ">=", 0.98),
                       check("digits-sd: routed students' FID <= one-student DMD LoRA's", many, "<=", one)]
    result = {"command": command, "steps": args.steps, "tsm_steps": tsm, "batch_size": args.batch_size,
              "sd_steps": args.sd_steps, "sd_batch_size": args.sd_batch_size, "rows": rows, "summary": summary,
              "targets": checks, "missing_runs": missing}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "msd.json").write_text(json.dumps(result, indent=2) + "\n")
    text = "\n".join([f"`{command}`", "", *markdown_table(rows, COLUMNS), "", "| summary | value |", "|---|---|",
                      *[f"| {k} | {v} |" for k, v in summary.items()], "", *targets_table(checks),
                      *([""] + [f"- not trained: {m}" for m in missing] if missing else [])]) + "\n"
    (args.out / "msd.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
