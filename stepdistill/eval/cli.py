"""``stepdistill eval``: score teachers at several step counts, training runs' students, or an image folder;
write DIR/report.json, report.md and report.html (see ``stepdistill.eval.report``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..errors import UsageError
from .features import INCEPTION_ENV, INCEPTION_FILE, inception_file

EXAMPLES = """examples:
  stepdistill eval --model digits --steps 1,2,4,8,50 --num-samples 1000 --out runs/eval-digits
  stepdistill eval --model digits-sd --steps 4,50 --guidance 3 --out runs/eval-sd
  stepdistill eval --run runs/digits-dmd --model digits --steps 50 --out runs/eval-dmd
  stepdistill eval --run runs/digits_sd-tscd_lora --steps 1,2,4,8 --out runs/eval-tscd      (one student, 4 rows)
  stepdistill eval --run runs/digits_sd-tscd_lora --steps 1,2,4,8 --recipe sampling_ddim_trailing.json --out ...
  stepdistill eval --model digits-sd --steps 50 --run runs/digits_sd-dmd_lora --hybrid-base-steps 1 --out runs/eval-hyb
                                                   (teacher, student and teacher-then-student hybrid rows, x0 grids)
  stepdistill eval --images samples/ --out runs/eval-folder          (subfolders 0..9 give digit labels)
  stepdistill eval --model ./my-sd15 --prompts prompts.txt --ref ./coco-val --clip-model ViT-B-32 \\
      --clip-pretrained openai --out runs/eval-sd15                   (Inception / CLIP weights: downloaded)
  stepdistill eval --model ./my-sd15 --prompts prompts.txt --ref ./coco-val --inception inception-2015-12-05.pt \\
      --clip-pretrained ./CLIP-ViT-B-32 --out runs/eval-sd15          (offline: local weights, Hub-layout folder)
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="FID / precision-recall / CLIP score / diversity / speed report with pictures",
                       description="Evaluate teachers (--model) at given step counts, students of training runs "
                                   "(--run) or a folder of images (--images). Writes DIR/report.json, report.md "
                                   "and report.html.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--model", help="toy2d, digits, digits-sd, or a local Diffusers folder")
    src.add_argument("--run", nargs="+", type=Path, metavar="RUN_DIR", help="training run(s) with RUN/student/")
    src.add_argument("--images", type=Path, metavar="FOLDER", help="a folder of images of one size")
    smp = p.add_argument_group("sampling (--model)")
    smp.add_argument("--steps", help="comma-separated step counts (default 1,2,4,8,50); given with --run, students "
                                     "whose recipe does not fix its timesteps (e.g. TSCD) get one row per count")
    smp.add_argument("--recipe", default="sampling.json", metavar="FILE",
                     help="--run: the recipe file in RUN/student/ (default sampling.json; e.g. "
                          "sampling_ddim_trailing.json, a TSCD student's DDIM-trailing alternative)")
    smp.add_argument("--scheduler", default="DDIMScheduler", help="Diffusers scheduler class (default DDIM)")
    smp.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    smp.add_argument("--eta", type=float, help="scheduler eta (DDIM / TCD)")
    smp.add_argument("--hybrid-base-steps", type=int, metavar="N",
                     help="--run: add a hybrid row per run: its teacher for the first N steps of the student's "
                          "recipe, the student for the rest (Gandikota & Bau 2025)")
    smp.add_argument("--hybrid-mode", choices=["replace", "add"], default="replace",
                     help="replace: the base steps replace the student's first steps (same NFE, default); add: "
                          "they come in front of the whole recipe (+N NFE)")
    smp.add_argument("--hybrid-base-guidance", type=float, metavar="W",
                     help="CFG scale of the hybrid's base steps (default: none, as in the paper)")
    smp.add_argument("--hybrid-base-scheduler", default="ode", metavar="NAME",
                     help="base steps' scheduler: ode (default: deterministic DDIM / Euler steps on the student's "
                          "timesteps), recipe (the student's own, e.g. LCM, as in the paper) or NAME[:key=value,...]")
    smp.add_argument("--data", nargs="+", metavar="KEY=VALUE",
                     help="--model toy2d: the mixture, as data keys of a toy2d run config (e.g. num_modes=16 "
                          "std=0.05, or means='[[0,0],[2,2]]' weights='[1,20]'); default: the runs' mixture, else "
                          "the 8-mode ring")
    smp.add_argument("--num-samples", type=int, default=1000, help="samples per row (default 1000)")
    smp.add_argument("--batch-size", type=int, default=100, help="generation batch size; speed is measured at "
                                                                "it (default 100)")
    smp.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED+i (default 0)")
    met = p.add_argument_group("metrics")
    met.add_argument("--benchmark", choices=["auto", "toy2d", "digits", "digits-sd", "generic"], default="auto",
                     help="what to score against (auto: from the model / run; images: digits unless --ref)")
    met.add_argument("--ref", type=Path, metavar="FOLDER", help="reference images for FID (generic: Inception)")
    met.add_argument("--prompts", type=Path, metavar="FILE", help="prompts, one a line (text-to-image models)")
    met.add_argument("--classifier", type=Path, metavar="FOLDER",
                     help="digit classifier folder (default: the shipped digits-classifier asset)")
    met.add_argument("--clip-model", help="open_clip model name (default digits-clip on the digits benchmarks)")
    met.add_argument("--clip-pretrained", metavar="TAG|FILE|FOLDER",
                     help="open_clip weights: a tag (e.g. openai, downloaded), a folder in Hugging Face Hub layout "
                          "(open_clip_config.json + open_clip_model.safetensors or open_clip_pytorch_model.bin; "
                          "--clip-model then optional) or a weights file of --clip-model's architecture")
    met.add_argument("--inception", type=Path, metavar="FILE",
                     help=f"clean-fid's Inception weights ({INCEPTION_FILE}) for FID with --ref (default: "
                          f"${INCEPTION_ENV}, else clean-fid's copy, downloaded on first use)")
    met.add_argument("--no-speed", action="store_true", help="skip the timing rounds (no ms/image column)")
    met.add_argument("--speed-repeats", type=int, default=5, metavar="N",
                     help="timing rounds after generation: each round times one batch of every row in turn, so "
                          "background load hits all rows alike; ms/image is the median over rounds (default 5)")
    met.add_argument("--x0-grids", type=int, metavar="N",
                     help="trace N samples per row: x0 at every step (grid in the report) and the step at which "
                          "the layout settles (default 10 with --hybrid-base-steps, else 0)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--cache-dir", type=Path, help="reference statistics cache (default ~/.cache/stepdistill/fid)")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


