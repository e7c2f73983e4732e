"""The ``stepdistill`` command: a thin entry point per subcommand (parse, build, run, clean up).

User mistakes (missing file, bad YAML, unknown key, wrong type, existing run directory ...) print one
line on stderr and exit 2, with no traceback; a run that cannot go on (non-finite weights, a full disk) one
line and exit 1; SIGINT / SIGTERM one line and exit 130 / 143, a training writing a checkpoint first
(``stepdistill.signals``). One training at a time per run directory (``training.runlock``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

from . import signals
from .errors import TrainingFault, UsageError

EXIT_USAGE, EXIT_FAULT = 2, 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        raise UsageError(f"{self.prog}: {message}")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.steps=200 train.optim.lr=2e-4 (values are YAML)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<config folder>-<config name>)")
    p.add_argument("--max-steps", type=int, help="stop after N steps (smoke tests, quick tries); the LR "
                                                  "schedule still follows train.steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the parameters of every network and an estimate of the memory "
                        "each process holds for them (networks built on the meta device: no weights are read), "
                        "and exit")
    p.add_argument("--num-gpus", type=int, metavar="N",
                   help="--dry-run: estimate for N processes (default: the launch's, else accelerate's config, else 1)")
    p.add_argument("--unet-config", type=Path, metavar="FILE",
                   help="--dry-run: build the network from this UNet config.json (or a folder with one) instead of "
                        "model.pretrained, e.g. configs/sdxl/unet.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="stepdistill", description="Distil many-step diffusion models into 1-to-8-step "
                                                     "students that load into stock Diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser("train", help="distil a student from a config (DMD, TSCD, ...)",
                       description="Train a few-step student. Writes RUN/config.yaml, RUN/metrics.jsonl, "
                                   "RUN/checkpoints/ and RUN/student/ (LoRA or UNet + sampling.json).")
    _add_run_args(p)
    p = sub.add_parser("pretrain", help="train a teacher / helper network (denoising, classifier, ...)",
                       description="Pretrain a network with the same loop (teachers of the embedded "
                                   "benchmarks, control LoRAs). Writes RUN/export/ with the result.")
    _add_run_args(p)
    import importlib

    for module in SUBCOMMAND_MODULES:  # each module's add_parser(sub) registers itself (set_defaults(func=...))
        importlib.import_module(module).add_parser(sub)
    return parser


def _run_dir(args) -> Path:
    if args.out is not None:
        return args.out
    cfg = Path(args.config)
    return Path("runs") / f"{cfg.parent.name}-{cfg.stem}" if cfg.parent.name else Path("runs") / cfg.stem


def cmd_run(args, kind: str) -> int:
    from .config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    from .registry import method_class
    from .training import Trainer

    method = method_class(cfg.method.name)
    wanted = "pretrain" if kind == "pretrain" else "distill"
    if method.kind != wanted:
        other = "pretrain" if method.kind == "pretrain" else "train"
        raise UsageError(f"method {cfg.method.name!r} is run with 'stepdistill {other}', not '{kind}'")
    if args.dry_run:
        sys.stdout.write(dump_config(cfg))
        if _is_main():
            sys.stdout.write(_dry_run_account(cfg, method, args))
        return 0
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError("--max-steps must be >= 1")
    run_dir = _run_dir(args)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a directory for the run")
    from .training.runlock import LOCK_FILE, RunLock

    with RunLock(run_dir) if _is_main() else nullcontext():
        existing = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []
        if existing and not args.resume:
            if not args.overwrite:
                raise UsageError(f"run directory {run_dir} exists; pass --resume to continue it or --overwrite "
                                 f"to replace it")
            if _is_main():
                for p in existing:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        trainer = Trainer(cfg, method, run_dir, max_steps=args.max_steps, resume=args.resume,
                          show_progress=not args.quiet)
        try:
            out = trainer.fit()
        except (KeyboardInterrupt, signals.Interrupted) as e:
            stop = e if isinstance(e, signals.Interrupted) else signals.Interrupted(signal.SIGINT)
            last = trainer.latest_checkpoint()
            again = " ".join(shlex.quote(str(a)) for a in ["stepdistill", kind, args.config, *args.overrides,
                                                           "--out", run_dir, "--resume"])
            saved = f"last checkpoint {last}; continue with: {again}" if last else "no checkpoint was written"
            print(f"stepdistill: stopped by {stop.name}; {saved}", file=sys.stderr)
            return stop.exit_code
    if out is not None and _is_main():
        print(f"stepdistill: wrote {out}")
    return 0


def _dry_run_account(cfg, method, args) -> str:
    """Networks and the per-process memory estimate (``training.memory``) as YAML comments."""
    from .training.memory import describe

    if args.num_gpus is not None and args.num_gpus < 1:
        raise UsageError("--num-gpus must be >= 1")
    if args.unet_config is not None and not args.unet_config.exists():
        raise UsageError(f"--unet-config {args.unet_config} not found")
    n, source = _process_count(args.num_gpus)
    chosen = cfg.train.distributed.strategy
    if chosen == "auto":
        chosen = "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"
    return describe(cfg, method, n, source, args.unet_config, chosen)


def _process_count(num_gpus: int | None) -> tuple[int, str]:
    """How many processes the dry run estimates for, and where the number comes from."""
    if num_gpus is not None:
        return num_gpus, "--num-gpus"
    if os.environ.get("WORLD_SIZE", "").isdigit():
        return int(os.environ["WORLD_SIZE"]), "the launch"
    try:
        from accelerate.commands.config import default_config_file, load_config_from_file

        if Path(default_config_file).is_file():
            n = getattr(load_config_from_file(default_config_file), "num_processes", None)
            if isinstance(n, int) and n >= 1:
                return n, f"accelerate config {default_config_file}"
    except (ImportError, OSError, ValueError):
        pass
    return 1, "no launch; --num-gpus N for more"


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        bad = [a for a in extra if a.startswith("-") or "=" not in a]
        if bad:
            raise UsageError(f"unrecognized arguments: {' '.join(bad)}")
        if extra:  # key=value overrides written after options
            field = next((f for f in ("overrides", "names") if hasattr(args, f)), None)
            if field is None:
                raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
            setattr(args, field, list(getattr(args, field)) + extra)
        if args.command in ("train", "pretrain"):
            return cmd_run(args, args.command)
        return args.func(args)
    except UsageError as e:
        print(f"stepdistill: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingFault as e:
        print(f"stepdistill: training stopped: {e}", file=sys.stderr)
        return EXIT_FAULT


# modules that add a subcommand: each has add_parser(subparsers) -> parser with set_defaults(func=handler)
SUBCOMMAND_MODULES: list[str] = [
    "stepdistill.sample_cli",
    "stepdistill.eval.cli",
    "stepdistill.assets.cli",
]


def entry() -> None:
    signals.install()
    from . import launch

    try:  # accelerate launch --cpu --num_processes N starts one process: start the N through torchrun
        relaunch = launch.cpu_relaunch(sys.argv[1:])
    except UsageError as e:
        print(f"stepdistill: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.exit(launch.run(relaunch) if relaunch else main())
