"""digits: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes), resized to
16x16 and scaled to [-1, 1], with a fixed train / held-out split. ``digits_sd`` serves the same images
as text-to-image data (prompts from templates, VAE latents)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from .base import DataSource, Sample

SPLIT_SEED = 20240601
HELDOUT = 297  # 1,797 = 1,500 train + 297 held-out


@functools.lru_cache(maxsize=4)
def load_digits_tensor(resolution: int = 16, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, R, R) in [-1, 1] and labels (N,) of one split; the split is fixed (seeded permutation)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    if resolution != 8:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(len(x)))
    idx = {"heldout": perm[:HELDOUT], "train": perm[HELDOUT:], "all": torch.arange(len(x))}[split]
    return x[idx], y[idx]


class DigitsSource(DataSource):
    """Class-conditional digit images, drawn uniformly with replacement."""

    def __init__(self, cfg):
        self.images, self.labels = load_digits_tensor(cfg.resolution, cfg.split)

    def sample(self, n, generator):
        idx = torch.randint(0, len(self.images), (n,), generator=generator)
        return Sample(self.images[idx], self.labels[idx])

    def conditions(self, n, generator):
        return Sample(None, torch.randint(0, 10, (n,), generator=generator))

    def condition_set(self):
        return Sample(None, torch.arange(10))


class DigitsSDSource(DataSource):
    """Text-to-image digits (the digits-sd benchmark): prompts from templates (``""`` with probability
    ``empty_prompt_prob``, the unconditional branch), digit labels of the images, and x0 in model space.

    With a latent bundle the split is encoded once (posterior mean and std, scaled by the VAE's
    ``scaling_factor``) and each draw samples the posterior, as Stable Diffusion training does; without
    one, x0 are the images with the gray value replicated to ``channels``."""

    def __init__(self, cfg, bundle=None):
        from .prompts import TEMPLATES, check_templates

        images, self.labels = load_digits_tensor(cfg.resolution, cfg.split)
        images = dilate_strokes(images, cfg.dilate)
        self.templates = check_templates(cfg.templates or TEMPLATES)
        self.empty_prompt_prob = cfg.empty_prompt_prob
        vae = getattr(bundle, "vae", None)
        channels = vae.config.in_channels if vae is not None else cfg.channels
        self.images = images.repeat(1, channels, 1, 1)  # (N, C, R, R)
        self.mean, self.std = self.images, None
        if vae is not None:
            self.mean, self.std = encode_posterior(vae, self.images, bundle.vae_scaling)

    def sample(self, n, generator):
        from .prompts import random_prompts

        idx = torch.randint(0, len(self.labels), (n,), generator=generator)
        x0 = self.mean[idx]
        if self.std is not None:
            x0 = x0 + self.std[idx] * torch.randn(x0.shape, generator=generator)
        labels = self.labels[idx]
        return Sample(x0, labels, random_prompts(labels, generator, self.templates, self.empty_prompt_prob))

    def condition_set(self):
        from .prompts import digit_prompt

        pairs = [(d, digit_prompt(d, t)) for t in self.templates for d in range(10)]
        return Sample(None, torch.tensor([d for d, _ in pairs]), [p for _, p in pairs])

    def conditions(self, n, generator):
        """Prompts for data-free distillation: never empty (the null branch comes from the conditioner)."""
        from .prompts import random_prompts

        labels = torch.randint(0, 10, (n,), generator=generator)
        return Sample(None, labels, random_prompts(labels, generator, self.templates))


def dilate_strokes(images: torch.Tensor, radius: int) -> torch.Tensor:
    """Bolder digits: a (2r+1) x (2r+1) max filter over images in [-1, 1] whose ink is bright (+1)."""
    if radius <= 0:
        return images
    return torch.nn.functional.max_pool2d(images, 2 * radius + 1, stride=1, padding=radius)


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor, scaling: float, chunk: int = 256
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior mean and std (N, C_lat, r, r) of a Diffusers VAE over images in [-1, 1] (on CPU)."""
    param = next(vae.parameters())
    means, stds = [], []
    for i in range(0, len(images), chunk):
        dist = vae.encode(images[i:i + chunk].to(param.device, param.dtype)).latent_dist
        means.append(dist.mean.float().cpu() * scaling)
        stds.append(dist.std.float().cpu() * scaling)
    return torch.cat(means), torch.cat(stds)