DEFAULT_STEPS = "1,2,4,8,50"


def parse_steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--steps {text!r}: give comma-separated positive integers, e.g. 1,2,4,8,50") from None
    if not steps or any(s < 1 for s in steps):
        raise UsageError(f"--steps {text!r}: give comma-separated positive integers, e.g. 1,2,4,8,50")
    return steps


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible; use --device auto or cpu")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def _check_args(args) -> None:
    if args.images is None and args.model is None and not args.run:
        raise UsageError("say what to evaluate: --model NAME|FOLDER, --run RUN_DIR or --images FOLDER")
    if args.images is not None and (args.model is not None or args.run):
        raise UsageError("--images cannot be combined with --model or --run")
    if args.num_samples < 2 or args.batch_size < 1:
        raise UsageError("--num-samples must be >= 2 and --batch-size >= 1")
    if args.steps is not None:
        parse_steps(args.steps)
    if args.speed_repeats < 1:
        raise UsageError("--speed-repeats must be >= 1 (or pass --no-speed)")
    if args.data and args.model != "toy2d":
        raise UsageError("--data describes a toy2d mixture: use it with --model toy2d")
    if args.hybrid_base_steps is not None and (not args.run or args.hybrid_base_steps < 1):
        raise UsageError("--hybrid-base-steps N needs --run RUN_DIR (the student) and N >= 1")
    if Path(args.recipe).name != args.recipe or args.recipe in (".", ".."):
        raise UsageError(f"--recipe {args.recipe!r}: give a file name in RUN/student/, e.g. sampling.json")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder for the report")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: give a thread count >= 1")
    if args.ref is not None and (args.inception or os.environ.get(INCEPTION_ENV)):
        inception_file(args.inception)  # a wrong path fails before any model loads


