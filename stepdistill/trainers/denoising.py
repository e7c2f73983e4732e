"""Plain diffusion training (DDPM, Ho et al. 2020) on the shared loop: pretrains teachers from scratch and
trains LoRAs on a pretrained model (e.g. a 'control' LoRA). Prediction type follows the scheduler
(epsilon / v_prediction / sample); a share of conditions is replaced by the null condition for CFG."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from .. import losses as L
from ..config import LoRAConfig, MethodConfig
from ..data import build_data
from ..denoisers import Cond
from ..lora import add_lora
from ..models import load_bundle
from ..pipelines.artifact import export_student
from ..pipelines.plan import SamplingRecipe
from ..training import Method, Phase


class DenoisingConfig(MethodConfig):
    """Plain diffusion training (pretrains teachers; trains control LoRAs)."""

    name: Literal["denoising"] = "denoising"
    cond_dropout: float = Field(0.1, ge=0, le=1, description="share of null conditions, for CFG")
    lora: LoRAConfig | None = Field(None, description="train a LoRA on the pretrained model instead")
    loss_weights: dict[str, float] = Field(default_factory=lambda: {"denoise": 1.0})


def drop_conditions(cond: Cond, drop: torch.Tensor) -> Cond:
    """Replace the conditional kwargs by the null ones where ``drop`` (B,) is True (CFG training)."""
    if cond.null is None or not bool(drop.any()):
        return cond

    def where(c, u):
        if isinstance(c, dict):
            return {k: where(c[k], u[k]) for k in c}
        if isinstance(c, torch.Tensor):
            m = drop.to(c.device).reshape((-1,) + (1,) * (c.ndim - 1))
            return torch.where(m, u, c)
        return c

    return Cond(where(cond.kwargs, cond.null), cond.null, cond.labels)


class DenoisingMethod(Method):
    name = "denoising"
    kind = "pretrain"
    config = DenoisingConfig
    export_network = "model"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.bundle = load_bundle(cfg.model, cfg.data, ctx.device)
        self.data = build_data(cfg.data, self.bundle)
        mc = cfg.method
        if mc.lora is not None:
            self.net = self.bundle.init_net
            self.net.requires_grad_(False)
            add_lora(self.net, "default", mc.lora.rank, mc.lora.alpha, mc.lora.target_modules)
        else:
            self.net = self.bundle.init_net if cfg.model.pretrained is None else self.bundle.new_network()
            self.net.requires_grad_(True)
        self.net.to(ctx.device).train()
        self.denoiser = self.bundle.denoiser(self.net)

    def networks(self):
        return {"model": self.net}

    def phases(self):
        return [Phase("model", ("model",))]

    def batch(self, phase):
        s = self.data.sample(self.cfg.train.batch_size, self.ctx.generator)
        x0 = s.x0.to(self.ctx.device)
        cond = self.bundle.conditioner.encode(s.labels, s.prompts)
        return x0, cond

    def losses(self, batch, phase):
        x0, cond = batch
        n = x0.shape[0]
        t = self.ctx.randint(0, self.bundle.schedule.num_train_timesteps, (n,))
        eps = self.ctx.randn_like(x0)
        drop = self.ctx.rand(n) < self.cfg.method.cond_dropout
        cond = drop_conditions(cond, drop)
        x_t = self.bundle.schedule.add_noise(x0, eps, t)
        pred = self.denoiser.predict(x_t, t, cond)
        target = self.bundle.schedule.target(x0, eps, t, self.denoiser.prediction_type)
        return {"denoise": L.mse(pred.float(), target.float())}

    # -- artifacts: the trained network (a new base model, or a LoRA on one) and how to sample it -------------
    def student_networks(self):
        from types import SimpleNamespace

        adapter = "default" if self.cfg.method.lora is not None else None
        return {"student": SimpleNamespace(module=self.net, adapter=adapter, denoiser=self.denoiser)}

    def recipe(self) -> SamplingRecipe:
        return SamplingRecipe(scheduler="DDIMScheduler", num_inference_steps=50, guidance_scale=1.0,
                              method=self.name, prediction_type=self.denoiser.prediction_type)

    def export(self, out_dir: Path) -> None:
        export_student(self.bundle, self.student_networks(), out_dir, self.recipe(), whole_pipelines=True)
