"""The one training loop. A :class:`Method` is its networks, its update phases (data) and a pure
``losses(batch, phase) -> dict``; the :class:`Trainer` owns everything else: accelerate, precision,
optimisers, warmup, clipping, EMA, gradient accumulation, logging, progress, checkpoints and resume.

Many processes: run under ``accelerate launch``; gradients of a phase's parameters are averaged across
processes with one flat all-reduce (accelerate's ``reduce``) before the optimiser step, and only the
main process writes checkpoints, logs and artifacts.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import RunConfig, dump_config
from ..errors import TrainingFault, UsageError

CHECKPOINT_PREFIX = "step-"


@dataclass(frozen=True)
class Phase:
    """One update of a method: which networks' optimisers step, how often (every N-th step) and how many
    times in a row. DMD2's two time-scale rule is ``[Phase("fake_score", ("fake_score",)),
    Phase("student", ("student",), every=5)]``."""

    name: str
    networks: tuple[str, ...]
    every: int = 1
    repeats: int = 1

    def runs_at(self, step: int) -> bool:
        return step % self.every == 0


@dataclass
class Context:
    """What a method may use from the loop: device, autocast dtype, the run's seeded generator."""

    device: torch.device
    generator: torch.Generator  # CPU generator, checkpointed: all training randomness comes from it
    run_dir: Path | None = None
    is_main: bool = True
    num_processes: int = 1
    process_index: int = 0
    autocast_dtype: torch.dtype | None = None
    show_progress: bool = True  # progress bars of a method's own long steps (e.g. caching teacher outputs)
    stats: dict[str, Any] = field(default_factory=dict)

    def randn(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=dtype).to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x.device, x.dtype)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        return torch.randint(low, high, tuple(shape), generator=self.generator).to(self.device)


class Method(abc.ABC):
    """A training method: networks, update phases as data, pure losses. Subclasses set ``name``/``kind``."""

    name: ClassVar[str]
    kind: ClassVar[str] = "distill"  # "distill" (stepdistill train) or "pretrain" (stepdistill pretrain)
    export_network: ClassVar[str] = "student"  # the network EMA averages by default and export writes

    def __init__(self, cfg: RunConfig, ctx: Context):
        self.cfg, self.ctx = cfg, ctx

    @abc.abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Trainable networks by name; each gets an AdamW over its parameters with requires_grad."""

    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        ...

    @abc.abstractmethod
    def batch(self, phase: str) -> Any:
        """Draw the next batch for ``phase`` (use ``self.ctx`` for randomness)."""

    @abc.abstractmethod
    def losses(self, batch: Any, phase: str) -> dict[str, torch.Tensor]:
        """Per-sample (or scalar) losses by name; names are the logging keys and the ``loss_weights`` keys.
        Keys starting with ``log/`` are logged only."""

    def trainable(self, name: str, net: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """Named parameters the optimiser of network ``name`` steps (default: those with requires_grad).
        Methods whose networks share one module (LoRA adapters on a frozen base) narrow it down here."""
        return [(n, p) for n, p in net.named_parameters() if p.requires_grad]

    def loss_weights(self) -> dict[str, float]:
        return dict(getattr(self.cfg.method, "loss_weights", {}) or {})

    def after_phase(self, phase: Phase, step: int) -> None:
        """Hook after a phase's optimiser step (EMA targets, stage changes ...)."""

    def extra_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Method state beyond the trained parameters (tensors, JSON) for checkpoints."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    @abc.abstractmethod
    def export(self, out_dir: Path) -> None:
        """Write the deliverable (Diffusers folder / LoRA + sampling recipe) into ``out_dir``."""