def run(args) -> int:
    from .benchmark import missing_metrics
    from .report import markdown, write_report

    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_average = _load_average()
    device = _device(args.device)
    progress = not args.quiet
    out = args.out
    if args.images is not None:
        from .evaluate import evaluate_folder

        from .images import folder_labels, list_images

        files = list_images(args.images)  # bad folders fail before any model loads
        bench = _images_benchmark(args, device, progress)
        rows = [evaluate_folder(bench, args.images, out, device, progress)]
        missing = missing_metrics(bench, folder=True,
                                  labelled=folder_labels(files, args.images.expanduser()) is not None)
    else:
        from .evaluate import evaluate_entry

        bench, entries = _entries(args, device, progress)
        from .evaluate import interleaved_speed

        x0 = args.x0_grids if args.x0_grids is not None else (10 if args.hybrid_base_steps else 0)
        rows = []
        for e in entries:
            rows.append(evaluate_entry(bench, e, out, args.num_samples, args.seed, args.batch_size, device, progress,
                                       x0_samples=x0))
        if not args.no_speed:
            for row, sp in zip(rows, interleaved_speed(bench, entries, args.batch_size, args.speed_repeats,
                                                       args.seed + args.num_samples, device, progress)):
                row.update(sp)
        rows = [r for row in rows for r in (row, *row.pop("part_rows", []))]  # a routed row, then its parts
        missing = missing_metrics(bench)
    settings = {**bench.settings(), "num_samples": args.num_samples, "seed": args.seed, "batch_size": args.batch_size,
                "device": str(device), "mem_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss",
                "torch_threads": torch.get_num_threads(), "load_average_at_start": load_average,
                "speed": None if args.images is not None or args.no_speed else
                f"median of {args.speed_repeats} interleaved rounds of one batch per row"}
    if missing:
        settings["missing_metrics"] = missing
    report = write_report(rows, out, settings)
    sys.stdout.write(markdown(report))
    for metric, why in missing.items():  # what was not computed, and the flag that would compute it
        print(f"stepdistill: {metric}: {why}")
    print(f"stepdistill: wrote {out / 'report.json'}, report.md, report.html")
    return 0


def _load_average() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (None where the OS has none)."""
    import os

    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _images_benchmark(args, device, progress):
    from .benchmark import digits_benchmark, generic_benchmark

    name = args.benchmark
    if name == "auto":
        name = "generic" if args.ref is not None else "digits"
    if name in ("digits", "digits-sd"):
        return digits_benchmark(name == "digits-sd", classifier=_classifier(args, device), clip=None, device=device,
                                cache_root=args.cache_dir, progress=progress)  # a folder has no prompts
    if name == "generic":
        return generic_benchmark(str(args.ref) if args.ref else None, device=device, cache_root=args.cache_dir,
                                 progress=progress, inception=args.inception)
    raise UsageError(f"--benchmark {name} does not score image folders; use digits, digits-sd or generic")


def _classifier(args, device):
    if args.classifier is None:
        return None
    from ..classifier import load_classifier

    return load_classifier(args.classifier, device)


def _clip_choice(args, device):
    if args.clip_model is None and args.clip_pretrained is None:
        return "auto"
    from .clip_score import CLIPScorer

    return CLIPScorer(args.clip_model, args.clip_pretrained, device)


def _entries(args, device, progress):
    from ..pipelines.loading import hybrid_recipe, load_run, load_teacher
    from ..pipelines.plan import SamplingRecipe
    from .evaluate import Entry

    students = [load_run(r, device, recipe=args.recipe) for r in args.run or []]
    loaded = []
    if args.model is not None:
        data_cfg = _toy_mixture(args, students) if args.model == "toy2d" else None
        loaded.append(load_teacher(args.model, device, data_cfg=data_cfg,
                                   benchmark=None if args.benchmark == "auto" else args.benchmark))
    loaded += students
    names = {x.benchmark for x in loaded}
    if args.benchmark != "auto":
        names = {args.benchmark}
    if len(names) > 1:
        raise UsageError(f"--model and --run name different benchmarks ({', '.join(sorted(names))}); evaluate them "
                         f"in separate reports or pass --benchmark")
    bench = _benchmark(names.pop(), loaded, args, device, progress)
    entries = []
    if args.model is not None:
        teacher = loaded[0]
        guidance, why = _teacher_guidance(args, teacher, students)
        bench.notes["teacher_guidance"] = ("none" if guidance is None else f"{guidance:g}") + f" ({why})"
        for s in parse_steps(args.steps or DEFAULT_STEPS):
            spec = SamplingRecipe(scheduler=args.scheduler, num_inference_steps=s, guidance_scale=guidance,
                                  eta=args.eta)
            entries.append(Entry(f"teacher {spec.label()}", "teacher", teacher.sampler, spec, teacher.source))
    for r, st in zip(args.run or [], students):
        any_count = not st.spec.timesteps and not st.spec.segments and st.spec.router is None
        counts = parse_steps(args.steps) if args.steps and any_count else [None]
        for s in counts:  # a student that samples at any step count (TSCD): one row per count
            spec = st.spec if s is None else st.spec.with_steps(s)
            entries.append(Entry(f"{Path(r).name} {spec.label()}", st.method, st.sampler, spec, st.source))
        if args.hybrid_base_steps:  # the same networks, the teacher in front (a two-segment plan)
            spec = hybrid_recipe(st.sampler, st.spec, args.hybrid_base_steps, args.hybrid_mode,
                                 args.hybrid_base_guidance, args.hybrid_base_scheduler)
            entries.append(Entry(f"{Path(r).name} {spec.label()}", "hybrid", st.sampler, spec, st.source))
    return bench, entries


def _toy_mixture(args, students):
    """The toy2d teacher's mixture: ``--data``, else the runs' (which must agree), else the default ring. A run
    trained on another mixture than ``--data`` is refused: its rows would be judged against the wrong data."""
    from ..config import Toy2DData, apply_override, validate
    from ..data.toy2d import same_mixture

    runs = [(r, s.data_cfg) for r, s in zip(args.run or [], students) if getattr(s.data_cfg, "name", None) == "toy2d"]
    if args.data:
        raw: dict = {"name": "toy2d"}
        for item in args.data:
            apply_override(raw, item)
        cfg = validate(raw, Toy2DData, source="--data")
        for r, c in runs:
            if not same_mixture(cfg, c):
                raise UsageError(f"run {r} was trained on another toy2d mixture than --data; drop --data to judge "
                                 f"it against its own mixture, or evaluate it in a separate report")
        return cfg
    for r, c in runs[1:]:
        if not same_mixture(runs[0][1], c):
            raise UsageError(f"runs {runs[0][0]} and {r} were trained on different toy2d mixtures; evaluate them in "
                             f"separate reports")
    return runs[0][1] if runs else Toy2DData()


def _teacher_guidance(args, teacher, students) -> tuple[float | None, str]:
    """The teacher rows' CFG scale and where it comes from: ``--guidance``, else the evaluated runs' real-score
    guidance (``method.real_guidance``: the guided teacher the students were distilled toward, so the teacher rows
    show what they imitate), else the model's recommended value."""
    if args.guidance is not None:
        return args.guidance, "--guidance"
    runs = {s.source: float(g) for s in students
            if isinstance(g := (s.info.get("method") or {}).get("real_guidance"), (int, float))}
    if len(set(runs.values())) == 1:
        return next(iter(runs.values())), ("the run's" if len(runs) == 1 else "the runs'") + " real-score guidance"
    model = _default_guidance(teacher)
    why = "the model's recommended value" if model is not None else "the model records no recommended value"
    if runs:  # runs distilled with different scales: no one of them is the teacher they all saw
        why += "; the runs' real-score guidance differs (" + ", ".join(f"{Path(k).name}: {v:g}"
                                                                      for k, v in runs.items()) + ")"
    return model, why


