"""Phased DMD (Fan et al. 2025, "Few-step Distribution Matching Distillation via Score Matching within
Subintervals"): a few-step student made of K experts, one per SNR subinterval, trained one phase after another.

Phase boundaries t_0 = T-1 > t_1 > ... > t_{K-1} > t_K = clean split the trajectory; expert k runs its timesteps
(the first is t_k) and every step is a deterministic DDIM jump, so the exported plan samples with a stock
``TCDScheduler`` (eta 0) whose callback switches LoRA adapters. Phase k trains expert k only, for its share of the
steps; the experts before it are frozen and run without gradient (backward simulation to x_{t_k}), and one step
of expert k carries the gradient (memory as one-step DMD). Its output x_s at the phase's lower boundary
s = t_{k+1} is

- pushed by DMD's distribution-matching gradient at x_t ~ q(x_t | x_s), t in (s, T] (or (s, t_k]: ``dm_range``);
- matched by the phase's own fake score, trained by score matching *within* the subinterval: noised from x_s,
  regressed onto the exact conditional target (``schedules.subinterval_target``), because no clean sample
  exists for x_s. The last phase (s = clean) is plain DMD.

Each expert starts from the teacher or from the previous expert (``init``). The losses are DMD's own terms
(``dmd_terms``) with the source timestep s; the optional GAN and regression terms are DMD2's / DMD1's.
``RUN/phases.json`` records each finished phase (timesteps, steps, wall-clock seconds).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from .. import losses as L
from ..errors import UsageError
from ..generators import ExpertChain
from ..pipelines.plan import SamplingRecipe, Segment
from ..schedules import CLEAN, snr_subintervals
from ..training import Method, Phase, StageLog
from .common import ema_update, make_trainable
from .dmd import DMDMethod, DMDTermsConfig
from .dmd_terms import distribution_matching_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss

PHASES_FILE = "phases.json"  # RUN/phases.json: timesteps, steps and wall-clock seconds of each finished phase


class PhasedDMDConfig(DMDTermsConfig):
    """Phased DMD: one expert per SNR subinterval, progressive training, score matching within subintervals."""

    name: Literal["phased_dmd"] = "phased_dmd"
    boundaries: list[int] | None = Field(None, description="phase starts t_0 > t_1 > ... > t_{K-1} as timesteps "
                                                           "(the last phase ends at the clean end)")
    boundaries_log_snr: list[float] | None = Field(None, description="the same as log-SNR values (increasing); "
                                                                     "converted with the teacher's schedule")
    num_phases: int = Field(4, ge=1, description="K when no boundaries are given: equal subintervals by `spacing`")
    spacing: Literal["timestep", "log_snr"] = "timestep"
    steps_per_phase: int = Field(1, ge=1, description="sampling steps of each expert (e.g. 4 steps = 4 phases x 1 "
                                                      "or 2 phases x 2)")
    phase_steps: list[int] | None = Field(None, description="training steps of each phase (they add up to "
                                                            "train.steps); null: train.steps split equally")
    init: Literal["teacher", "previous"] = Field("teacher", description="each expert starts from the teacher, or "
                                                                        "from the previous phase's expert")
    dm_range: Literal["to_end", "phase"] = Field("to_end", description="DM loss timesteps: (s, T] (the paper's "
                                                                       "choice) or (s, t_k], the phase's own")
    min_gap: int = Field(20, ge=1, description="noised timesteps stay at least this far above a phase's lower "
                                               "boundary (the conditional target grows as 1/s_{t|s})")
    fake_weighting: Literal["variance", "clamp"] = Field("variance", description="subinterval score-matching "
                                                                                 "weight (schedules.subinterval_weight)")

    @model_validator(mode="after")
    def _check(self):
        if self.boundaries is not None and self.boundaries_log_snr is not None:
            raise ValueError("give boundaries or boundaries_log_snr, not both")
        b = self.boundaries
        if b is not None and (not b or any(x <= y for x, y in zip(b, b[1:])) or min(b) < 0):
            raise ValueError(f"boundaries must be a non-empty strictly decreasing list of timesteps >= 0, got {b}")
        ls = self.boundaries_log_snr
        if ls is not None and (not ls or any(x >= y for x, y in zip(ls, ls[1:]))):
            raise ValueError(f"boundaries_log_snr must be strictly increasing (from noise to data), got {ls}")
        if self.phase_steps is not None and (not self.phase_steps or min(self.phase_steps) < 1):
            raise ValueError(f"phase_steps must be positive step counts, got {self.phase_steps}")
        return self


def phase_timesteps(starts: list[int], steps_per_phase: int) -> list[list[int]]:
    """Each expert's sampling timesteps: ``steps_per_phase`` evenly spaced from its phase start down towards the
    next phase's start (the clean end, -1, after the last)."""
    out = []
    for k, hi in enumerate(starts):
        lo = starts[k + 1] if k + 1 < len(starts) else CLEAN
        ts = [int(round(hi - j * (hi - lo) / steps_per_phase)) for j in range(steps_per_phase)]
        if any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] <= lo:
            raise UsageError(f"phase {k} ({hi} -> {lo}) is too narrow for {steps_per_phase} steps; lower "
                             f"method.steps_per_phase or widen the phase")
        out.append(ts)
    return out