# ---- the loop --------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: RunConfig, method_cls: type[Method], run_dir: Path | None,
                 max_steps: int | None = None, resume: bool = False, show_progress: bool = True):
        self.cfg, self.method_cls, self.run_dir = cfg, method_cls, run_dir
        self.max_steps, self.resume, self.show_progress = max_steps, resume, show_progress
        self.step = 0
        self._spent = {"wall_s": 0.0, "cpu_s": 0.0}  # training time of earlier sessions of this run (resume)
        self._clock = (time.time(), time.process_time())

    # -- setup ------------------------------------------------------------------------------------
    def _setup_accelerator(self):
        from accelerate import Accelerator

        tc = self.cfg.train
        cuda = torch.cuda.is_available() and tc.device != "cpu"
        if tc.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
        precision = tc.precision if tc.precision != "auto" else ("bf16" if cuda else "fp32")
        log_with = []
        if tc.log_with != "none" and self.run_dir is not None:
            try:
                import tensorboard  # noqa: F401

                log_with = ["tensorboard"]
            except ImportError:
                if tc.log_with == "tensorboard":
                    raise UsageError("train.log_with=tensorboard but tensorboard is not installed") from None
        from accelerate.utils import ProjectConfiguration

        project = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")) \
            if self.run_dir else None
        self.acc = Accelerator(cpu=not cuda, mixed_precision={"fp32": "no"}.get(precision, precision),
                               log_with=log_with or None, project_config=project)
        self.precision = precision
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)

    def _setup_context(self) -> Context:
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1000003 + self.acc.process_index)
        torch.manual_seed(self.cfg.train.seed)  # module init (identical on every process)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return Context(device=self.acc.device, generator=gen, run_dir=self.run_dir, is_main=self.acc.is_main_process,
                       num_processes=self.acc.num_processes, process_index=self.acc.process_index, autocast_dtype=dtype,
                       show_progress=self.show_progress and self.acc.is_main_process)

    def _setup_networks(self):
        from ..attention import configure_network

        self.nets = self.method.networks()
        self.params: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.scheds: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        for name, net in self.nets.items():
            configure_network(net, self.cfg.train)
            named = self.method.trainable(name, net)
            if not named:
                raise RuntimeError(f"network {name!r} has no trainable parameters")
            self.params[name] = named
            oc = self.cfg.train.optim_for(name)
            opt = torch.optim.AdamW([p for _, p in named], lr=oc.lr, betas=oc.betas, weight_decay=oc.weight_decay,
                                    eps=oc.eps)
            warm = oc.warmup_steps
            self.opts[name] = opt
            self.scheds[name] = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s, w=warm: min(1.0, (s + 1) / w) if w > 0 else 1.0)
        for phase in self.method.phases():
            unknown = set(phase.networks) - set(self.nets)
            if unknown:
                raise RuntimeError(f"phase {phase.name!r} names unknown networks {sorted(unknown)}")

    def _setup_ema(self):
        from diffusers.training_utils import EMAModel

        ec = self.cfg.train.ema
        self.emas: dict[str, EMAModel] = {}
        if ec.decay is None:
            return
        for name in ec.networks or [self.method.export_network]:
            if name not in self.nets:
                raise UsageError(f"train.ema.networks names {name!r}; networks are {sorted(self.nets)}")
            self.emas[name] = EMAModel([p for _, p in self.params[name]], decay=ec.decay,
                                       use_ema_warmup=ec.warmup, foreach=True)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path | None:
        self._setup_accelerator()
        self.ctx = self._setup_context()
        self.method = self.method_cls(self.cfg, self.ctx)
        self._setup_networks()
        self._setup_ema()
        if self.resume:
            self._load_latest()
        if self.acc.is_main_process and self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(self.cfg))
        if self.acc.log_with:
            self.acc.init_trackers("tensorboard")
        total = self.cfg.train.steps
        stop = min(total, self.max_steps) if self.max_steps else total
        weights = self.method.loss_weights()
        phases = self.method.phases()
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=self.step, desc=f"{self.method.name}", dynamic_ncols=True,
                   disable=not (self.show_progress and self.acc.is_main_process))
        window: dict[str, list[float]] = {}
        t0, s0 = time.time(), self.step
        self._clock = (t0, time.process_time())
        while self.step < stop:
            for phase in phases:
                if not phase.runs_at(self.step):
                    continue
                for _ in range(phase.repeats):
                    logs = self._run_phase(phase, weights)
                    for k, v in logs.items():
                        window.setdefault(k, []).append(v)
                self.method.after_phase(phase, self.step)
                for name in phase.networks:
                    if name in self.emas:
                        self.emas[name].step([p for _, p in self.params[name]])
            self.step += 1
            bar.update(1)
            if self.step % self.cfg.train.log_every == 0 or self.step == stop:
                rate = (self.step - s0) / max(time.time() - t0, 1e-9)
                row = {k: sum(v) / len(v) for k, v in window.items()}
                bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in row.items() if "/log/" not in k},
                                refresh=False)
                self._log({"step": self.step, **row, "lr": self._lr(), "it_per_s": rate, **self.elapsed()})
                window = {}
            if self.step % self.cfg.train.checkpoint_every == 0 or self.step == stop:
                self.save_checkpoint()
        bar.close()
        out = None
        if self.step >= total or self.max_steps:
            out = self._export()
        self.acc.end_training()
        return out

    def _run_phase(self, phase: Phase, weights: dict[str, float]) -> dict[str, float]:
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        accum = self.cfg.train.grad_accum
        logs: dict[str, float] = {}
        for _ in range(accum):
            batch = self.method.batch(phase.name)
            with self.acc.autocast():
                losses = self.method.losses(batch, phase.name)
            total = None
            for key, value in losses.items():
                v = value.float().mean()
                if not torch.isfinite(v):
                    last = self.latest_checkpoint()
                    keep = f"; last good checkpoint: {last}" if last else "; no checkpoint was written yet"
                    raise TrainingFault(f"non-finite loss '{key}' at step {self.step} (phase {phase.name}){keep}")
                logs[f"{phase.name}/{key}"] = logs.get(f"{phase.name}/{key}", 0.0) + v.item() / accum
                if key.startswith("log/"):
                    continue
                if key not in weights:
                    raise RuntimeError(f"loss {key!r} has no weight; add it to method.loss_weights")
                if weights[key] != 0:
                    total = weights[key] * v if total is None else total + weights[key] * v
            if total is not None:
                (total / accum).backward()
        for name in phase.networks:
            params = [p for _, p in self.params[name]]
            if self.acc.num_processes > 1:
                self._all_reduce_grads(params)
            clip = self.cfg.train.optim_for(name).grad_clip
            if clip:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                logs[f"{phase.name}/log/grad_norm_{name}"] = float(norm)
            self.opts[name].step()
            self.scheds[name].step()
        return logs

    def _all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        flat = self.acc.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def _lr(self) -> float:
        name = next(iter(self.opts))
        return self.opts[name].param_groups[0]["lr"]

    def _log(self, row: dict[str, Any]) -> None:
        if self.acc.log_with:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.acc.is_main_process and self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _export(self) -> Path | None:
        if self.run_dir is None:
            return None
        out = self.run_dir / ("student" if self.method.kind == "distill" else "export")
        stored = {}
        for name, ema in self.emas.items():
            params = [p for _, p in self.params[name]]
            ema.store(params)
            ema.copy_to(params)
            stored[name] = params
        try:
            if self.acc.is_main_process:
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                self.method.export(tmp)
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
        finally:
            for name, params in stored.items():
                self.emas[name].restore(params)
        self.acc.wait_for_everyone()
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir) if self.run_dir else None

    def save_checkpoint(self) -> Path | None:
        """model / optimiser / EMA / RNG / step state in safetensors + state.json, written atomically."""
        from safetensors.torch import save_file

        if self.run_dir is None:
            return None
        final = self.ckpt_root / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        tmp = self.ckpt_root / f".tmp-{CHECKPOINT_PREFIX}{self.step:07d}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        save_file(_rng_state(self.ctx.generator), tmp / f"rng_rank{self.acc.process_index}.safetensors")
        # replicas must hold identical weights (gradients are averaged); record each process's checksum
        checksum = torch.stack([sum(p.detach().double().sum() for _, p in named) for named in self.params.values()])
        checksums = self.acc.gather(checksum.to(self.acc.device)[None]).cpu()  # (num_processes, num_networks)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            weights = {f"{net}/{n}": p.detach().cpu().contiguous() for net, named in self.params.items()
                       for n, p in named}
            extra_t, extra_j = self.method.extra_state()
            weights.update({f"extra/{k}": v.detach().cpu().contiguous() for k, v in extra_t.items()})
            save_file(weights, tmp / "weights.safetensors")
            opt_t, opt_j = {}, {}
            for net, opt in self.opts.items():
                t, j = _flatten_optimizer(opt.state_dict())
                opt_t.update({f"{net}/{k}": v for k, v in t.items()})
                opt_j[net] = {"optimizer": j, "scheduler": self.scheds[net].state_dict()}
            save_file(opt_t or {"_empty": torch.zeros(1)}, tmp / "optimizer.safetensors")
            ema_t, ema_j = {}, {}
            for net, ema in self.emas.items():
                sd = ema.state_dict()
                ema_t.update({f"{net}/{i}": p.detach().cpu().contiguous() for i, p in enumerate(sd["shadow_params"])})
                ema_j[net] = {k: v for k, v in sd.items() if k != "shadow_params"}
            save_file(ema_t or {"_empty": torch.zeros(1)}, tmp / "ema.safetensors")
            state = {"step": self.step, "elapsed": self.elapsed(), "method": self.method.name, "optimizers": opt_j,
                     "ema": ema_j, "extra": extra_j, "num_processes": self.acc.num_processes,
                     "replica_checksums": checksums.tolist()}
            (tmp / "state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done = sorted(p for p in self.ckpt_root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").exists())
            for old in done[:-self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def _load_latest(self) -> None:
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return  # nothing to resume: start fresh
        state = json.loads((ckpt / "state.json").read_text())
        if state.get("method") != self.method.name:
            raise UsageError(f"{ckpt} was written by method {state.get('method')!r}, not {self.method.name!r}")
        self._load_weights(ckpt, state)
        self._load_optimizers(ckpt, state)
        self._load_ema(ckpt, state)
        self._load_rng(ckpt)
        self.step = int(state["step"])
        self._spent = {k: float(state.get("elapsed", {}).get(k, 0.0)) for k in self._spent}
        self._drop_metrics_after(self.step)

    def elapsed(self) -> dict[str, float]:
        """Training time of this run so far, across resumes: wall-clock and CPU seconds (all threads of this
        process; CPU time tells compute apart from waiting on a busy machine)."""
        wall, cpu = self._clock
        return {"wall_s": round(self._spent["wall_s"] + time.time() - wall, 3),
                "cpu_s": round(self._spent["cpu_s"] + time.process_time() - cpu, 3)}

    def _drop_metrics_after(self, step: int) -> None:
        """On resume, forget the metrics.jsonl rows logged after the checkpoint: those steps run again."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        if not self.acc.is_main_process or path is None or not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)

    def _load_weights(self, ckpt: Path, state: dict) -> None:
        from safetensors.torch import load_file

        weights = load_file(ckpt / "weights.safetensors")
        with torch.no_grad():
            for net, named in self.params.items():
                for n, p in named:
                    key = f"{net}/{n}"
                    if key not in weights:
                        raise UsageError(f"{ckpt} lacks {key}; the config changed since it was written")
                    p.copy_(weights[key])
        self.method.load_extra_state({k[6:]: v for k, v in weights.items() if k.startswith("extra/")},
                                     state.get("extra", {}))

    def _load_optimizers(self, ckpt: Path, state: dict) -> None:
        from safetensors.torch import load_file

        opt_t = load_file(ckpt / "optimizer.safetensors")
        for net, opt in self.opts.items():
            j = state["optimizers"][net]
            tensors = {k[len(net) + 1:]: v for k, v in opt_t.items() if k.startswith(net + "/")}
            opt.load_state_dict(_unflatten_optimizer(tensors, j["optimizer"]))
            self.scheds[net].load_state_dict(j["scheduler"])

    def _load_ema(self, ckpt: Path, state: dict) -> None:
        from safetensors.torch import load_file

        ema_t = load_file(ckpt / "ema.safetensors")
        for net, ema in self.emas.items():
            sd = dict(state["ema"][net])
            sd["shadow_params"] = [ema_t[f"{net}/{i}"] for i in range(len(ema.shadow_params))]
            ema.load_state_dict(sd)
            ema.to(device=self.acc.device)

    def _load_rng(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        rng_file = ckpt / f"rng_rank{self.acc.process_index}.safetensors"
        if not rng_file.exists():
            raise UsageError(f"{ckpt} has no RNG state for process {self.acc.process_index}; resume with the "
                             f"same number of processes it was written with")
        _set_rng_state(self.ctx.generator, load_file(rng_file))


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").exists())
    return done[-1] if done else None


def _rng_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"generator": gen.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["torch_cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(gen: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{idx}/{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(idx)][k] = "__tensor__"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"state/{idx}/{k}"] if v == "__tensor__" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