def _default_guidance(loaded) -> float | None:
    info = loaded.info or {}
    for key in ("guidance_scale", "guidance"):
        if isinstance(info.get(key), (int, float)):
            return float(info[key])
        if isinstance(info.get("metrics"), dict) and isinstance(info["metrics"].get(key), (int, float)):
            return float(info["metrics"][key])
    return None


def _benchmark(name, loaded, args, device, progress):
    from .benchmark import digits_benchmark, generic_benchmark, read_prompts, toy2d_benchmark

    if name == "toy2d":
        from ..config import Toy2DData

        from ..data.toy2d import same_mixture

        cfgs = [x.data_cfg for x in loaded if getattr(x.data_cfg, "name", None) == "toy2d"] or [Toy2DData()]
        if any(not same_mixture(cfgs[0], c) for c in cfgs[1:]):  # --run without --model: runs must agree too
            raise UsageError("the runs were trained on different toy2d mixtures; evaluate them in separate reports")
        return toy2d_benchmark(cfgs[0])
    if name in ("digits", "digits-sd"):
        bench = digits_benchmark(name == "digits-sd", classifier=_classifier(args, device),
                                 clip=_clip_choice(args, device), device=device, cache_root=args.cache_dir,
                                 progress=progress)
        judged = ("resolution", "split", "dilate", "templates")  # what makes a run's data another reference
        data = {x.source: {k: v for k, v in x.data_cfg.model_dump().items() if k in judged}
                for x in loaded if x.data_cfg is not None}
        if len({repr(sorted(d.items())) for d in data.values()}) > 1:  # one reference, runs trained on other data
            bench.notes["run_data_differs"] = "; ".join(f"{k}: {v}" for k, v in data.items())
        return bench
    prompts = read_prompts(args.prompts) if args.prompts else None
    cond = getattr(loaded[0].sampler, "conditioner", None)
    num_classes = getattr(cond, "num_classes", None)
    return generic_benchmark(str(args.ref) if args.ref else None, prompts, num_classes, args.clip_model,
                             args.clip_pretrained, device, args.cache_dir, progress, inception=args.inception)
