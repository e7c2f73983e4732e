"""DMD2's diffusion GAN (Yin et al. 2024, Sec. 4.3): a small classification head on the fake-score network's
bottleneck (mid-block) features, fed noisy real and noisy generated samples at random timesteps. Shared
by every method that wants an adversarial term (DMD, Phased DMD, multi-student, TSCD)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .denoisers import Cond, Denoiser


def feature_module(net: nn.Module) -> nn.Module:
    """The bottleneck whose output the head reads: Diffusers UNets' ``mid_block``; the toy MLP's last block."""
    mid = getattr(net, "mid_block", None)
    if mid is not None:
        return mid
    blocks = getattr(net, "blocks", None)
    if blocks is not None and len(blocks):
        return blocks[-1]
    raise ValueError(f"{type(net).__name__} has no mid_block / blocks to read GAN features from")


def feature_channels(net: nn.Module) -> int:
    cfg = getattr(net, "config", None)
    if isinstance(cfg, dict) and "hidden" in cfg:  # toy MLP
        return int(cfg["hidden"])
    return int(cfg.block_out_channels[-1])


@contextlib.contextmanager
def _tap(module: nn.Module, store: list):
    handle = module.register_forward_hook(lambda m, i, o: store.append(o[0] if isinstance(o, tuple) else o))
    try:
        yield
    finally:
        handle.remove()


class GANHead(nn.Module):
    """Conv (or MLP for flat features) -> mean pool -> one logit per sample."""

    def __init__(self, channels: int, hidden: int = 64, flat: bool = False):
        super().__init__()
        if flat:
            self.body = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        else:
            groups = 8 if hidden % 8 == 0 else 1
            self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden),
                                      nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(groups, hidden),
                                      nn.SiLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        h = self.body(feats.float())
        if h.ndim == 4:
            h = h.mean(dim=(2, 3))
        return self.out(h).squeeze(-1)  # (B,)


def predict_with_features(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's raw output (no CFG) and its bottleneck features from one network evaluation."""
    store: list[torch.Tensor] = []
    with _tap(feature_module(denoiser.net), store):
        out = denoiser.predict(x_t, t, cond)
    return out, store[-1]
