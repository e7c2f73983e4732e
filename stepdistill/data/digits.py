"""digits: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes), resized to
16x16 and scaled to [-1, 1], with a fixed train / held-out split. ``digits_sd`` serves the same images
as text-to-image data (prompts from templates, VAE latents)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from . import DataSource, Sample

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
