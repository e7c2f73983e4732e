"""Trajectory-segmented consistency distillation (TSCD; Hyper-SD, Ren et al. 2024, Sec. 3.1).

The training timesteps [0, T) are split into k equal segments (``schedules.segment_edges``). For x_t at a
timestep t of the teacher's N-step DDIM grid (or a segment's upper edge), with e = the lower edge of t's
segment:
  1. student: x_e = DDIM jump of the student's own (x0, eps) at (x_t, t) down to e;
  2. teacher (no grad): one classifier-free-guided DDIM step t -> t' = max(t - T/N, e), w ~ U[w_min, w_max]
     per sample (the guidance is baked into the student, which later samples with guidance 1);
  3. target (no grad): the EMA target network's DDIM jump from (x_t', t') to e, or x_t' itself where t' = e
     (the boundary condition);
  4. loss: pseudo-Huber (or L2) between x_e and the target.
Stages k = 8 -> 4 -> 2 -> 1 run in one training run, each continuing from the previous weights (the target is
re-synced to the student when a stage starts); the stage index is checkpointed. The last stage (k = 1) makes
the student a consistency model to the clean end, so one LoRA samples at 1..8 steps with stock
``TCDScheduler`` (the exported recipe) or ``DDIMScheduler(timestep_spacing="trailing")`` (the alternative).
Optional adversarial term (Hyper-SD weights it up as k shrinks): the GAN head of ``gan.py`` on the frozen
teacher's mid-block features tells the student's x_e from real data noised to the same edge; the head trains
in every stage, the student's term has a weight per stage (``adv_weight``).
"""

from __future__ import annotations

import json
import time
from itertools import accumulate
from pathlib import Path

import torch

from .. import losses as L
from ..data import build_data
from ..denoisers import Cond, Denoiser, frozen
from ..errors import UsageError
from ..export import SamplingRecipe, export_student
from ..gan import GANHead, feature_channels, feature_module, predict_with_features
from ..generators import tcd_sample
from ..models import load_bundle
from ..schedules import lower_edge, segment_edges, solver_target_timestep, trailing_timesteps, tscd_timesteps
from .base import Method, Phase
from .common import draw_conditions, ema_update, make_target, make_trainable, teacher_view

DDIM_TRAILING_RECIPE = "sampling_ddim_trailing.json"
STAGES_FILE = "stages.json"  # RUN/stages.json: segments, steps and wall-clock seconds of each finished stage


@torch.no_grad()
def consistency_target(target: Denoiser, x_prev: torch.Tensor, t_prev: torch.Tensor, edge: torch.Tensor,
                       cond: Cond | None) -> torch.Tensor:
    """TSCD's regression target at the segment edge e: the target network's DDIM jump from (x_t', t') to e,
    and x_t' itself where t' = e (a jump of length zero; the network is not evaluated there)."""
    out = x_prev.clone()
    inside = (t_prev > edge).nonzero().squeeze(1)
    if len(inside):
        sub = cond.index(inside) if cond is not None else None
        x0, eps = target.x0_eps(x_prev[inside], t_prev[inside], sub)
        out[inside] = target.schedule.ddim_jump(x0, eps, edge[inside]).to(out.dtype)
    return out


