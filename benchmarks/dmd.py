"""DMD / DMD2 one-step students beside their teachers on the embedded benchmarks (the one-step table).

For each benchmark, one ``stepdistill eval`` report holds the teacher at 50 DDIM steps and the student(s) of the
given run(s), sampled in the same process, so the speed ratio (images per second) is a same-run figure. A run
without a student is trained first from the benchmark's config. OUT/dmd.json gathers the rows, each run's
training wall / CPU minutes (from its metrics.jsonl) and the targets; the table is printed.

    python benchmarks/dmd.py --out benchmarks/results/dmd
    python benchmarks/dmd.py --benchmarks digits-sd --runs digits-sd=runs/a,runs/b --num-samples 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _tables import check, markdown_table, ratio, targets_table

BENCHMARKS = {  # name -> (config, default run, eval --model)
    "toy2d": ("configs/toy2d/dmd.yaml", "runs/toy2d-dmd", "toy2d"),
    "digits": ("configs/digits/dmd.yaml", "runs/digits-dmd", "digits"),
    "digits-sd": ("configs/digits_sd/dmd_lora.yaml", "runs/digits_sd-dmd_lora", "digits-sd"),
}
COLUMNS = ["benchmark", "name", "model", "steps", "nfe", "fid", "fid_vs_teacher", "precision", "recall",
           "condition_accuracy", "diversity", "sw2", "sw2_vs_teacher", "modes_covered", "ms_per_image",
           "speedup", "train_minutes", "train_cpu_minutes"]
# one-step targets: benchmark -> (FID ratio limit, accuracy floor, sW2 ratio limit, training minutes limit,
# images/s ratio floor). toy2d's teacher is a closed formula, not a network: no speed target there.
TARGETS = {"toy2d": (None, None, 2.0, 2.0, None), "digits": (1.25, 0.95, None, 20.0, 30.0),
           "digits-sd": (1.5, 0.9, None, None, 30.0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    p.add_argument("--runs", nargs="*", default=[], metavar="BENCHMARK=RUN[,RUN...]",
                   help="run directories per benchmark (default: runs/<benchmark>-dmd...)")
    p.add_argument("--train-overrides", nargs="*", default=[], metavar="key=value",
                   help="overrides when a run has to be trained first")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/dmd"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    command = "python benchmarks/dmd.py " + " ".join(sys.argv[1:] if argv is None else argv)
    names = [n for n in args.benchmarks.split(",") if n]  # --benchmarks "": only regather the reports under OUT
    bad = [n for n in names + [item.split("=", 1)[0] for item in args.runs] if n not in BENCHMARKS]
    if bad or any("=" not in item for item in args.runs):
        p.error(f"benchmarks are {', '.join(BENCHMARKS)}; --runs takes BENCHMARK=RUN[,RUN...] (got {bad or args.runs})")
    runs = {k: [Path(r) for r in v.split(",")] for k, v in (item.split("=", 1) for item in args.runs)}

    from stepdistill.cli import main as cli

    quiet = ["--quiet"] if args.quiet else []
    for name in names:
        config, default_run, model = BENCHMARKS[name]
        for run in runs.setdefault(name, [Path(default_run)]):
            if not (run / "student" / "sampling.json").exists():
                train = ["train", config, "--out", str(run), "--resume", *args.train_overrides, *quiet]
                if cli(train) != 0:
                    return 2
        argv_ = ["eval", "--model", model, "--steps", "50", "--run", *map(str, runs[name]),
                 "--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size),
                 "--seed", str(args.seed), "--out", str(args.out / name), *quiet]
        t0 = time.time()
        if cli(argv_) != 0:
            return 2
        (args.out / name / "run.json").write_text(json.dumps({"command": command,
                                                               "eval_minutes": round((time.time() - t0) / 60, 1)}))
    rows, settings = [], {}
    for name in BENCHMARKS:  # every benchmark report under OUT, also those of earlier invocations
        f = args.out / name / "report.json"
        if f.exists():
            report = json.loads(f.read_text())
            run_file = args.out / name / "run.json"
            settings[name] = {**report["settings"], **(json.loads(run_file.read_text()) if run_file.exists() else {})}
            rows += benchmark_rows(name, report["rows"])
    out = {"command": command, "settings": settings, "rows": rows, "targets": targets(rows)}
    (args.out / "dmd.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(out)
    (args.out / "dmd.md").write_text(text)
    print(text)
    return 0


def training_time(run: str | None) -> tuple[float | None, float | None]:
    """Wall and CPU minutes of a run's training, from the last metrics.jsonl row (counted across resumes)."""
    f = Path(run) / "metrics.jsonl" if run else None
    if f is None or not f.exists():
        return None, None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    if not rows or "wall_s" not in rows[0]:  # logged (in part) before runs kept their clock: unknown
        return None, None
    wall, cpu = rows[-1].get("wall_s"), rows[-1].get("cpu_s")
    return (None if wall is None else wall / 60), (None if cpu is None else cpu / 60)


def benchmark_rows(name: str, report_rows: list[dict]) -> list[dict]:
    """The report's rows with ratios to the teacher's DDIM-50 row (FID, sliced W2, images per second)."""
    teacher = next(r for r in report_rows if r["method"] == "teacher" and r["steps"] == 50)
    out = []
    for r in report_rows:
        student = r is not teacher
        wall, cpu = training_time(r.get("model")) if student else (None, None)
        out.append({"benchmark": name, **r, "fid_vs_teacher": ratio(r.get("fid"), teacher.get("fid")),
                    "sw2_vs_teacher": ratio(r.get("sw2"), teacher.get("sw2")),
                    "speedup": ratio(r.get("images_per_s"), teacher.get("images_per_s")) if student else None,
                    "train_minutes": wall, "train_cpu_minutes": cpu})
    return out


def targets(rows: list[dict]) -> list[dict]:
    checks = []
    for r in rows:
        if r["method"] == "teacher":
            continue
        fid_max, acc_min, sw2_max, minutes_max, speedup_min = TARGETS[r["benchmark"]]
        tag = f"{r['benchmark']} {r['name']}"
        if fid_max is not None:
            checks.append(check(f"{tag}: FID <= {fid_max}x teacher DDIM-50", r["fid_vs_teacher"], "<=", fid_max))
        if acc_min is not None:
            checks.append(check(f"{tag}: accuracy >= {acc_min}", r.get("condition_accuracy"), ">=", acc_min))
        if sw2_max is not None:
            checks.append(check(f"{tag}: sliced W2 <= {sw2_max}x teacher DDIM-50", r["sw2_vs_teacher"], "<=",
                                 sw2_max))
            checks.append(check(f"{tag}: all modes covered", r.get("modes_covered"), ">=", 8))
        if minutes_max is not None:
            checks.append(check(f"{tag}: training <= {minutes_max} min (wall)", r["train_minutes"], "<=",
                                 minutes_max))
        if speedup_min is not None:
            checks.append(check(f"{tag}: >= {speedup_min}x teacher-50 images/s", r["speedup"], ">=", speedup_min))
    return checks


def markdown(out: dict) -> str:
    lines = markdown_table(out["rows"], COLUMNS) + [""] + targets_table(out["targets"]) + [""]
    lines += [f"{name}: `{s['command']}` ({s.get('eval_minutes')} min)" for name, s in out["settings"].items()
              if "command" in s]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
