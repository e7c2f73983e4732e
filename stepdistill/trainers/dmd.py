"""Distribution Matching Distillation: DMD (Yin et al. 2023) and DMD2 (Yin et al. 2024).

Student step (every ``student_every``-th step): x = G(z) (backward-simulated for k-step students);
loss_dm = 0.5 ||x - sg(x - g)||^2 with g = (f - r) / mean|x - r| from the teacher's CFG x0-prediction r
and the fake score's f at a random t in [0.02 T, 0.98 T]; optional GAN generator term on the fake
score's bottleneck and DMD1 regression to cached teacher DDIM outputs.
Fake-score step (every step): denoising loss on fresh detached student samples; optional GAN head
trained on noisy real vs generated samples. The terms are free functions (``dmd_terms.py``) that methods
built on DMD call too.
"""

from __future__ import annotations

import json
import sys
from typing import Literal

import torch
from pydantic import Field, model_validator

from .. import losses as L
from ..config import GANConfig, MethodConfig, RegressionConfig, StudentNetConfig
from ..data import build_data
from ..errors import UsageError
from ..gan import GANHead, feature_channels
from ..generators import FewStepGenerator
from ..models import load_bundle
from ..pipelines.plan import SamplingRecipe
from ..training import Method, Phase
from .common import RegressionPairs, TrainableNet, make_trainable, teacher_view
from .dmd_terms import distribution_matching_loss, fake_score_loss, gan_discriminator_loss, gan_generator_loss

PAIRS_FILE = "regression_pairs.safetensors"


class DMDTermsConfig(MethodConfig):
    """What every method built on DMD's terms shares: the real score's guidance, the two time-scale rule, the
    student and fake-score networks, the DM loss's timestep range, and the optional GAN and regression terms."""

    real_guidance: float = Field(1.0, description="CFG scale of the teacher's real score (<= 1: none)")
    student_every: int = Field(5, ge=1, description="two time-scale rule: a student step every N-th step "
                                                    "(the fake score updates every step)")
    fake_repeats: int = Field(1, ge=1, description="fake-score updates per step")
    min_t: float = Field(0.02, ge=0, lt=1, description="DM loss timesteps ~ U[min_t T, max_t T]")
    max_t: float = Field(0.98, gt=0, le=1, description="the last timestep is at most T - 1 (max_t = 1: T - 1)")
    student: StudentNetConfig = StudentNetConfig()
    fake_score: StudentNetConfig = StudentNetConfig()
    shared_base: bool = Field(True, description="when student and fake score are both LoRAs: one frozen base "
                                                "carries both adapters and serves as the teacher (adapters off)")
    gan: GANConfig | None = Field(None, description="DMD2's GAN term (needs real data)")
    regression: RegressionConfig | None = Field(None, description="DMD1's regression term")
    loss_weights: dict[str, float] = Field(default_factory=lambda: {
        "dm": 1.0, "fake": 1.0, "reg": 0.25, "gan_g": 3e-3, "gan_d": 1e-2})

    @model_validator(mode="after")
    def _check_range(self):
        if self.min_t >= self.max_t:
            raise ValueError("min_t must be below max_t")
        return self


class DMDConfig(DMDTermsConfig):
    """Distribution Matching Distillation (DMD, Yin et al. 2023; DMD2, Yin et al. 2024)."""

    name: Literal["dmd"] = "dmd"
    timesteps: list[int] = Field([999], min_length=1, description="student timesteps, decreasing; one entry "
                                                                  "= a one-step generator at that timestep")

    @model_validator(mode="after")
    def _check(self):
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])) or min(self.timesteps) < 0:
            raise ValueError(f"timesteps must be strictly decreasing and >= 0, got {self.timesteps}")
        return self