class TSCDMethod(Method):
    name = "tscd"
    kind = "distill"
    export_network = "student"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        mc = cfg.method
        self.bundle = b = load_bundle(cfg.model, cfg.data, ctx.device)
        self.data = build_data(cfg.data, b)
        T = b.schedule.num_train_timesteps
        total = sum(s.steps for s in mc.stages)
        if total != cfg.train.steps:
            raise UsageError(f"method.stages add up to {total} steps but train.steps is {cfg.train.steps}; "
                             f"make them equal")
        if mc.teacher_steps > T or max(s.segments for s in mc.stages) > T:
            raise UsageError(f"method.teacher_steps and stage segments must not exceed the teacher's {T} timesteps")
        self.skip = T // mc.teacher_steps  # the solver's skip interval (LCM's k)
        self.stage_ends = list(accumulate(s.steps for s in mc.stages))
        shared = b.init_net if mc.student.lora else None  # LoRA: one frozen base for teacher, student, target
        self.student = make_trainable(b, "student", mc.student.lora, shared)
        self.target = make_target(b, self.student, mc.student.lora)
        self.teacher = teacher_view(b, shared)
        self.student.module.to(ctx.device).train()
        self.target.module.to(ctx.device)
        self.x0_source = mc.x0_source if mc.x0_source != "auto" else ("data" if self.data.has_real else "student")
        if self.x0_source == "data" and not self.data.has_real:
            raise UsageError(f"method.x0_source=data but data {cfg.data.name!r} has no real samples; use "
                             f"x0_source: student (data-free) or an image dataset")
        self.head = self._gan_head() if mc.gan is not None else None
        self._fake: tuple[torch.Tensor, torch.Tensor, Cond] | None = None  # last student x_e, for the discriminator
        self.steps_done = 0
        self.finished: list[dict] = []  # one record per finished stage (STAGES_FILE)
        self._enter_stage(0)

    def _gan_head(self) -> GANHead:
        if not self.data.has_real:
            raise UsageError(f"method.gan needs real data, but data {self.cfg.data.name!r} has none; set "
                             f"method.gan=null or use an image dataset")
        try:
            feature_module(self.teacher.net)
        except ValueError as e:
            raise UsageError(f"method.gan: {e}") from None
        return GANHead(feature_channels(self.teacher.net), self.cfg.method.gan.hidden,
                       flat=self.bundle.kind == "mlp").to(self.ctx.device)

    # -- stages -------------------------------------------------------------------------------------
    @property
    def stage(self):
        return self.cfg.method.stages[self.stage_index]

    def _enter_stage(self, index: int, elapsed: float = 0.0) -> None:
        self.stage_index = index
        self._stage_t0 = time.time() - elapsed
        T = self.bundle.schedule.num_train_timesteps
        self.edges = segment_edges(self.stage.segments, T)
        self.timesteps = torch.tensor(tscd_timesteps(self.cfg.method.teacher_steps, self.stage.segments, T),
                                      device=self.ctx.device)

    def after_phase(self, phase, step):
        if phase.name == "student":
            ema_update(self.target, self.student, self.cfg.method.target_decay)
        if phase.name != self.phases()[-1].name:
            return
        self.steps_done = step + 1
        if self.steps_done != self.stage_ends[self.stage_index]:
            return
        self._finish_stage()
        if self.stage_index + 1 < len(self.stage_ends):
            self._enter_stage(self.stage_index + 1)
            ema_update(self.target, self.student, 0.0)  # the new stage starts from the student's weights
            self._fake = None

    def _finish_stage(self) -> None:
        self.finished.append({"stage": self.stage_index, "segments": self.stage.segments, "steps": self.stage.steps,
                              "seconds": round(time.time() - self._stage_t0, 1)})
        if self.ctx.run_dir is not None and self.ctx.is_main:
            self.ctx.run_dir.mkdir(parents=True, exist_ok=True)
            (self.ctx.run_dir / STAGES_FILE).write_text(json.dumps(self.finished, indent=2) + "\n")

    def extra_state(self):
        tensors = {f"target/{k}": p for k, p in self.target.weights().items()}
        return tensors, {"stage": self.stage_index, "segments": self.stage.segments, "steps_done": self.steps_done,
                         "finished": self.finished, "stage_elapsed": time.time() - self._stage_t0}

    def load_extra_state(self, tensors, meta):
        stage = int(meta["stage"])
        if stage >= len(self.cfg.method.stages) or self.cfg.method.stages[stage].segments != meta["segments"]:
            raise UsageError(f"the checkpoint is in stage {stage} with {meta['segments']} segments, which "
                             f"method.stages no longer has; resume with the config it was written with")
        with torch.no_grad():
            for k, p in self.target.weights().items():
                p.copy_(tensors[f"target/{k}"])
        self.steps_done = int(meta["steps_done"])
        self.finished = list(meta.get("finished", []))
        self._enter_stage(stage, elapsed=float(meta.get("stage_elapsed", 0.0)))

    # -- structure --------------------------------------------------------------------------------
    def networks(self):
        nets = {"student": self.student.module}
        if self.head is not None:
            nets["gan_head"] = self.head
        return nets

    def trainable(self, name, net):
        if name == "student":
            return self.student.named_parameters()
        return super().trainable(name, net)

    def phases(self):
        phases = [Phase("student", ("student",))]
        if self.head is not None:
            phases.append(Phase("discriminator", ("gan_head",)))
        return phases

    def loss_weights(self):
        w = dict(self.cfg.method.loss_weights)
        for key in ("tscd", "gan_g", "gan_d"):
            w.setdefault(key, 1.0)
        return w

    # -- data ---------------------------------------------------------------------------------------
    def batch(self, phase):
        n, g, mc = self.cfg.train.batch_size, self.ctx.generator, self.cfg.method
        if phase == "discriminator":
            if self._fake is None:
                return None
            real = self.data.sample(len(self._fake[0]), g)
            x0 = real.x0.to(self.ctx.device)
            return {"fake": self._fake, "real": x0, "real_cond": self.bundle.conditioner.encode(real.labels, real.prompts),
                    "eps": self.ctx.randn_like(x0)}
        if self.x0_source == "data":
            s = self.data.sample(n, g)
            x0, cond = s.x0.to(self.ctx.device), self.bundle.conditioner.encode(s.labels, s.prompts)
        else:
            cond = draw_conditions(self.bundle, self.data, n, g)
            x0 = self._own_samples(cond, n)
        t = self.timesteps[self.ctx.randint(0, len(self.timesteps), (n,))]
        w = None
        if mc.guidance_max > 1.0:
            w = mc.guidance_min + (mc.guidance_max - mc.guidance_min) * self.ctx.rand(n)
        return {"x0": x0, "cond": cond, "t": t, "eps": self.ctx.randn_like(x0), "w": w}

    def _own_samples(self, cond: Cond, n: int) -> torch.Tensor:
        """Data-free x0: the target network's k-step segment-to-segment DDIM samples (k of this stage)."""
        z = self.ctx.randn(n, *self.bundle.sample_shape)
        ts = trailing_timesteps(self.stage.segments, self.bundle.schedule.num_train_timesteps)
        return tcd_sample(self.target.denoiser, z, cond, ts, 0.0, self.ctx.randn_like)

    # -- losses -------------------------------------------------------------------------------------
    def losses(self, batch, phase):
        if phase == "discriminator":
            return {} if batch is None else self.discriminator_losses(batch)
        return self.student_losses(batch)

    def student_losses(self, batch) -> dict[str, torch.Tensor]:
        mc, sched = self.cfg.method, self.bundle.schedule
        cond, t = batch["cond"], batch["t"]
        x_t = sched.add_noise(batch["x0"], batch["eps"], t)
        edge = lower_edge(t, self.edges)
        t_prev = solver_target_timestep(t, self.skip, self.edges)
        x0_s, eps_s = self.student.denoiser.x0_eps(x_t, t, cond)
        pred = sched.ddim_jump(x0_s, eps_s, edge)  # (B, ...) the student's point on the segment edge
        with torch.no_grad():
            x0_T, eps_T = self.teacher.x0_eps(x_t, t, cond, batch["w"])
            x_prev = sched.ddim_jump(x0_T, eps_T, t_prev)
            target = consistency_target(self.target.denoiser, x_prev, t_prev, edge, cond)
        if mc.loss == "huber":
            out = {"tscd": L.pseudo_huber(pred, target, mc.huber_c)}
        else:
            out = {"tscd": L.mse(pred.float(), target.float())}
        out["log/segments"] = torch.tensor(float(self.stage.segments))
        if self.head is not None:  # the discriminator learns in every stage; the student feels it per stage weight
            self._fake = (pred.detach(), edge, cond)
            if self.stage.adv_weight > 0:
                with frozen(self.head):
                    _, feats = predict_with_features(self.teacher, pred, edge.clamp(min=0), cond)
                    out["gan_g"] = self.stage.adv_weight * L.gan_generator(self.head(feats))
        return out

    def discriminator_losses(self, batch) -> dict[str, torch.Tensor]:
        """GAN head: the student's x_e vs real data noised to the same edges, both read through the frozen teacher."""
        fake, edge, cond = batch["fake"]
        real = self.bundle.schedule.add_noise(batch["real"], batch["eps"], edge)
        t_d = edge.clamp(min=0)
        with torch.no_grad():
            _, feats_fake = predict_with_features(self.teacher, fake, t_d, cond)
            _, feats_real = predict_with_features(self.teacher, real, t_d, batch["real_cond"])
        return {"gan_d": L.gan_discriminator(self.head(feats_real), self.head(feats_fake))}

    # -- artifacts ----------------------------------------------------------------------------------
    def recipes(self) -> tuple[SamplingRecipe, dict[str, SamplingRecipe]]:
        """The unified student's recipes: stock TCDScheduler (eta = method.eta) and DDIM with trailing spacing;
        both without CFG (guidance 1: it is baked in). Any step count 1..8 works: change num_inference_steps."""
        mc = self.cfg.method
        common = dict(num_inference_steps=mc.sampler_steps, guidance_scale=1.0, method=self.name,
                      prediction_type=self.student.denoiser.prediction_type,
                      stages=[s.segments for s in mc.stages], teacher_steps=mc.teacher_steps)
        tcd = SamplingRecipe(scheduler="TCDScheduler", scheduler_kwargs={"original_inference_steps": mc.teacher_steps},
                             eta=mc.eta, **common)
        ddim = SamplingRecipe(scheduler="DDIMScheduler", scheduler_kwargs={"timestep_spacing": "trailing"}, eta=0.0,
                              **common)
        return tcd, {DDIM_TRAILING_RECIPE: ddim}

    def export(self, out_dir: Path) -> None:
        main, alternatives = self.recipes()
        export_student(self.bundle, self.student.module, out_dir, main, adapter=self.student.adapter,
                       prediction_type=self.student.denoiser.prediction_type, alternatives=alternatives)


TSCDTrainer = TSCDMethod  # the name issue 6 uses
