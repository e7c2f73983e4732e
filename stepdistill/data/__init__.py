"""Data sources: real samples (for denoising, GAN and regression terms) and condition draws (for
data-free distillation). All randomness comes from the caller's generator, so runs resume exactly.
Local image folders (``images``, with a latent cache for latent models) are described in ``images.py``."""

from __future__ import annotations

import torch

from .base import DataSource, Sample

__all__ = ["DataSource", "Sample", "Toy2DSource", "build_data"]


class Toy2DSource(DataSource):
    def __init__(self, spec, conditional: bool):
        self.spec, self.conditional = spec, conditional

    def sample(self, n, generator):
        x, modes = self.spec.sample(n, generator)
        return Sample(x, modes if self.conditional else None)

    def condition_set(self):
        return Sample(None, torch.arange(self.spec.num_modes)) if self.conditional else None


def build_data(data_cfg, bundle=None) -> DataSource:
    """The data source a config's ``data`` section describes (``bundle`` encodes images for latent models)."""
    name = data_cfg.name
    if name == "toy2d":
        from .toy2d import MixtureSpec

        return Toy2DSource(MixtureSpec.from_config(data_cfg), data_cfg.conditional)
    if name == "digits":
        from .digits import DigitsSource

        return DigitsSource(data_cfg)
    if name == "digits_sd":
        from .digits import DigitsSDSource

        return DigitsSDSource(data_cfg, bundle)
    if name == "prompts":
        from .prompts import PromptSource

        return PromptSource(data_cfg)
    if name == "images":
        from .images import ImageFolderSource

        return ImageFolderSource(data_cfg, bundle)
    raise ValueError(f"unknown data source {name!r}")