class DMDMethod(Method):
    name = "dmd"
    kind = "distill"
    config = DMDConfig
    export_network = "student"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        mc = cfg.method
        self.bundle = b = load_bundle(cfg.model, cfg.data, ctx.device)
        self.data = build_data(cfg.data, b)
        self.shared = b.init_net if (mc.shared_base and mc.student.lora and mc.fake_score.lora) else None
        self._build_networks()
        self.teacher = teacher_view(b, self.shared)
        self.head = None
        if mc.gan is not None:
            if not self.data.has_real:
                raise UsageError(f"method.gan needs real data, but data {cfg.data.name!r} has none; "
                                 f"set method.gan=null or use an image dataset")
            self.head = GANHead(feature_channels(self.fake_network().module),
                                mc.gan.hidden, flat=b.kind == "mlp").to(ctx.device)
        self.pairs = self._regression_pairs() if mc.regression is not None else None
        self.t_range = b.schedule.timestep_range(mc.min_t, mc.max_t)

    def _build_networks(self) -> None:
        """The student (a few-step generator) and its fake score; methods with several generators override."""
        mc, b = self.cfg.method, self.bundle
        self.student = make_trainable(b, "student", mc.student.lora, self.shared)
        self.fake = make_trainable(b, "fake", mc.fake_score.lora, self.shared)
        for m in (self.student.module, self.fake.module):
            m.to(self.ctx.device).train()
        if max(mc.timesteps) >= b.schedule.num_train_timesteps:
            raise UsageError(f"method.timesteps {mc.timesteps} exceed the teacher's "
                             f"{b.schedule.num_train_timesteps} training timesteps")
        self.generator = FewStepGenerator(self.student.denoiser, mc.timesteps)

    def fake_network(self):
        """A fake score (the GAN head reads its bottleneck's width)."""
        return self.fake

    def fake_networks(self) -> dict[str, TrainableNet]:
        """Every fake score, by network name."""
        return {"fake_score": self.fake}

    # -- structure --------------------------------------------------------------------------------
    def networks(self):
        nets = {"student": self.student.module, "fake_score": self.fake.module}
        if self.head is not None:
            nets["gan_head"] = self.head
        return nets

    def network_denoisers(self):
        return {name: net.denoiser for name, net in {**self.student_networks(), **self.fake_networks()}.items()}

    def trainable(self, name, net):
        if name == "student":
            return self.student.named_parameters()
        if name == "fake_score":
            return self.fake.named_parameters()
        return super().trainable(name, net)

    def phases(self):
        mc = self.cfg.method
        fake_nets = ("fake_score", "gan_head") if self.head is not None else ("fake_score",)
        return [Phase("student", ("student",), every=mc.student_every),
                Phase("fake_score", fake_nets, repeats=mc.fake_repeats)]

    # -- data ---------------------------------------------------------------------------------------
    def _regression_pairs(self) -> RegressionPairs:
        rc = self.cfg.method.regression
        path = self.ctx.run_dir / PAIRS_FILE if self.ctx.run_dir is not None else None
        seed = self.cfg.train.seed + 7919
        key = {"model": json.loads(self.cfg.model.model_dump_json()), "num_pairs": rc.num_pairs,
               "teacher_steps": rc.teacher_steps, "guidance": self.cfg.method.real_guidance, "seed": seed,
               "shape": list(self.bundle.sample_shape)}
        if path is not None and path.exists():
            cached = RegressionPairs.load(path)
            if cached.key == key:
                return cached
            if self.ctx.is_main:
                print(f"stepdistill: {path} was made with other settings ({cached.key}); remaking it", file=sys.stderr)
        pairs = RegressionPairs.build(self.bundle, self.teacher, self.data, rc.num_pairs, rc.teacher_steps,
                                      self.cfg.method.real_guidance, seed=seed, progress=self.ctx.show_progress)
        pairs.key = key
        if path is not None and self.ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            pairs.save(path)
        return pairs

    def role(self, phase: str) -> str:
        """What a phase updates: "student" (the generator) or "fake_score"."""
        return phase

    def draw_step(self, phase: str) -> dict:
        """Which generator step carries the gradient this time (backward simulation)."""
        return {"k": int(torch.randint(0, self.generator.num_steps, (1,), generator=self.ctx.generator))}

    def uses_regression(self, phase: str) -> bool:
        return True

    def raw_conditions(self, phase: str, n: int):
        """The conditions (a ``data.Sample`` of labels / prompts) of a batch of ``phase``."""
        return self.data.conditions(n, self.ctx.generator)

    def batch(self, phase):
        n, g, role = self.cfg.train.batch_size, self.ctx.generator, self.role(phase)
        raw = self.raw_conditions(phase, n)
        cond = self.bundle.conditioner.encode(raw.labels, raw.prompts)
        z = self.ctx.randn(n, *self.bundle.sample_shape)
        out = {"z": z, "cond": cond, "raw": raw, **self.draw_step(phase)}
        if (role == "student" and self.pairs is not None and self.cfg.method.loss_weights["reg"] > 0
                and self.uses_regression(phase)):
            rn = self.cfg.method.regression.batch_size or n
            zr, yr, labels, prompts = self.pairs.batch(rn, g)
            out["reg"] = (zr.to(self.ctx.device), yr.to(self.ctx.device),
                          self.bundle.conditioner.encode(labels, prompts))
        if role == "fake_score" and self.head is not None:
            real = self.data.sample(n, g)
            out["real"] = (real.x0.to(self.ctx.device), self.bundle.conditioner.encode(real.labels, real.prompts))
        return out

    # -- losses (the terms are dmd_terms' free functions) ----------------------------------------------
    def losses(self, batch, phase):
        return self.student_losses(batch) if self.role(phase) == "student" else self.fake_losses(batch)

    def student_losses(self, batch) -> dict[str, torch.Tensor]:
        mc = self.cfg.method
        cond = batch["cond"]
        x, _ = self.generator(batch["z"], cond, batch["k"], self.ctx.randn_like)
        out = {"dm": distribution_matching_loss(x, cond, self.teacher, self.fake.denoiser, self.ctx, self.t_range,
                                                mc.real_guidance)}
        if self.head is not None and mc.loss_weights["gan_g"] > 0:
            out["gan_g"] = gan_generator_loss(self.fake.denoiser, self.head, x, cond, self.ctx)
        if "reg" in batch:
            zr, yr, cond_r = batch["reg"]
            out["reg"] = L.mse(self.generator.denoise(zr, mc.timesteps[0], cond_r).float(), yr.float())
        return out

    @torch.no_grad()
    def fake_samples(self, batch) -> torch.Tensor:
        """The generator samples the fake score learns from (no gradient)."""
        x, _ = self.generator(batch["z"], batch["cond"], batch["k"], self.ctx.randn_like)
        return x

    def fake_losses(self, batch) -> dict[str, torch.Tensor]:
        cond = batch["cond"]
        x = self.fake_samples(batch).detach()
        if self.head is None:
            return {"fake": fake_score_loss(self.fake.denoiser, x, cond, self.ctx)}
        fake, features = fake_score_loss(self.fake.denoiser, x, cond, self.ctx, features=True)
        real, real_cond = batch["real"]
        return {"fake": fake,
                "gan_d": gan_discriminator_loss(self.fake.denoiser, self.head, features, real, real_cond, self.ctx)}

    # -- artifacts ----------------------------------------------------------------------------------
    def student_networks(self):
        return {"student": self.student}

    def recipe(self) -> SamplingRecipe:
        ts = list(self.cfg.method.timesteps)
        return SamplingRecipe(scheduler="LCMScheduler", num_inference_steps=len(ts), timesteps=ts,
                              guidance_scale=1.0, method=self.name,
                              prediction_type=self.student.denoiser.prediction_type)
