"""TSCD (Hyper-SD) on digits-sd: one unified LoRA sampled at 1, 2, 4 and 8 steps with the stock TCDScheduler
(its recipe, RUN/student/sampling.json) and with DDIM trailing (sampling_ddim_trailing.json), beside the
teacher's own DDIM at the same step counts and at 50 (FID in the shipped digit classifier's features, prompt
accuracy, CLIP score ...). Trains the run first when it has no student yet. Each part is one `stepdistill eval`
report under OUT/<part>/; OUT/tscd_digits_sd.json gathers the rows, the per-stage training times
(RUN/stages.json) and the targets, and the table is printed.

    python benchmarks/tscd_digits_sd.py --run runs/digits_sd-tscd_lora --out benchmarks/results/tscd_digits_sd
    python benchmarks/tscd_digits_sd.py --model runs/my-sd --train-overrides train.num_threads=1   (other teacher)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _tables import check, markdown_table, ratio, targets_table

COLUMNS = ["row", "scheduler", "steps", "nfe", "fid", "fid_vs_ddim50", "fid_vs_ddim_same", "condition_accuracy",
           "clip_score", "precision", "recall", "ms_per_image"]
PARTS = {"teacher": None, "tcd": "sampling.json", "ddim_trailing": "sampling_ddim_trailing.json"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/digits_sd-tscd_lora"))
    p.add_argument("--config", default="configs/digits_sd/tscd_lora.yaml", help="trains --run when it has no student")
    p.add_argument("--train-overrides", nargs="*", default=[], metavar="key=value")
    p.add_argument("--model", default="digits-sd", help="the teacher (default: the digits-sd asset)")
    p.add_argument("--guidance", type=float, help="teacher CFG scale (default: the asset's recommended one)")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default=",".join(PARTS), help="which reports to (re)make: teacher,tcd,ddim_trailing")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tscd_digits_sd"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    command = "python benchmarks/tscd_digits_sd.py " + " ".join(sys.argv[1:] if argv is None else argv)

    from stepdistill.cli import main as cli

    timing, parts = {}, args.parts.split(",")
    if set(parts) - {"teacher"} and not (args.run / "student" / "sampling.json").exists():
        t0 = time.time()
        train = ["train", args.config, "--out", str(args.run), *args.train_overrides]
        if args.model != "digits-sd":
            train.append(f"model.pretrained={args.model}")
        if cli(train + (["--quiet"] if args.quiet else [])) != 0:
            return 2
        timing["train_minutes"] = round((time.time() - t0) / 60, 1)
    common = ["--num-samples", str(args.num_samples), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
              "--benchmark", "digits-sd"] + (["--quiet"] if args.quiet else [])
    for part in parts:
        if part == "teacher":
            argv_ = ["eval", "--model", args.model, "--steps", f"{args.steps},50"]
            if args.guidance is not None:
                argv_ += ["--guidance", str(args.guidance)]
        else:
            argv_ = ["eval", "--run", str(args.run), "--steps", args.steps, "--recipe", PARTS[part]]
        t0 = time.time()
        if cli(argv_ + common + ["--out", str(args.out / part)]) != 0:
            return 2
        timing[f"{part}_eval_minutes"] = round((time.time() - t0) / 60, 1)

    reports = {part: json.loads((args.out / part / "report.json").read_text()) for part in PARTS
               if (args.out / part / "report.json").exists()}
    rows = table_rows(reports)
    stages_file = args.run / "stages.json"
    out = {"command": command, "run": str(args.run), "timing": timing,
           "stages": json.loads(stages_file.read_text()) if stages_file.exists() else None,
           "targets": targets(rows, [int(s) for s in args.steps.split(",")]),
           "settings": {k: v["settings"] for k, v in reports.items()}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tscd_digits_sd.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(out)
    (args.out / "tscd_digits_sd.md").write_text(text)
    print(text)
    return 0


def table_rows(reports: dict) -> list[dict]:
    """One row per (part, step count), with FID ratios to the teacher's DDIM-50 and DDIM at the same steps."""
    teacher = {r["steps"]: r for r in reports.get("teacher", {}).get("rows", [])}
    ref50 = (teacher.get(50) or {}).get("fid")
    rows = []
    for part, report in reports.items():
        for r in report["rows"]:
            same = (teacher.get(r["steps"]) or {}).get("fid")
            rows.append({"row": "teacher DDIM" if part == "teacher" else f"student {part}", **r,
                         "fid_vs_ddim50": ratio(r.get("fid"), ref50),
                         "fid_vs_ddim_same": None if part == "teacher" else ratio(r.get("fid"), same)})
    return rows


def targets(rows: list[dict], steps: list[int]) -> list[dict]:
    """The targets for the TCD rows: FID <= 1.2x DDIM-50 at 4 and 8 steps, <= 2.5x at 1 step, at least 2x
    lower than the teacher's DDIM at the same step count, prompt accuracy >= 0.9 from 2 steps up."""
    tcd = {r["steps"]: r for r in rows if r["row"] == "student tcd"}
    checks = []
    for s in steps:
        r = tcd.get(s)
        if r is None:
            continue
        limit = {1: 2.5, 4: 1.2, 8: 1.2}.get(s)
        if limit is not None:
            checks.append(check(f"TCD-{s} FID <= {limit}x teacher DDIM-50", r["fid_vs_ddim50"], "<=", limit))
        checks.append(check(f"TCD-{s} FID <= 0.5x teacher DDIM-{s}", r["fid_vs_ddim_same"], "<=", 0.5))
        if s >= 2:
            checks.append(check(f"TCD-{s} prompt accuracy >= 0.9", r.get("condition_accuracy"), ">=", 0.9))
    return checks


def markdown(out: dict) -> str:
    lines = markdown_table(out["rows"], COLUMNS) + [""] + targets_table(out["targets"])
    if out.get("stages"):
        lines += ["", "| stage | segments | steps | minutes |", "|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['segments']} | {s['steps']} | {s['seconds'] / 60:.1f} |" for s in out["stages"]]
    lines += ["", f"command: `{out['command']}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