def split_steps(total: int, k: int) -> list[int]:
    """``total`` training steps over k phases, as equal as can be (the remainder to the last phases)."""
    base, extra = divmod(total, k)
    return [base + (1 if i >= k - extra else 0) for i in range(k)]


class PhasedDMDMethod(DMDMethod):
    name = "phased_dmd"
    kind = "distill"
    config = PhasedDMDConfig
    export_network = "expert_0"

    def _build_networks(self) -> None:
        mc, b, cfg = self.cfg.method, self.bundle, self.cfg
        T = b.schedule.num_train_timesteps
        if mc.boundaries is not None:
            starts = list(mc.boundaries)
        elif mc.boundaries_log_snr is not None:
            lo, hi = float(b.schedule.log_snr(T - 1)), float(b.schedule.log_snr(0))
            if not all(lo <= v <= hi for v in mc.boundaries_log_snr):
                raise UsageError(f"method.boundaries_log_snr {mc.boundaries_log_snr} leave the teacher's schedule "
                                 f"(log-SNR {lo:.2f} at t = {T - 1} to {hi:.2f} at t = 0)")
            starts = [int(t) for t in b.schedule.t_from_log_snr(mc.boundaries_log_snr)]
            if any(x <= y for x, y in zip(starts, starts[1:])):
                raise UsageError(f"method.boundaries_log_snr {mc.boundaries_log_snr} map to timesteps {starts}, "
                                 f"which are not strictly decreasing; space them further apart")
        else:
            starts = snr_subintervals(mc.num_phases, b.schedule, mc.spacing)[:-1]
        if max(starts) >= T:
            raise UsageError(f"method.boundaries {starts} exceed the teacher's {T} training timesteps")
        self.starts = starts
        K = len(starts)
        steps = list(mc.phase_steps) if mc.phase_steps is not None else split_steps(cfg.train.steps, K)
        if len(steps) != K or sum(steps) != cfg.train.steps or min(steps) < 1:
            raise UsageError(f"method.phase_steps {steps} must give each of the {K} phases >= 1 step and add up to "
                             f"train.steps ({cfg.train.steps})")
        self.experts = [make_trainable(b, f"expert_{k}", mc.student.lora, self.shared) for k in range(K)]
        self.fakes = [make_trainable(b, f"fake_score_{k}", mc.fake_score.lora, self.shared) for k in range(K)]
        for net in self.experts + self.fakes:
            net.module.to(self.ctx.device).train()
        self.chain = ExpertChain([e.denoiser for e in self.experts], phase_timesteps(starts, mc.steps_per_phase))
        self.stages = StageLog(steps, PHASES_FILE, self.ctx.run_dir, self.ctx.is_main, describe=lambda k: {
            "expert": f"expert_{k}", "timesteps": self.chain.timesteps[k],
            "subinterval": [self.starts[k], self.chain.phase_end(k)]})

    def fake_network(self):
        return self.fakes[0]

    def fake_networks(self):
        return {f"fake_score_{k}": f for k, f in enumerate(self.fakes)}

    # -- structure --------------------------------------------------------------------------------
    def networks(self):
        nets = {f"expert_{k}": e.module for k, e in enumerate(self.experts)}
        nets.update({f"fake_score_{k}": f.module for k, f in enumerate(self.fakes)})
        if self.head is not None:
            nets["gan_head"] = self.head
        return nets

    def trainable(self, name, net):
        kind, _, k = name.rpartition("_")
        if kind == "expert":
            return self.experts[int(k)].named_parameters()
        if kind == "fake_score":
            return self.fakes[int(k)].named_parameters()
        return Method.trainable(self, name, net)

    def phases(self):
        mc, out = self.cfg.method, []
        for k in range(self.chain.num_phases):
            span = {"start": self.stages.start(k), "stop": self.stages.stop(k)}
            fake = (f"fake_score_{k}", "gan_head") if self.head is not None else (f"fake_score_{k}",)
            out += [Phase(f"expert_{k}", (f"expert_{k}",), every=mc.student_every, **span),
                    Phase(f"fake_score_{k}", fake, repeats=mc.fake_repeats, **span)]
        return out

    def network_group(self, name):
        """``optim_per_network.fake_score`` / ``.student`` set every phase's fake score / expert."""
        kind = name.rpartition("_")[0]
        return {"expert": "student", "fake_score": "fake_score"}.get(kind)

    def ema_networks(self):
        return [f"expert_{k}" for k in range(self.chain.num_phases)]

    def finished_networks(self, step):
        k = self.stages.stage_at(step)
        return (f"expert_{k}",) if step + 1 == self.stages.stop(k) else ()

    def after_step(self, step):
        if not self.stages.step_done(step) or step + 1 >= self.stages.total:
            return ()
        k = self.stages.index  # the phase that starts now
        if self.cfg.method.init == "previous":
            ema_update(self.experts[k], self.experts[k - 1], 0.0)
            return (f"expert_{k}",)
        return ()

    def extra_state(self):
        return {}, {**self.stages.state(), "starts": self.starts}

    def load_extra_state(self, tensors, meta):
        if meta.get("starts") != self.starts:
            raise UsageError(f"the checkpoint's phases start at {meta.get('starts')}, the config's at {self.starts}; "
                             f"resume with the config it was written with")
        self.stages.load_state(meta)

    # -- data ---------------------------------------------------------------------------------------
    def role(self, phase):
        return "student" if phase.startswith("expert_") else "fake_score"

    def draw_step(self, phase):
        k = int(phase.rpartition("_")[2])
        j = int(torch.randint(0, len(self.chain.timesteps[k]), (1,), generator=self.ctx.generator))
        return {"phase": k, "j": j}

    def uses_regression(self, phase):
        return phase == "expert_0"  # the regression pairs start from noise: they teach expert 0 only

    def _ranges(self, k: int, s: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(DM loss range, fake-score range) of phase k with lower boundary s."""
        mc, T = self.cfg.method, self.bundle.schedule.num_train_timesteps
        lo_dm = self.t_range[0] if s < 0 else max(self.t_range[0], s + mc.min_gap)
        hi_dm = self.t_range[1] if mc.dm_range == "to_end" else min(self.t_range[1], self.starts[k])
        lo_fake = 0 if s < 0 else s + mc.min_gap
        if lo_dm > hi_dm or lo_fake > T - 1:
            raise UsageError(f"phase {k} leaves no timesteps above its lower boundary {s} (min_gap {mc.min_gap}, "
                             f"max_t {mc.max_t}); lower method.min_gap or move the boundary")
        return (lo_dm, hi_dm), (lo_fake, T - 1)

    # -- losses -------------------------------------------------------------------------------------
    def student_losses(self, batch):
        mc, k, cond = self.cfg.method, batch["phase"], batch["cond"]
        x_s, x0, s = self.chain.phase_output(batch["z"], cond, k, batch["j"])
        dm_range, fake_range = self._ranges(k, s)
        fake = self.fakes[k].denoiser
        out = {"dm": distribution_matching_loss(x_s, cond, self.teacher, fake, self.ctx, dm_range, mc.real_guidance,
                                                s=s, x0=x0)}
        if self.head is not None and mc.loss_weights["gan_g"] > 0:
            out["gan_g"] = gan_generator_loss(fake, self.head, x_s, cond, self.ctx, s=s, t_range=fake_range)
        if "reg" in batch:
            zr, yr, cond_r = batch["reg"]
            out["reg"] = L.mse(self.experts[0].denoiser.x0(zr, self.chain.chain[0], cond_r).float(), yr.float())
        return out

    def fake_losses(self, batch):
        mc, k, cond = self.cfg.method, batch["phase"], batch["cond"]
        with torch.no_grad():
            x_s, _, s = self.chain.phase_output(batch["z"], cond, k, batch["j"])
        x_s = x_s.detach()
        _, fake_range = self._ranges(k, s)
        fake = self.fakes[k].denoiser
        kw = dict(s=s, t_range=fake_range, weighting=mc.fake_weighting)
        if self.head is None:
            return {"fake": fake_score_loss(fake, x_s, cond, self.ctx, **kw)}
        loss, features = fake_score_loss(fake, x_s, cond, self.ctx, features=True, **kw)
        real, real_cond = batch["real"]
        return {"fake": loss, "gan_d": gan_discriminator_loss(fake, self.head, features, real, real_cond, self.ctx,
                                                              t_range=fake_range)}

    # -- artifacts ----------------------------------------------------------------------------------
    def student_networks(self):
        return {f"expert_{k}": e for k, e in enumerate(self.experts)}

    def recipe(self) -> SamplingRecipe:
        """K segments, one per expert, on one stock ``TCDScheduler`` with eta 0 (deterministic DDIM jumps between
        the chained timesteps, the last to timestep 0), guidance 1 (the teacher's CFG is distilled in)."""
        segments = [Segment(network=f"expert_{k}", timesteps=ts) for k, ts in enumerate(self.chain.timesteps)]
        # original_inference_steps = T: every timestep is on TCD's grid (it only checks custom timesteps against it)
        T = self.bundle.schedule.num_train_timesteps
        return SamplingRecipe(scheduler="TCDScheduler", scheduler_kwargs={"original_inference_steps": T}, eta=0.0,
                              timesteps=list(self.chain.chain),
                              num_inference_steps=len(self.chain.chain), guidance_scale=1.0, method=self.name,
                              prediction_type=self.experts[0].denoiser.prediction_type, segments=segments,
                              phase_starts=self.starts)
