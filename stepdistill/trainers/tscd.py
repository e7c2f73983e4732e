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
teacher's mid-block features tells the student's x_e (detached) from real data noised to the same edge, in
the same update as the student (one phase, two optimisers: ``gan_d`` reaches only the head, ``gan_g`` only the
student); the head trains in every stage, the student's term ``gan_g`` is weighted per stage
(``loss_weights(step)``: ``gan_g`` times the stage's ``adv_weight``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from .. import losses as L
from ..config import GANConfig, MethodConfig, Strict, StudentNetConfig
from ..data import build_data
from ..denoisers import Cond, Denoiser, frozen
from ..errors import UsageError
from ..gan import GANHead, feature_channels, feature_module, predict_with_features
from ..generators import tcd_sample
from ..models import load_bundle
from ..pipelines.plan import SamplingRecipe
from ..schedules import lower_edge, segment_edges, solver_target_timestep, trailing_timesteps, tscd_timesteps
from ..training import Method, Phase, StageLog
from .common import draw_conditions, ema_update, make_target, make_trainable, teacher_view

DDIM_TRAILING_RECIPE = "sampling_ddim_trailing.json"
STAGES_FILE = "stages.json"  # RUN/stages.json: segments, steps and wall-clock seconds of each finished stage


class TSCDStage(Strict):
    """One stage of progressive TSCD: the trajectory split into ``segments`` equal segments for ``steps`` steps."""

    segments: int = Field(..., ge=1, le=1000)
    steps: int = Field(..., ge=1, description="optimisation steps of this stage")
    adv_weight: float = Field(0.0, ge=0, description="weight of the adversarial term in this stage (needs "
                                                     "method.gan, whose head trains in every stage); Hyper-SD "
                                                     "raises it as segments shrink")


class TSCDConfig(MethodConfig):
    """Trajectory-segmented consistency distillation (Hyper-SD, Ren et al. 2024, Sec. 3.1): consistency
    distillation inside k equal segments, k = 8 -> 4 -> 2 -> 1 in one run; one student for 1..8 steps."""

    name: Literal["tscd"] = "tscd"
    teacher_steps: int = Field(50, ge=2, description="N of the teacher's DDIM solver grid (skip interval T // N)")
    stages: list[TSCDStage] = Field(
        default_factory=lambda: [TSCDStage(segments=k, steps=250) for k in (8, 4, 2, 1)], min_length=1,
        description="in order; their steps must add up to train.steps")
    guidance_min: float = Field(1.0, ge=1.0, description="teacher CFG scale w ~ U[guidance_min, guidance_max] "
                                                         "per sample, baked into the student")
    guidance_max: float = Field(1.0, ge=1.0)
    loss: Literal["huber", "l2"] = "huber"
    huber_c: float = Field(1e-3, gt=0, description="pseudo-Huber c (LCM uses 0.001)")
    target_decay: float = Field(0.95, ge=0, lt=1, description="EMA decay of the target network (0: the student "
                                                              "itself, without gradient)")
    x0_source: Literal["auto", "data", "student"] = Field(
        "auto", description="clean samples noised to x_t: real data, or (data-free) the target network's "
                            "k-step samples; auto: data when the data source has real samples")
    student: StudentNetConfig = StudentNetConfig()
    gan: GANConfig | None = Field(None, description="adversarial term: a head on the frozen teacher's mid-block "
                                                    "features, real data noised to the segment edge")
    sampler_steps: int = Field(4, ge=1, description="num_inference_steps of the exported recipes")
    eta: float = Field(0.3, ge=0, le=1, description="TCDScheduler eta (gamma) of the exported recipe")
    loss_weights: dict[str, float] = Field(default_factory=lambda: {"tscd": 1.0, "gan_g": 1.0, "gan_d": 1.0},
                                           description="gan_g is scaled by the adv_weight of each stage")

    @model_validator(mode="after")
    def _check(self):
        if self.guidance_min > self.guidance_max:
            raise ValueError("guidance_min must not exceed guidance_max")
        if self.gan is None and any(s.adv_weight > 0 for s in self.stages):
            raise ValueError("a stage has adv_weight > 0 but method.gan is null; set method.gan: {hidden: 64}")
        return self


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
    config = TSCDConfig
    export_network = "student"
    fsdp_unsupported = "its EMA target is an unsharded twin that copies the student weight by weight"

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
        self.stages = StageLog([s.steps for s in mc.stages], STAGES_FILE, ctx.run_dir, ctx.is_main,
                               describe=lambda i: {"segments": mc.stages[i].segments})
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
    def stage_index(self) -> int:
        return self.stages.index

    @property
    def stage(self):
        return self.cfg.method.stages[self.stage_index]

    def _enter_stage(self, index: int) -> None:
        T = self.bundle.schedule.num_train_timesteps
        segments = self.cfg.method.stages[index].segments
        self.edges = segment_edges(segments, T)
        self.timesteps = torch.tensor(tscd_timesteps(self.cfg.method.teacher_steps, segments, T),
                                      device=self.ctx.device)

    def after_phase(self, phase, step):
        if phase.name == "student":
            ema_update(self.target, self.student, self.cfg.method.target_decay)

    def after_step(self, step):
        if self.stages.step_done(step) and step + 1 < self.stages.total:
            self._enter_stage(self.stage_index)
            ema_update(self.target, self.student, 0.0)  # the new stage starts from the student's weights
        return ()

    def extra_state(self):
        tensors = {f"target/{k}": p for k, p in self.target.weights().items()}
        return tensors, {**self.stages.state(), "segments": self.stage.segments}

    def load_extra_state(self, tensors, meta):
        stage = int(meta["stage"])
        if stage >= len(self.cfg.method.stages) or self.cfg.method.stages[stage].segments != meta["segments"]:
            raise UsageError(f"the checkpoint is in stage {stage} with {meta['segments']} segments, which "
                             f"method.stages no longer has; resume with the config it was written with")
        with torch.no_grad():
            for k, p in self.target.weights().items():
                p.copy_(tensors[f"target/{k}"])
        self.stages.load_state(meta)
        self._enter_stage(stage)

    # -- structure --------------------------------------------------------------------------------
    def networks(self):
        nets = {"student": self.student.module}
        if self.head is not None:
            nets["gan_head"] = self.head
        return nets

    def network_denoisers(self):
        return {"student": self.student.denoiser}

    def trainable(self, name, net):
        if name == "student":
            return self.student.named_parameters()
        return super().trainable(name, net)

    def phases(self):
        return [Phase("student", ("student", "gan_head") if self.head is not None else ("student",))]

    def loss_weights(self, step):
        w = super().loss_weights(step)
        w["gan_g"] = self._adv_weight(self.stages.stage_at(step))
        return w

    def _adv_weight(self, stage: int) -> float:
        """The student's adversarial weight in ``stage``: ``loss_weights.gan_g`` times the stage's adv_weight."""
        mc = self.cfg.method
        return mc.loss_weights["gan_g"] * mc.stages[stage].adv_weight

    # -- data ---------------------------------------------------------------------------------------
    def batch(self, phase):
        """Clean samples and their conditions, training timesteps, noise, the teacher's CFG scales
        w ~ U[guidance_min, guidance_max] (None: no guidance) and, with the GAN head, a real batch and the noise
        that takes it to the edges."""
        n, g, mc = self.cfg.train.batch_size, self.ctx.generator, self.cfg.method
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
        out = {"x0": x0, "cond": cond, "t": t, "eps": self.ctx.randn_like(x0), "w": w}
        if self.head is not None:
            real = self.data.sample(n, g)
            out["real"] = real.x0.to(self.ctx.device)
            out["real_cond"] = self.bundle.conditioner.encode(real.labels, real.prompts)
            out["real_eps"] = self.ctx.randn_like(out["real"])
        return out

    def _own_samples(self, cond: Cond, n: int) -> torch.Tensor:
        """Data-free x0: the target network's k-step segment-to-segment DDIM samples (k of this stage)."""
        z = self.ctx.randn(n, *self.bundle.sample_shape)
        ts = trailing_timesteps(self.stage.segments, self.bundle.schedule.num_train_timesteps)
        return tcd_sample(self.target.denoiser, z, cond, ts, 0.0, self.ctx.randn_like)

    # -- losses -------------------------------------------------------------------------------------
    def _edge_point(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, e, x_e): the batch noised to t, the lower edge e of t's segment and the student's point on it,
        the DDIM jump of its own (x0, eps) at (x_t, t) down to e."""
        sched, t, cond = self.bundle.schedule, batch["t"], batch["cond"]
        x_t = sched.add_noise(batch["x0"], batch["eps"], t)
        edge = lower_edge(t, self.edges)
        x0_s, eps_s = self.student.denoiser.x0_eps(x_t, t, cond)
        return x_t, edge, sched.ddim_jump(x0_s, eps_s, edge)  # (B, ...)

    def losses(self, batch, phase):
        mc, sched = self.cfg.method, self.bundle.schedule
        cond, t = batch["cond"], batch["t"]
        x_t, edge, pred = self._edge_point(batch)
        t_prev = solver_target_timestep(t, self.skip, self.edges)
        with torch.no_grad():
            x0_T, eps_T = self.teacher.x0_eps(x_t, t, cond, batch["w"])
            x_prev = sched.ddim_jump(x0_T, eps_T, t_prev)
            target = consistency_target(self.target.denoiser, x_prev, t_prev, edge, cond)
        if mc.loss == "huber":
            out = {"tscd": L.pseudo_huber(pred, target, mc.huber_c)}
        else:
            out = {"tscd": L.mse(pred.float(), target.float())}
        out["log/segments"] = torch.tensor(float(self.stage.segments))
        if self.head is not None and self._adv_weight(self.stage_index) > 0:  # weighted per stage: loss_weights
            with frozen(self.head):
                _, feats = predict_with_features(self.teacher, pred, edge.clamp(min=0), cond)
                out["gan_g"] = L.gan_generator(self.head(feats))
        if self.head is not None:
            out["gan_d"] = self.discriminator_loss(pred.detach(), edge, cond, batch)
        return out

    def discriminator_loss(self, fake: torch.Tensor, edge: torch.Tensor, cond: Cond, batch) -> torch.Tensor:
        """GAN head: the student's (detached) x_e vs real data noised to the same edges, both read through the
        frozen teacher; only the head gets gradients."""
        real = self.bundle.schedule.add_noise(batch["real"], batch["real_eps"], edge)
        t_d = edge.clamp(min=0)
        with torch.no_grad():
            _, feats_fake = predict_with_features(self.teacher, fake, t_d, cond)
            _, feats_real = predict_with_features(self.teacher, real, t_d, batch["real_cond"])
        return L.gan_discriminator(self.head(feats_real), self.head(feats_fake))

    # -- artifacts ----------------------------------------------------------------------------------
    def student_networks(self):
        return {"student": self.student}

    def recipe(self) -> SamplingRecipe:
        """The unified student's recipe: stock TCDScheduler (eta = method.eta), without CFG (guidance 1: it is
        baked in). Any step count 1..8 works: change num_inference_steps."""
        mc = self.cfg.method
        return SamplingRecipe(scheduler="TCDScheduler", scheduler_kwargs={"original_inference_steps": mc.teacher_steps},
                              eta=mc.eta, **self._recipe_common())

    def alternative_recipes(self) -> dict[str, SamplingRecipe]:
        """The same student with DDIM, trailing timestep spacing."""
        ddim = SamplingRecipe(scheduler="DDIMScheduler", scheduler_kwargs={"timestep_spacing": "trailing"}, eta=0.0,
                              **self._recipe_common())
        return {DDIM_TRAILING_RECIPE: ddim}

    def _recipe_common(self) -> dict:
        mc = self.cfg.method
        return dict(num_inference_steps=mc.sampler_steps, guidance_scale=1.0, method=self.name,
                    prediction_type=self.student.denoiser.prediction_type,
                    stages=[s.segments for s in mc.stages], teacher_steps=mc.teacher_steps)
