"""Distribution Matching Distillation: DMD (Yin et al. 2023) and DMD2 (Yin et al. 2024).

Student step (every ``student_every``-th step): x = G(z) (backward-simulated for k-step students);
loss_dm = 0.5 ||x - sg(x - g)||^2 with g = (f - r) / mean|x - r| from the teacher's CFG x0-prediction r
and the fake score's f at a random t in [0.02 T, 0.98 T]; optional GAN generator term on the fake
score's bottleneck and DMD1 regression to cached teacher DDIM outputs.
Fake-score step (every step): denoising loss on fresh detached student samples; optional GAN head
trained on noisy real vs generated samples. Methods built on DMD call these pieces, not this class.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .. import losses as L
from ..data import build_data
from ..denoisers import frozen
from ..errors import UsageError
from ..export import SamplingRecipe, export_student
from ..gan import GANHead, feature_channels, predict_with_features
from ..generators import FewStepGenerator
from ..models import load_bundle
from .base import Method, Phase
from .common import RegressionPairs, draw_conditions, make_trainable, teacher_view

PAIRS_FILE = "regression_pairs.safetensors"


class DMDMethod(Method):
    name = "dmd"
    kind = "distill"
    export_network = "student"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        mc = cfg.method
        self.bundle = b = load_bundle(cfg.model, cfg.data, ctx.device)
        self.data = build_data(cfg.data, b)
        shared = b.init_net if (mc.shared_base and mc.student.lora and mc.fake_score.lora) else None
        self.student = make_trainable(b, "student", mc.student.lora, shared)
        self.fake = make_trainable(b, "fake", mc.fake_score.lora, shared)
        self.teacher = teacher_view(b, shared)
        for m in (self.student.module, self.fake.module):
            m.to(ctx.device).train()
        if max(mc.timesteps) >= b.schedule.num_train_timesteps:
            raise UsageError(f"method.timesteps {mc.timesteps} exceed the teacher's "
                             f"{b.schedule.num_train_timesteps} training timesteps")
        self.generator = FewStepGenerator(self.student.denoiser, mc.timesteps)
        self.head = None
        if mc.gan is not None:
            if not self.data.has_real:
                raise UsageError(f"method.gan needs real data, but data {cfg.data.name!r} has none; "
                                 f"set method.gan=null or use an image dataset")
            self.head = GANHead(feature_channels(self.fake.module), mc.gan.hidden,
                                flat=b.kind == "mlp").to(ctx.device)
        self.pairs = self._regression_pairs() if mc.regression is not None else None
        T = b.schedule.num_train_timesteps
        self.t_range = (int(mc.min_t * T), int(mc.max_t * T))

    # -- structure --------------------------------------------------------------------------------
    def networks(self):
        nets = {"student": self.student.module, "fake_score": self.fake.module}
        if self.head is not None:
            nets["gan_head"] = self.head
        return nets

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

    def loss_weights(self):
        w = dict(self.cfg.method.loss_weights)
        for key in ("dm", "fake", "reg", "gan_g", "gan_d"):
            w.setdefault(key, 0.0)
        return w

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

    def batch(self, phase):
        n, g = self.cfg.train.batch_size, self.ctx.generator
        cond = draw_conditions(self.bundle, self.data, n, g)
        z = self.ctx.randn(n, *self.bundle.sample_shape)
        k = int(torch.randint(0, self.generator.num_steps, (1,), generator=g))
        out = {"z": z, "cond": cond, "k": k}
        if phase == "student" and self.pairs is not None and self.loss_weights()["reg"] > 0:
            rn = self.cfg.method.regression.batch_size or n
            zr, yr, labels, prompts = self.pairs.batch(rn, g)
            out["reg"] = (zr.to(self.ctx.device), yr.to(self.ctx.device),
                          self.bundle.conditioner.encode(labels, prompts))
        if phase == "fake_score" and self.head is not None:
            real = self.data.sample(n, g)
            out["real"] = (real.x0.to(self.ctx.device), self.bundle.conditioner.encode(real.labels, real.prompts))
        return out

    # -- losses -------------------------------------------------------------------------------------
    def _noise(self, x: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.ctx.randint(low, high + 1, (x.shape[0],))
        eps = self.ctx.randn_like(x)
        return self.bundle.schedule.add_noise(x, eps, t), t, eps

    def losses(self, batch, phase):
        return self.student_losses(batch) if phase == "student" else self.fake_losses(batch)

    def student_losses(self, batch) -> dict[str, torch.Tensor]:
        mc, w = self.cfg.method, self.loss_weights()
        cond = batch["cond"]
        x, _ = self.generator(batch["z"], cond, batch["k"], self.ctx.randn_like)
        out = {"dm": self.dm_loss(x, cond)}
        if self.head is not None and w["gan_g"] > 0:
            x_t, t, _ = self._noise(x, 0, self.bundle.schedule.num_train_timesteps - 1)
            with frozen(self.fake.module, self.head):
                _, feats = predict_with_features(self.fake.denoiser, x_t, t, cond)
                out["gan_g"] = L.gan_generator(self.head(feats))
        if "reg" in batch:
            zr, yr, cond_r = batch["reg"]
            out["reg"] = L.mse(self.generator.denoise(zr, mc.timesteps[0], cond_r).float(), yr.float())
        return out

    def dm_loss(self, x: torch.Tensor, cond) -> torch.Tensor:
        """DMD's distribution-matching loss for generator samples ``x`` (gradients flow into x only)."""
        with torch.no_grad():
            x_t, t, _ = self._noise(x.detach(), *self.t_range)
            real = self.teacher.x0(x_t, t, cond, self.cfg.method.real_guidance)
            fake = self.fake.denoiser.x0(x_t, t, cond)
            grad = L.dmd_gradient(x, real, fake)
        return L.distribution_matching(x, grad)

    def fake_losses(self, batch) -> dict[str, torch.Tensor]:
        cond = batch["cond"]
        with torch.no_grad():
            x, _ = self.generator(batch["z"], cond, batch["k"], self.ctx.randn_like)
        x = x.detach()
        x_t, t, eps = self._noise(x, 0, self.bundle.schedule.num_train_timesteps - 1)
        fake = self.fake.denoiser
        target = self.bundle.schedule.target(x, eps, t, fake.prediction_type)
        if self.head is None:
            return {"fake": L.mse(fake.predict(x_t, t, cond).float(), target.float())}
        pred, feats_fake = predict_with_features(fake, x_t, t, cond)
        real, cond_real = batch["real"]
        real_t, t_r, _ = self._noise(real, 0, self.bundle.schedule.num_train_timesteps - 1)
        _, feats_real = predict_with_features(fake, real_t, t_r, cond_real)
        return {"fake": L.mse(pred.float(), target.float()),
                "gan_d": L.gan_discriminator(self.head(feats_real), self.head(feats_fake))}

    # -- artifacts ----------------------------------------------------------------------------------
    def recipe(self) -> SamplingRecipe:
        ts = list(self.cfg.method.timesteps)
        return SamplingRecipe(scheduler="LCMScheduler", num_inference_steps=len(ts), timesteps=ts,
                              guidance_scale=1.0, method=self.name,
                              prediction_type=self.student.denoiser.prediction_type)

    def export(self, out_dir: Path) -> None:
        export_student(self.bundle, self.student.module, out_dir, self.recipe(), adapter=self.student.adapter,
                       prediction_type=self.student.denoiser.prediction_type)
