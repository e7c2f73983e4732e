"""The one training loop. A :class:`~.method.Method` is its networks, its update phases (data) and a pure
``losses(batch, phase) -> dict``; the :class:`Trainer` owns everything else: accelerate, precision,
optimisers, warmup, clipping, loss weights, EMA, gradient accumulation, logging, progress, checkpoints and
resume (from the newest checkpoint that verifies), and stops that lose nothing: a SIGINT / SIGTERM ends the
current step and checkpoints it (``stepdistill.signals``); non-finite weights or a failed write stop the run
with one line naming the last good checkpoint, and nothing non-finite or half-written is ever a checkpoint.

Many processes: run under ``accelerate launch`` or ``torchrun`` (a CPU launch with ``accelerate launch --cpu`` is
started again through torchrun, ``stepdistill.launch``). Accelerate builds the process group, the device and
autocast; ``train.distributed.strategy`` picks how the work is shared (:mod:`.distributed`): ddp keeps a replica
of every network per process and averages the gradients of the networks a phase steps in buckets while its
backward pass runs (DDP's reducer, applied per phase because networks are called through Denoiser views and
LoRA adapters on one shared base, not through wrappers, and the phases of a step train different adapters of that
base); fsdp shards full networks, their gradients, AdamW and EMA states and the frozen teacher with FSDP2,
gathering weights for the length of a phase (methods call networks a number of times that differs between
processes, e.g. backward simulation, so gathering per forward pass could not keep the collectives in step); LoRA
networks under fsdp are a UsageError naming ddp. Each process draws its own batches (its generator is seeded with
its rank); only the main process writes checkpoints (whole tensors under both strategies), logs and artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from safetensors import SafetensorError

from .. import signals
from ..config import RunConfig, dump_config
from ..errors import TrainingFault, UsageError
from .checkpoint import (CorruptCheckpoint, checkpoint_dir, complete_checkpoints, describe_nonfinite,
                         latest_checkpoint, nonfinite, publish, read_ema, read_optimizers, read_rng, read_weights,
                         set_aside, staging_dirs, verify, write_ema, write_optimizers, write_rng, write_state,
                         write_weights)
from .distributed import GradSync, Sharding, any_process, fsdp_refusal, full_tensor, local, resolve_strategy
from .method import Context, Method, Phase


class Trainer:
    def __init__(self, cfg: RunConfig, method_cls: type[Method], run_dir: Path | None,
                 max_steps: int | None = None, resume: bool = False, show_progress: bool = True):
        self.cfg, self.method_cls, self.run_dir = cfg, method_cls, run_dir
        self.max_steps, self.resume, self.show_progress = max_steps, resume, show_progress
        self.step = 0
        self.window: dict[str, list[float]] = {}  # loss values since the last metrics row (checkpointed)
        self._spent = {"wall_s": 0.0, "cpu_s": 0.0}  # training time of earlier sessions of this run (resume)
        self._clock = (time.time(), time.process_time())
        self.strategy = "none"  # how processes share the work (training/distributed.py): none | ddp | fsdp
        self.sync: GradSync | None = None  # ddp: averages a phase's gradients over the processes
        self.sharding: Sharding | None = None  # fsdp: the sharded networks

    # -- setup ------------------------------------------------------------------------------------
    def _setup_accelerator(self):
        from accelerate import Accelerator

        tc = self.cfg.train
        # accelerate launch --cpu sets ACCELERATE_USE_CPU, which makes accelerate run on the CPU whatever cpu= says
        forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        cuda = torch.cuda.is_available() and tc.device != "cpu" and not forced_cpu
        if tc.device == "cuda" and not cuda:
            raise UsageError("train.device=cuda but no CUDA device is visible (or accelerate launch --cpu was used); "
                             "use train.device=auto or cpu")
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
        from accelerate.utils import DistributedType

        self.strategy = resolve_strategy(tc.distributed.strategy, self.acc.num_processes,
                                         self.acc.distributed_type == DistributedType.FSDP)
        if self.acc.num_processes > 1 and self.acc.is_main_process:
            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
            print(f"stepdistill: {self.acc.num_processes} processes ({self.strategy}, {backend} on "
                  f"{self.acc.device.type})", file=sys.stderr)

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
        known = set(self.nets) | {self.method.network_group(name) for name in self.nets} - {None}
        for key in ("optim_per_network", "precision_per_network"):
            unknown = sorted(set(getattr(self.cfg.train, key)) - known)
            if unknown:
                raise UsageError(f"train.{key} names {', '.join(map(repr, unknown))}, which this method does not "
                                 f"train; its networks: {', '.join(sorted(known))}")
        self._setup_precision()
        self.params: dict[str, list[tuple[str, nn.Parameter]]] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.scheds: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        for name, net in self.nets.items():
            configure_network(net, self.cfg.train)
        self._setup_distribution()
        for name, net in self.nets.items():
            named = self.method.trainable(name, net)
            if not named:
                raise RuntimeError(f"network {name!r} has no trainable parameters")
            self.params[name] = named
            oc = self.cfg.train.optim_for(name, self.method.network_group(name))
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
        if self.strategy == "ddp":
            self.sync = GradSync({name: [p for _, p in named] for name, named in self.params.items()},
                                 int(self.cfg.train.distributed.bucket_mb * 2**20))
            self.sync.broadcast()

    def _setup_distribution(self) -> None:
        """fsdp: shard the trained networks and the frozen ones (teacher) before the optimisers see their
        parameters; a method or network fsdp cannot shard is a UsageError naming ddp."""
        if self.strategy != "fsdp":
            return
        named = {name: self.method.trainable(name, net) for name, net in self.nets.items()}
        refusal = fsdp_refusal(self.method, self.nets, named)
        if refusal:
            raise UsageError(refusal)
        trained = {id(m) for m in self.nets.values()}
        frozen = [m for m in self.method.frozen_networks().values() if id(m) not in trained]
        modules = {id(m): m for m in [*self.nets.values(), *frozen]}  # each module once
        self.sharding = Sharding(list(modules.values()), self.acc.device)

    def _setup_precision(self) -> None:
        """``train.precision_per_network``: each network's Denoiser view runs its forward passes at that precision
        (fp32: outside the loop's autocast), the others under ``train.precision``."""
        views = self.method.network_denoisers()
        for name in self.nets:
            precision = self.cfg.train.precision_for(name, self.method.network_group(name))
            if precision is None:
                continue
            if name not in views:
                raise UsageError(f"train.precision_per_network: network {name!r} has no denoiser whose precision can "
                                 f"be set; it runs under train.precision (networks with one: "
                                 f"{', '.join(sorted(views)) or 'none'})")
            views[name].precision = precision

    def _setup_ema(self):
        from diffusers.training_utils import EMAModel

        ec = self.cfg.train.ema
        self.emas: dict[str, EMAModel] = {}
        if ec.decay is None:
            return
        for name in ec.networks or self.method.ema_networks():
            if name not in self.nets:
                raise UsageError(f"train.ema.networks names {name!r}; networks are {sorted(self.nets)}")
            self.emas[name] = EMAModel([p for _, p in self.params[name]], decay=ec.decay,  # (no foreach DTensor copy)
                                       use_ema_warmup=ec.warmup, foreach=self.sharding is None)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Path | None:
        self._setup_accelerator()
        self.ctx = self._setup_context()
        self.method = self.method_cls(self.cfg, self.ctx)
        self._setup_networks()
        self._setup_ema()
        if self.acc.is_main_process and self.run_dir is not None:
            self._remove_staging()
        if self.resume:
            self._load_latest()
        if self.acc.is_main_process and self.run_dir is not None:
            with self._writing(self.run_dir / "config.yaml"):
                self.run_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.run_dir / "config.yaml.tmp"
                tmp.write_text(dump_config(self.cfg))
                os.replace(tmp, self.run_dir / "config.yaml")
        if self.acc.log_with:
            self.acc.init_trackers("tensorboard")
        total = self.cfg.train.steps
        stop = min(total, self.max_steps) if self.max_steps else total
        phases = self.method.phases()
        from tqdm.auto import tqdm

        bar = tqdm(total=stop, initial=self.step, desc=f"{self.method.name}", dynamic_ncols=True,
                   disable=not (self.show_progress and self.acc.is_main_process))
        t0, s0 = time.time(), self.step
        self._clock = (t0, time.process_time())
        with signals.deferred(), bar:  # SIGINT / SIGTERM: finish the step, checkpoint, raise Interrupted
            while self.step < stop:
                self._train_step(phases)
                bar.update(1)
                if self.step % self.cfg.train.log_every == 0 or self.step == stop:
                    rate = (self.step - s0) / max(time.time() - t0, 1e-9)
                    row = {k: sum(v) / len(v) for k, v in self.window.items()}
                    bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in row.items() if "/log/" not in k},
                                    refresh=False)
                    self._log({"step": self.step, **row, "lr": self._lr(), "it_per_s": rate, **self.elapsed()})
                    self.window = {}
                saved = self.step % self.cfg.train.checkpoint_every == 0 or self.step == stop
                if saved:
                    self.save_checkpoint()
                signum = self._stop_signal()
                if signum is not None:
                    if not saved:
                        self.save_checkpoint()
                    raise signals.Interrupted(signum)
            out = None
            if self.step >= total or self.max_steps:
                out = self._export()
        self.acc.end_training()
        return out

    def _train_step(self, phases: list[Phase]) -> None:
        """One optimisation step: every phase that runs at this step (its repeats), EMA, the method's hooks."""
        weights = self.method.loss_weights(self.step)
        for phase in phases:
            if not phase.runs_at(self.step):
                continue
            for _ in range(phase.repeats):
                logs = self._run_phase(phase, weights)
                for k, v in logs.items():
                    self.window.setdefault(k, []).append(v)
            self.method.after_phase(phase, self.step)
            for name in phase.networks:
                if name in self.emas:
                    self.emas[name].step([p for _, p in self.params[name]])
        for name in self.method.finished_networks(self.step):
            if name in self.emas:  # its training is over: from now on it is its EMA average, as it will be exported
                self.emas[name].copy_to([p for _, p in self.params[name]])
        for name in self.method.after_step(self.step):
            self._restart_ema(name)
        self.step += 1

    def _stop_signal(self) -> int | None:
        """The stop signal this process (or, with many processes, any of them) received; None: go on."""
        signum = signals.requested()
        if self.acc.num_processes > 1:  # every process stops after the same step
            flag = torch.tensor([signum or 0], device=self.acc.device)
            signum = int(self.acc.gather(flag).max()) or None
        return signum

    def _restart_ema(self, name: str) -> None:
        """The method re-set network ``name``'s weights: its EMA starts over from them."""
        if name in self.emas:
            ema = self.emas[name]
            ema.shadow_params = [p.detach().clone() for _, p in self.params[name]]
            ema.optimization_step = 0

    def _run_phase(self, phase: Phase, weights: dict[str, float]) -> dict[str, float]:
        with self.sharding.gathered() if self.sharding else nullcontext():
            return self._phase_updates(phase, weights)

    def _phase_updates(self, phase: Phase, weights: dict[str, float]) -> dict[str, float]:
        for opt in self.opts.values():
            opt.zero_grad(set_to_none=True)
        accum = self.cfg.train.grad_accum
        logs: dict[str, float] = {}
        for micro in range(accum):
            if self.sync is not None and micro == accum - 1:  # earlier micro-batches only accumulate (no_sync)
                self.sync.arm(phase.networks)
            batch = self.method.batch(phase.name)
            with self.acc.autocast():
                losses = self.method.losses(batch, phase.name)
            total = None
            for key, value in losses.items():
                v = value.float().mean()
                if not torch.isfinite(v):
                    raise TrainingFault(f"non-finite loss '{key}' at step {self.step} (phase {phase.name}); "
                                        f"{self._last_good()}")
                logs[f"{phase.name}/{key}"] = logs.get(f"{phase.name}/{key}", 0.0) + v.item() / accum
                if key.startswith("log/"):
                    continue
                if key not in weights:
                    raise RuntimeError(f"loss {key!r} has no weight; add it to method.loss_weights")
                if weights[key] != 0:
                    total = weights[key] * v if total is None else total + weights[key] * v
            if total is not None:
                (total / accum).backward()
        if self.sync is not None:
            self.sync.finish()
        for name in phase.networks:
            params = [p for _, p in self.params[name]]
            clip = self.cfg.train.optim_for(name, self.method.network_group(name)).grad_clip
            if clip:
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
                logs[f"{phase.name}/log/grad_norm_{name}"] = float(full_tensor(norm))
            self.opts[name].step()
            self.scheds[name].step()
        return logs

    def _lr(self) -> float:
        name = next(iter(self.opts))
        return self.opts[name].param_groups[0]["lr"]

    def _log(self, row: dict[str, Any]) -> None:
        if self.acc.log_with:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
        if self.acc.is_main_process and self.run_dir is not None:
            with self._writing(self.run_dir / "metrics.jsonl"), open(self.run_dir / "metrics.jsonl", "a") as f:
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
        sharded = [m for m in self.nets.values() if self.sharding and self.sharding.owns(m)]
        try:
            with self.sharding.full_weights(sharded, keep=self.acc.is_main_process) if sharded else nullcontext():
                if self.acc.is_main_process:
                    tmp = out.with_name(out.name + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    with self._writing(out, staging=tmp):
                        self.method.export(tmp)
                        shutil.rmtree(out, ignore_errors=True)
                        os.replace(tmp, out)
        finally:
            for name, params in stored.items():
                self.emas[name].restore(params)
        self.acc.wait_for_everyone()
        return out

    def elapsed(self) -> dict[str, float]:
        """Training time of this run so far, across resumes: wall-clock and CPU seconds (all threads of this
        process; CPU time tells compute apart from waiting on a busy machine)."""
        wall, cpu = self._clock
        return {"wall_s": round(self._spent["wall_s"] + time.time() - wall, 3),
                "cpu_s": round(self._spent["cpu_s"] + time.process_time() - cpu, 3)}

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.run_dir) if self.run_dir else None

    def last_good_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies (files intact; every checkpoint is finite when written)."""
        for ckpt in reversed(complete_checkpoints(self.ckpt_root) if self.run_dir else []):
            try:
                verify(ckpt)
                return ckpt
            except CorruptCheckpoint:
                continue
        return None

    def _last_good(self) -> str:
        last = self.last_good_checkpoint()
        return f"last good checkpoint: {last}" if last else "no checkpoint was written yet"

    @contextmanager
    def _writing(self, target: Path, staging: Path | None = None):
        """A full disk or another write failure: one TrainingFault line naming ``target`` and the free space;
        the ``staging`` folder is removed, the last good checkpoint stays."""
        try:
            yield
        except (OSError, SafetensorError) as e:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise TrainingFault(f"cannot write {target} ({reason}; {_free_space(target)} free there); "
                                f"{self._last_good()}") from None

    def _remove_staging(self) -> None:
        """Staging folders of a write that crashed or failed in an earlier session."""
        for tmp in staging_dirs(self.ckpt_root) + [self.run_dir / "student.tmp", self.run_dir / "export.tmp"]:
            shutil.rmtree(tmp, ignore_errors=True)

    def _nonfinite_state(self, extra: dict[str, torch.Tensor]) -> dict[str, int]:
        """What a checkpoint would hold that is NaN / inf: parameters, optimiser states, EMA shadows, extra (this
        process's part of sharded tensors)."""
        tensors = [(f"{net}/{n}", p) for net, named in self.params.items() for n, p in named]
        tensors += [(f"optimizer/{net}/{i}/{k}", v) for net, opt in self.opts.items()
                    for i, state in enumerate(opt.state.values()) for k, v in state.items()]
        tensors += [(f"ema/{net}/{i}", p) for net, ema in self.emas.items() for i, p in enumerate(ema.shadow_params)]
        tensors += [(f"extra/{k}", v) for k, v in extra.items()]
        return nonfinite((name, local(t)) for name, t in tensors)

    def _whole(self, t: torch.Tensor, keep: bool) -> torch.Tensor | None:
        """A checkpoint tensor whole where ``keep``: a sharded one gathered (on every process) and moved to the CPU
        one at a time; any other as it is (the writers copy it file by file)."""
        whole = full_tensor(t)
        if not keep:
            return None
        return whole.detach().cpu() if whole is not t else t

    def _checkpoint_tensors(self, extra: dict[str, torch.Tensor]):
        """Weights, optimiser and EMA states as whole tensors on the main process (None elsewhere); every process
        takes part in gathering the sharded ones."""
        keep = self.acc.is_main_process
        weights = {net: [(n, self._whole(p, keep)) for n, p in named] for net, named in self.params.items()}
        extra = {k: self._whole(v, keep) for k, v in extra.items()}
        opts = {}
        for net, opt in self.opts.items():
            sd = opt.state_dict()
            sd["state"] = {i: {k: self._whole(v, keep) if torch.is_tensor(v) else v for k, v in st.items()}
                           for i, st in sd["state"].items()}
            opts[net] = sd
        emas = {}
        for net, ema in self.emas.items():
            sd = ema.state_dict()
            sd["shadow_params"] = [self._whole(p, keep) for p in sd["shadow_params"]]
            emas[net] = sd
        return weights, extra, opts, emas

    def save_checkpoint(self) -> Path | None:
        """Model / optimiser / EMA / RNG / step state (see :mod:`.checkpoint`), written atomically; a state that
        is not finite is never written (TrainingFault naming the last good checkpoint)."""
        if self.run_dir is None:
            return None
        extra_t, extra_j = self.method.extra_state()
        bad = self._nonfinite_state(extra_t)
        if any_process(bool(bad), self.acc.device):
            where = describe_nonfinite(bad) if bad else "on another process"
            raise TrainingFault(f"non-finite weights at step {self.step} ({where}), not "
                                f"checkpointed; {self._last_good()}")
        final = checkpoint_dir(self.ckpt_root, self.step)
        tmp = checkpoint_dir(self.ckpt_root, self.step, staging=True)
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            with self._writing(final, staging=tmp):
                tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        with self._writing(final, staging=tmp):
            write_rng(tmp, self.acc.process_index, self.ctx.generator)
        checksums = None
        if self.sharding is None:  # replicas must hold identical weights; record each process's checksum
            checksum = torch.stack([sum(p.detach().double().sum() for _, p in named)
                                    for named in self.params.values()])
            checksums = self.acc.gather(checksum.to(self.acc.device)[None]).cpu().tolist()  # (processes, networks)
        weights, extra_full, opt_states, ema_states = self._checkpoint_tensors(extra_t)
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            with self._writing(final, staging=tmp):
                write_weights(tmp, weights, extra_full)
                opt_j = write_optimizers(tmp, opt_states, self.scheds)
                ema_j = write_ema(tmp, ema_states)
                write_state(tmp, {
                    "step": self.step, "elapsed": self.elapsed(), "method": self.method.name, "optimizers": opt_j,
                    "ema": ema_j, "extra": extra_j, "num_processes": self.acc.num_processes,
                    "strategy": self.strategy, "replica_checksums": checksums, "log_window": self.window})
                publish(tmp, final, self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def _load_latest(self) -> None:
        """Resume from the newest checkpoint that verifies; each newer one that does not is set aside with a
        one-line warning. None: start fresh."""
        skipped = []
        for ckpt in reversed(complete_checkpoints(self.ckpt_root) if self.run_dir else []):
            try:
                state = verify(ckpt)
            except CorruptCheckpoint as e:
                skipped.append(ckpt)
                if self.acc.is_main_process:
                    print(f"stepdistill: warning: skipping checkpoint {ckpt}: {e}", file=sys.stderr)
                continue
            self._load_checkpoint(ckpt, state)
            break
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            for ckpt in skipped:
                set_aside(ckpt)
        self._drop_metrics_after(self.step)

    def _load_checkpoint(self, ckpt: Path, state: dict) -> None:
        if state.get("method") != self.method.name:
            raise UsageError(f"{ckpt} was written by method {state.get('method')!r}, not {self.method.name!r}")
        self._load_weights(ckpt, state)
        self._load_optimizers(ckpt, state)
        self._load_ema(ckpt, state)
        self._load_rng(ckpt)
        self.step = int(state["step"])
        self.window = {k: list(v) for k, v in state.get("log_window", {}).items()}
        self._spent = {k: float(state.get("elapsed", {}).get(k, 0.0)) for k in self._spent}

    def _drop_metrics_after(self, step: int) -> None:
        """On resume, forget the metrics.jsonl rows logged after the checkpoint (all of them without one): those
        steps run again. A row torn by a crash while it was written is dropped too."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        if not self.acc.is_main_process or path is None or not path.exists():
            return
        text = path.read_bytes().decode("utf-8", errors="replace")
        kept = [line.strip() + "\n" for line in text.splitlines() if (_row_step(line) or step + 1) <= step]
        if "".join(kept) != text:
            tmp = path.with_suffix(".jsonl.tmp")
            with self._writing(path):
                tmp.write_text("".join(kept))
                os.replace(tmp, path)

    def _load_weights(self, ckpt: Path, state: dict) -> None:
        extra = read_weights(ckpt, self.params)
        self.method.load_extra_state(extra, state.get("extra", {}))

    def _load_optimizers(self, ckpt: Path, state: dict) -> None:
        read_optimizers(ckpt, state["optimizers"], self.opts, self.scheds)

    def _load_ema(self, ckpt: Path, state: dict) -> None:
        read_ema(ckpt, state["ema"], self.emas, self.acc.device)

    def _load_rng(self, ckpt: Path) -> None:
        read_rng(ckpt, self.acc.process_index, self.ctx.generator)


def _row_step(line: str) -> int | None:
    """The step (>= 1) of a metrics.jsonl row; None for a blank or torn line."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("step") if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            continue
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if free >= size:
                return f"{free / size:.1f} {unit}"
        return f"{free} bytes"
    return "unknown space"
