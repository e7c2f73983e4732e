"""One-step DMD on a suite of two-dimensional Gaussian mixtures, each run end to end the way a user would:
pretrain the init network on the mixture (``stepdistill pretrain configs/toy2d/mlp.yaml data...``), train the
one-step student with one fixed recipe (``configs/toy2d/dmd.yaml`` + the same data keys + ``model.init``), and
evaluate it against the exact teacher's DDIM-50 on the same mixture (``stepdistill eval --model toy2d --run``).

The mixtures are generated from a seed: rings, grids and random placements, 4 to 36 modes, std 0.03 to 0.2,
equal and very unequal weights (up to 1:20), conditional and unconditional. Columns: modes covered, on-mode share
and sliced W2, each also as a ratio to the exact teacher's DDIM-50 on the same mixture, and training minutes; the
summary gives the median and the worst over the suite.

    python benchmarks/toy2d_suite.py --out benchmarks/results/toy2d_suite
    python benchmarks/toy2d_suite.py --only grid25 --set method.loss_weights.reg=1.0 --tag reg1   (an ablation)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mixtures(seed: int = 0) -> dict[str, dict]:
    """name -> toy2d data keys. Twelve mixtures spanning layout, mode count, width, weights and conditioning."""
    rng = random.Random(seed)

    def ring(k, r, std):
        return [[round(r * math.cos(2 * math.pi * i / k), 4), round(r * math.sin(2 * math.pi * i / k), 4)]
                for i in range(k)], std

    def grid(n, span, std):
        pts = [-span + 2 * span * i / (n - 1) for i in range(n)]
        return [[round(x, 4), round(y, 4)] for x in pts for y in pts], std

    def scatter(k, box, std, min_gap):
        out = []
        while len(out) < k:
            p = [round(rng.uniform(-box, box), 4), round(rng.uniform(-box, box), 4)]
            if all(math.dist(p, q) >= min_gap for q in out):
                out.append(p)
        return out, std

    def unequal(k):  # geometric weights from 1 to 20, in a shuffled order
        w = [20 ** (i / (k - 1)) for i in range(k)]
        rng.shuffle(w)
        return [round(x, 4) for x in w]

    specs = {
        "ring4-wide": (ring(4, 2.0, 0.2), None, False),
        "ring12-sharp": (ring(12, 2.0, 0.03), None, False),
        "ring16-unequal": (ring(16, 2.5, 0.05), "unequal", False),
        "ring8-cond": (ring(8, 2.0, 0.1), None, True),
        "grid9": (grid(3, 1.5, 0.1), None, False),
        "grid25": (grid(5, 2.0, 0.05), None, False),
        "grid36-sharp": (grid(6, 2.5, 0.03), None, False),
        "grid16-unequal": (grid(4, 2.0, 0.07), "unequal", False),
        "grid25-cond": (grid(5, 2.0, 0.05), None, True),
        "random6-wide": (scatter(6, 2.5, 0.15, 1.2), None, False),
        "random20": (scatter(20, 3.0, 0.05, 0.6), "unequal", False),
        "random30-cond": (scatter(30, 3.0, 0.04, 0.5), None, True),
    }
    out = {}
    for name, ((means, std), weights, cond) in specs.items():
        d = {"means": means, "std": std, "conditional": cond}
        if weights == "unequal":
            d["weights"] = unequal(len(means))
        out[name] = d
    return out


def data_overrides(d: dict) -> list[str]:
    return [f"data.{k}={json.dumps(v)}" for k, v in d.items()]


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        p = subprocess.run([sys.executable, "-m", "stepdistill", *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): stepdistill {' '.join(cmd)}; see {log}")


def one(name: str, data: dict, runs: Path, extra: list[str], init_extra: list[str], num_samples: int) -> dict:
    """Pretrain the init (unless the recipe brings its own), train the student, evaluate; returns the rows."""
    d = runs / name
    d.mkdir(parents=True, exist_ok=True)
    log = d / "suite.log"
    t0 = time.time()
    data_o = data_overrides(data)
    init = d / "init"
    uses_auto = any(o.startswith("model.init=") for o in extra)
    if not uses_auto and not (init / "export" / "config.json").exists():
        run(["pretrain", "configs/toy2d/mlp.yaml", *data_o, *init_extra, "train.num_threads=1", "--out", str(init),
             "--overwrite", "--quiet"], log)
    t_init = time.time() - t0
    student = d / "dmd"
    if not (student / "student" / "sampling.json").exists():
        init_o = [] if uses_auto else [f"model.init={init / 'export'}"]
        run(["train", "configs/toy2d/dmd.yaml", *data_o, *init_o, *extra, "train.num_threads=1", "--out",
             str(student), "--resume", "--quiet"], log)
    t_train = time.time() - t0 - t_init
    rep = d / "eval"
    if not (rep / "report.json").exists():
        run(["eval", "--model", "toy2d", "--run", str(student), "--steps", "50", "--num-samples", str(num_samples),
             "--batch-size", str(num_samples), "--no-speed", "--out", str(rep), "--quiet"], log)
    teacher, st = json.loads((rep / "report.json").read_text())["rows"][:2]
    ratio = lambda a, b: None if a is None or not b else a / b  # noqa: E731
    return {"mixture": name, "modes": teacher["num_modes"], "std": data["std"],
            "weights": "1:20" if "weights" in data else "equal", "conditional": data["conditional"],
            "teacher_modes_covered": teacher["modes_covered"], "modes_covered": st["modes_covered"],
            "modes_ratio": ratio(st["modes_covered"], teacher["modes_covered"]),
            "teacher_on_mode": teacher["on_mode"], "on_mode": st["on_mode"],
            "on_mode_ratio": ratio(st["on_mode"], teacher["on_mode"]),
            "teacher_sw2": teacher["sw2"], "sw2": st["sw2"], "sw2_ratio": ratio(st["sw2"], teacher["sw2"]),
            "init_minutes": t_init / 60, "train_minutes": t_train / 60}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/toy2d_suite")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs/toy2d_suite")
    p.add_argument("--seed", type=int, default=0, help="seed of the mixture generator")
    p.add_argument("--only", default="", help="comma-separated mixture names (default: all)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the DMD recipe")
    p.add_argument("--init-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the init pretraining")
    p.add_argument("--tag", default="default", help="name of this recipe variant (its runs and table)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    mix = mixtures(args.seed)
    names = [n for n in args.only.split(",") if n] or list(mix)
    unknown = sorted(set(names) - set(mix))
    if unknown:
        p.error(f"unknown mixtures {unknown}; choose from {list(mix)}")
    runs = args.runs_dir / args.tag
    t0 = time.time()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as ex:
        rows = list(ex.map(lambda n: one(n, mix[n], runs, args.set, args.init_set, args.num_samples), names))
    minutes = (time.time() - t0) / 60
    summary = {}
    for key, worst in (("modes_ratio", min), ("on_mode_ratio", min), ("sw2_ratio", max)):
        vals = sorted(r[key] for r in rows if r[key] is not None)
        if vals:
            summary[key] = {"median": vals[len(vals) // 2] if len(vals) % 2 else
                            (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2, "worst": worst(vals)}
    result = {"command": "python benchmarks/toy2d_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "tag": args.tag, "overrides": args.set, "wall_minutes": minutes, "rows": rows, "summary": summary}
    out = args.out / args.tag
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["mixture", "modes", "std", "weights", "conditional", "teacher_modes_covered", "modes_covered",
            "modes_ratio", "teacher_on_mode", "on_mode", "on_mode_ratio", "teacher_sw2", "sw2", "sw2_ratio",
            "init_minutes", "train_minutes"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _tables import markdown_table

    text = "\n".join([f"`{result['command']}` ({minutes:.1f} min)", "", *markdown_table(rows, cols), "",
                      "| over the suite | median | worst |", "|---|---|---|",
                      *[f"| {k} | {v['median']:.3g} | {v['worst']:.3g} |" for k, v in summary.items()]]) + "\n"
    (out / "suite.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
