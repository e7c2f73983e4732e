"""Teacher baseline: the yardstick for every student.

DDIM at 1, 2, 4, 8, 16 and 50 steps for the digits and digits-sd teachers (FID / precision / recall in the
shipped classifier's features against the training digits, condition accuracy, CLIP score with digits-clip,
diversity, ms per image) and the exact toy2d teacher at the same steps (sliced W2, modes covered, on-mode
share). Each benchmark is one ``stepdistill eval`` report (JSON + Markdown + HTML with sample grids) under
OUT/<benchmark>/; OUT/teacher_baseline.json gathers the rows and the table is printed.

    python benchmarks/teacher_baseline.py --num-samples 1000 --out benchmarks/results/teacher_baseline
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _tables import markdown_table

STEPS = "1,2,4,8,16,50"
BENCHMARKS = ("toy2d", "digits", "digits-sd")
COLUMNS = ["benchmark", "steps", "nfe", "fid", "precision", "recall", "condition_accuracy", "clip_score",
           "diversity", "ms_per_image", "sw2", "modes_covered", "on_mode"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", default=STEPS)
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    p.add_argument("--guidance-sd", type=float, help="digits-sd CFG scale (default: the asset's recommended one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_baseline"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    command = "python benchmarks/teacher_baseline.py " + " ".join(sys.argv[1:] if argv is None else argv)

    from stepdistill.cli import main as cli

    for name in args.benchmarks.split(","):
        eval_argv = ["eval", "--model", name, "--steps", args.steps, "--num-samples", str(args.num_samples),
                     "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--out", str(args.out / name)]
        if name == "digits-sd" and args.guidance_sd is not None:
            eval_argv += ["--guidance", str(args.guidance_sd)]
        if args.quiet:
            eval_argv.append("--quiet")
        t0 = time.time()
        if cli(eval_argv) != 0:
            return 2
        run = {"command": command, "minutes": round((time.time() - t0) / 60, 1)}
        (args.out / name / "run.json").write_text(json.dumps(run) + "\n")
    rows, settings = [], {}  # every benchmark report under OUT, also those of earlier invocations
    for name in BENCHMARKS:
        f = args.out / name / "report.json"
        if f.exists():
            report = json.loads(f.read_text())
            run = args.out / name / "run.json"
            settings[name] = {**report["settings"], "created": report["created"],
                              **(json.loads(run.read_text()) if run.exists() else {})}
            rows += [{"benchmark": name, **r} for r in report["rows"]]
    out = {"settings": settings, "rows": rows}
    (args.out / "teacher_baseline.json").write_text(json.dumps(out, indent=2) + "\n")
    table = "\n".join(markdown_table(rows, COLUMNS)) + "\n"
    (args.out / "teacher_baseline.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
