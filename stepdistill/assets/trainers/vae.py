"""AutoencoderKL pretraining (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", Sec. 3): encode, sample the diagonal-Gaussian posterior, decode; L1 reconstruction plus a small KL
to N(0, I) (LDM's ``kl_weight``; the perceptual and GAN terms are left out at 16x16).

The export is a Diffusers ``vae/`` folder whose ``scaling_factor`` is 1 / std of posterior samples over the
data, so scaled latents have unit std (LDM Sec. 4.3.2; SD1.5's 0.18215 was found the same way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ... import losses as L
from ...config import MethodConfig
from ...data import build_data
from ...errors import UsageError
from ...training import Method, Phase

SCALE_SAMPLES = 2048  # images drawn (seeded) at export to measure the latent std


class VAEConfig(MethodConfig):
    """AutoencoderKL pretraining (Rombach et al. 2022, LDM sec. 3): L1 reconstruction + a small KL to N(0, I);
    ``model.arch`` holds the AutoencoderKL kwargs."""

    name: Literal["vae"] = "vae"
    loss_weights: dict[str, float] = Field(default_factory=lambda: {"recon": 1.0, "kl": 1e-4})


class VAEMethod(Method):
    name = "vae"
    kind = "pretrain"
    config = VAEConfig
    export_network = "vae"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        from diffusers import AutoencoderKL

        if cfg.model.arch is None:
            raise UsageError("method vae builds an AutoencoderKL from model.arch; set model.arch (its kwargs)")
        self.vae = AutoencoderKL(**cfg.model.arch).to(ctx.device).train()
        self.data = build_data(cfg.data)  # no bundle: x0 are images in [-1, 1]
        probe = self.data.sample(1, torch.Generator().manual_seed(0)).x0
        if probe is None or probe.shape[1] != self.vae.config.in_channels:
            got = "no images" if probe is None else f"{probe.shape[1]}-channel images"
            raise UsageError(f"the vae has in_channels={self.vae.config.in_channels} but data gives {got}; "
                             f"set data.channels or model.arch.in_channels")

    def networks(self):
        return {"vae": self.vae}

    def phases(self):
        return [Phase("vae", ("vae",))]

    def batch(self, phase):
        return self.data.sample(self.cfg.train.batch_size, self.ctx.generator).x0.to(self.ctx.device)

    def losses(self, x, phase):
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * self.ctx.randn_like(post.mean)  # reparameterised posterior sample
        recon = self.vae.decode(z).sample
        return {"recon": L.l1(recon, x), "kl": L.gaussian_kl(post.mean, post.logvar, x[0].numel()),
                "log/mse": L.mse(recon.detach().float(), x.float())}

    @torch.no_grad()
    def latent_std(self) -> float:
        """Std of posterior samples (unscaled) over a seeded draw of the data."""
        gen = torch.Generator().manual_seed(0)
        x = self.data.sample(SCALE_SAMPLES, gen).x0
        zs = []
        for chunk in x.split(256):
            post = self.vae.encode(chunk.to(self.ctx.device)).latent_dist
            zs.append((post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(post.mean)).cpu())
        return float(torch.cat(zs).float().std())

    def export(self, out_dir: Path) -> None:
        self.vae.eval()
        self.vae.register_to_config(scaling_factor=1.0 / self.latent_std())
        self.vae.save_pretrained(Path(out_dir) / "vae")
        self.vae.train()
