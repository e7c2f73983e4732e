"""``stepdistill sample``: draw images (or toy points) from a training run's student, with its recipe, or from
a teacher at a chosen step count. Seeds are per sample: image i uses seed + i whatever the batch size."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .errors import UsageError


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("sample", help="sample a trained student (its sampling recipe) or a teacher",
                       description="Sample a run's student with RUN/student/sampling.json (stock Diffusers "
                                   "scheduler, LoRA loaded into the stock pipeline), or a teacher with DDIM. "
                                   "Writes DIR/grid.png and one PNG per sample (toy2d: a scatter plot and "
                                   "points.safetensors).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="training run directory (uses RUN/student)")
    src.add_argument("--model", help="teacher: toy2d, digits, digits-sd or a local Diffusers folder")
    p.add_argument("--prompt", action="append", help="prompt (repeatable) for text-to-image models")
    p.add_argument("--labels", help="class ids, e.g. 0,1,2 (class-conditional models); default 0..9")
    p.add_argument("--num", type=int, default=8, help="samples per prompt / label (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="override the number of steps (teachers: default 50)")
    p.add_argument("--guidance", type=float, help="override the CFG scale")
    p.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default ./samples)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--hybrid-base-steps", type=int, metavar="N",
                   help="--run: the run's teacher takes the first N steps of the student's recipe, the student the "
                        "rest (hybrid sampling, Gandikota & Bau 2025)")
    p.add_argument("--hybrid-mode", choices=["replace", "add"], default="replace",
                   help="replace: same NFE (default); add: the base steps come in front of the whole recipe")
    p.add_argument("--hybrid-base-guidance", type=float, metavar="W", help="CFG scale of the base steps (default none)")
    p.add_argument("--hybrid-base-scheduler", default="ode", metavar="NAME",
                   help="base steps' scheduler: ode (default: deterministic DDIM / Euler steps on the student's "
                        "timesteps), recipe (the student's own, e.g. LCM, as in the paper) or NAME[:key=value,...]")
    p.add_argument("--x0-grid", action="store_true",
                   help="also write DIR/x0_grid.png: each step's decoded x0-prediction (a column per step) for "
                        "the first samples")
    p.set_defaults(func=run)
    return p


def _conditions(args, loaded):
    from .pipelines.samplers import Conditions

    bench = loaded.benchmark
    if args.prompt:
        prompts = [p for p in args.prompt for _ in range(args.num)]
        return Conditions(prompts=prompts)
    if bench == "digits-sd":
        from .data.prompts import digit_prompt

        labels = _labels(args.labels, 10)
        return Conditions(labels=torch.tensor([l for l in labels for _ in range(args.num)]),
                          prompts=[digit_prompt(l) for l in labels for _ in range(args.num)])
    if bench == "digits" or args.labels:
        classes = 10 if bench == "digits" else getattr(getattr(loaded.sampler, "conditioner", None), "num_classes",
                                                       None)
        labels = _labels(args.labels, classes)
        return Conditions(labels=torch.tensor([l for l in labels for _ in range(args.num)]))
    if bench == "toy2d":
        return Conditions()
    raise UsageError("this model needs --prompt (text-to-image) or --labels (class-conditional)")


def _labels(text: str | None, num_classes: int | None = None) -> list[int]:
    if not text:
        return list(range(10))
    try:
        labels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--labels must be comma-separated integers, got {text!r}") from None
    top = num_classes if num_classes is not None else float("inf")
    if not labels or any(not 0 <= l < top for l in labels):
        known = f"0..{num_classes - 1}" if num_classes is not None else "ids >= 0"
        raise UsageError(f"--labels {text}: this model knows class {known}")
    return labels


def run(args) -> int:
    from .eval.images import save_grid, save_scatter
    from .pipelines.loading import hybrid_recipe, load_run, load_teacher
    from .pipelines.plan import SamplingRecipe

    if args.num < 1 or args.batch_size < 1:
        raise UsageError("--num and --batch-size must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: give a thread count >= 1")
        torch.set_num_threads(args.threads)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps}: give a step count >= 1")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder for the samples")
    if args.labels is not None:  # before any model loads (the range again once it has, for other models)
        _labels(args.labels, 10 if args.model in ("digits", "digits-sd") else None)
    if args.hybrid_base_steps is not None and (not args.run or args.hybrid_base_steps < 1):
        raise UsageError("--hybrid-base-steps N needs --run RUN_DIR (the student) and N >= 1")
    loaded = load_run(args.run) if args.run else load_teacher(args.model)
    spec = loaded.spec or SamplingRecipe(scheduler="DDIMScheduler", num_inference_steps=50)
    if args.steps is not None:
        spec = spec.with_steps(args.steps)
    if args.guidance is not None:
        spec = spec.model_copy(update={"guidance_scale": args.guidance})
    if args.hybrid_base_steps is not None:
        spec = hybrid_recipe(loaded.sampler, spec, args.hybrid_base_steps, args.hybrid_mode,
                             args.hybrid_base_guidance, args.hybrid_base_scheduler)
    conds = _conditions(args, loaded)
    n = len(conds) if len(conds) else args.num * 100
    seeds = list(range(args.seed, args.seed + n))
    outs = []
    for i in range(0, n, args.batch_size):
        j = min(n, i + args.batch_size)
        outs.append(loaded.sampler(spec, conds.slice(i, j) if len(conds) else conds, seeds[i:j]))
    x = torch.cat(outs)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {args.out}: {e.strerror or e}") from None
    if loaded.sampler.output == "points":
        from safetensors.torch import save_file

        path = save_scatter(x, args.out / "points.png", title=f"{loaded.source}: {spec.label()}")
        save_file({"points": x.contiguous()}, args.out / "points.safetensors")
    else:
        from PIL import Image

        for k, img in enumerate(x):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(args.out / f"{seeds[k]:06d}.png")
        path = save_grid(x, args.out / "grid.png", nrow=args.num, scale=4)
        if args.x0_grid:
            from .eval.trajectory import save_x0_grid, trace
            from .pipelines.samplers import Conditions

            idx = list(range(0, n, args.num))[:10]  # the first sample of each prompt / label
            sub = Conditions(None if conds.labels is None else conds.labels[idx],
                             None if conds.prompts is None else [conds.prompts[i] for i in idx])
            save_x0_grid(trace(loaded.sampler, spec, sub, [seeds[i] for i in idx]), args.out / "x0_grid.png")
    print(f"stepdistill: wrote {len(x)} samples ({spec.label()}) to {args.out}; overview {path}")
    return 0
