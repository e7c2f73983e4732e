"""Hybrid sampling and control transfer on digits-sd ("Distilling Diversity and Control in Diffusion Models",
Gandikota & Bau 2025), measured in one run.

Rows (the ``stepdistill eval`` report, with x0-at-every-step grids): the teacher at DDIM-50 (CFG), the distilled
student with its recipe, and the hybrid (teacher for the first ``--base-steps`` of the student's steps, student for
the rest; one row per mode / base scheduler / base steps / base guidance): FID, per-prompt diversity, condition
accuracy, CLIP score, NFE, ms per image, and the step at which the layout settles. 'ode' base steps (DDIM on the
student's timesteps) carry the teacher's sample into the hand-off; 'recipe' base steps (LCM, the paper's setting)
re-noise the teacher's t=999 estimate with fresh noise and, on these small images, keep little of it.

Control transfer: the control LoRA (``configs/digits_sd/control_bold_lora.yaml``: bold strokes, trained on the
teacher only) is stacked on the student with ``set_adapters`` (student LoRA + control LoRA); its effect on the mean
ink per image is measured on the teacher, the student and the hybrid; transfer = effect on the student / on the
teacher.

    stepdistill train configs/digits_sd/dmd_lora.yaml "method.timesteps=[999,749,499,249]" train.steps=1500 \\
        "method.loss_weights={dm: 1.0, fake: 1.0, reg: 0.25}" --out runs/digits_sd-dmd_lora_4step  # 4-step student
    stepdistill pretrain configs/digits_sd/control_bold_lora.yaml --out runs/digits_sd-control_bold_lora
    python benchmarks/hybrid_digits_sd.py --run runs/digits_sd-dmd_lora_4step \\
        --control runs/digits_sd-control_bold_lora --base-steps 1,2 --base-scheduler ode,recipe --mode replace,add \\
        --out benchmarks/results/hybrid_digits_sd

Targets: hybrid diversity >= 0.95x the teacher's and above the student's, hybrid FID <= the student's,
hybrid accuracy within 2 points of the student's; control effect on the student >= 70% of that on the teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["name", "nfe", "fid", "diversity", "condition_accuracy", "clip_score", "ms_per_image", "settle_step"]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="the distilled student's training run (RUN/student/)")
    p.add_argument("--control", type=Path, help="the control LoRA: a run directory (RUN/export/) or a LoRA folder")
    p.add_argument("--base-steps", default="1", help="hybrid base steps, comma-separated (one row each)")
    p.add_argument("--base-guidance", default="1", help="hybrid base CFG scales, comma-separated (1: none)")
    p.add_argument("--base-scheduler", default="ode,recipe",
                   help="hybrid base schedulers, comma-separated: ode (deterministic DDIM steps on the student's "
                        "timesteps), recipe (the student's LCM, the paper's setting) or a class name; the first "
                        "setting of all three lists is the hybrid the targets are checked on")
    p.add_argument("--mode", default="replace", help="hybrid modes, comma-separated: replace (same NFE), add (+NFE)")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--teacher-guidance", type=float, default=3.0, help="the digits-sd asset samples at 3")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--control-samples", type=int, default=300, help="samples per control-transfer measurement")
    p.add_argument("--control-weight", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--x0-samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hybrid_digits_sd")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    import torch

    from stepdistill.eval.benchmark import digits_benchmark
    from stepdistill.eval.evaluate import Entry, evaluate_entry, interleaved_speed
    from stepdistill.eval.report import write_report
    from stepdistill.pipelines.loading import hybrid_recipe, load_run, load_teacher
    from stepdistill.pipelines.plan import SamplingRecipe as SamplerSpec

    t0, progress = time.time(), not args.quiet
    student = load_run(args.run)
    if student.benchmark != "digits-sd":
        p.error(f"{args.run} is not a digits-sd run ({student.benchmark})")
    teacher = load_teacher(_teacher_source(args.run))
    bench = digits_benchmark(text_to_image=True, progress=progress)
    tspec = SamplerSpec(scheduler="DDIMScheduler", num_inference_steps=args.teacher_steps,
                        guidance_scale=args.teacher_guidance)
    entries = [Entry(f"teacher {tspec.label()}", "teacher", teacher.sampler, tspec, teacher.source),
               Entry(f"student {student.spec.label()}", student.method, student.sampler, student.spec, student.source)]
    hybrids = []
    grid = [(m, s, int(b), w) for m in args.mode.split(",") for s in args.base_scheduler.split(",")
            for b in args.base_steps.split(",") for w in _floats(args.base_guidance)]
    for mode, sched, b, w in grid:  # the student's own networks, the teacher (its LoRA off) in front
        spec = hybrid_recipe(student.sampler, student.spec, b, mode, w if w > 1 else None, sched)
        hybrids.append(spec)
        entries.append(Entry(spec.label(), "hybrid", student.sampler, spec, student.source))
    rows = [evaluate_entry(bench, e, args.out, args.num_samples, args.seed, args.batch_size, progress=progress,
                           x0_samples=args.x0_samples) for e in entries]
    for row, sp in zip(rows, interleaved_speed(bench, entries, args.batch_size, 5, args.seed + args.num_samples,
                                               progress=progress)):
        row.update(sp)
    info = {**bench.settings(), "num_samples": args.num_samples, "seed": args.seed, "batch_size": args.batch_size,
                "torch_threads": torch.get_num_threads(), "run": str(args.run), "control": str(args.control)}
    write_report(rows, args.out, info)
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "settings": info, "rows": rows}
    if args.control is not None:
        result["control"] = control_transfer(args, teacher, tspec, student, hybrids[0] if hybrids else None, bench)
    result["targets"] = targets(rows, result.get("control"))
    result["minutes"] = round((time.time() - t0) / 60, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hybrid_digits_sd.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(markdown_table(rows, COLUMNS)))
    if "control" in result:
        c = result["control"]
        print("\ncontrol transfer (mean ink per image, control LoRA off -> on):")
        for k in ("teacher", "student", "hybrid"):
            if k in c:
                print(f"  {k:8s} {c[k]['off']:.4f} -> {c[k]['on']:.4f}  effect {c[k]['effect']:+.4f}")
        print(f"  transfer to the student: {c['transfer_student']:.1%}" +
              (f", to the hybrid: {c['transfer_hybrid']:.1%}" if "transfer_hybrid" in c else ""))
    checks = {k: v for k, v in result["targets"].items() if k != "hybrid"}
    print(f"\ntargets ({result['targets'].get('hybrid')}): " +
          ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items()))
    print(f"wrote {args.out / 'hybrid_digits_sd.json'} and {args.out / 'report.html'} ({result['minutes']} min)")
    return 0


def _teacher_source(run: Path) -> str:
    import yaml

    src = (yaml.safe_load((run / "config.yaml").read_text()).get("model") or {}).get("pretrained")
    return "digits-sd" if src == "asset:digits-sd" else str(src)


def control_transfer(args, teacher, tspec, student, hybrid, bench) -> dict:
    """Mean ink with the control LoRA off / on for the teacher, the student (stacked on its LoRA), the hybrid."""
    from stepdistill.eval.control import control_effect, load_control, transfer
    from stepdistill.pipelines.samplers import seeds_for

    lora = args.control / "export" if (args.control / "export").is_dir() else args.control
    conds = bench.conditions(args.control_samples)
    seeds = seeds_for(args.seed, 0, args.control_samples)
    out = {"lora": str(lora), "weight": args.control_weight, "samples": args.control_samples, "statistic": "mean_ink"}
    models = [("teacher", teacher.sampler, tspec), ("student", student.sampler, student.spec)]
    if hybrid is not None:
        models.append(("hybrid", student.sampler, hybrid))
    effects = {}
    for name, sampler, spec in models:
        load_control(sampler, lora)  # once per pipeline: the hybrid runs on the student's
        effects[name] = control_effect(name, sampler, spec, conds, seeds, args.control_weight, args.batch_size)
        out[name] = effects[name].as_dict()
    out["transfer_student"] = transfer(effects["teacher"], effects["student"])
    if "hybrid" in effects:
        out["transfer_hybrid"] = transfer(effects["teacher"], effects["hybrid"])
    return out


def targets(rows: list[dict], control: dict | None) -> dict:
    """The hybrid targets for the first hybrid row (rows: teacher, student, hybrids)."""
    teacher, student = rows[0], rows[1]
    hybrid = next((r for r in rows if r["method"] == "hybrid"), None)
    out: dict = {"hybrid": hybrid["name"]} if hybrid else {}
    if hybrid and teacher and student:
        out["diversity >= 0.95x teacher"] = hybrid["diversity"] >= 0.95 * teacher["diversity"]
        out["diversity > student"] = hybrid["diversity"] > student["diversity"]
        out["FID <= student"] = hybrid["fid"] <= student["fid"]
        out["accuracy within 2 points"] = hybrid["condition_accuracy"] >= student["condition_accuracy"] - 0.02
    if control:
        out["control transfer >= 70%"] = control["transfer_student"] >= 0.7
    return out


if __name__ == "__main__":
    sys.exit(main())
