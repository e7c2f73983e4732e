"""Pure loss functions: tensors in, per-sample losses out (shape (B,)). The trainer reduces and weights
them (cf. NVlabs/edm training/loss.py). Paper and equation are named in each docstring."""

from __future__ import annotations

import torch


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error (DDPM 'simple' loss, Ho et al. 2020, Eq. 14)."""
    return per_sample_mean((pred - target) ** 2)


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance sqrt(||p - q||^2 + c^2) - c (Song & Dhariwal 2023, Sec. 3.3),
    computed per element and averaged as in Diffusers' LCM distillation example."""
    return per_sample_mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)
