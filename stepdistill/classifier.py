"""The digit classifier of the digits benchmarks: a small conv net on 16x16 images in [-1, 1].

It scores generated digits (class accuracy of samples) and its penultimate features are the FID feature
space for ``digits`` and ``digits-sd`` (FID of Heusel et al. 2017 computed in a domain network's features,
as Inception pool3 is for natural images). RGB input (a Stable Diffusion pipeline's decoded images) is
averaged to one channel; other sizes are resized to the training resolution.

Saved as ``config.json`` + ``model.safetensors``; :func:`load_classifier` opens the shipped asset.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

ASSET = "digits-classifier"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class DigitClassifier(nn.Module):
    """Two conv stages (two 3x3 convs + 2x2 max-pool each), a hidden layer (the features) and a linear head."""

    def __init__(self, channels: tuple[int, int] | list[int] = (32, 64), hidden: int = 128, num_classes: int = 10,
                 resolution: int = 16, dropout: float = 0.2):
        super().__init__()
        c1, c2 = channels
        self.config = dict(channels=[c1, c2], hidden=hidden, num_classes=num_classes, resolution=resolution,
                           dropout=dropout)
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(c2 * (resolution // 4) ** 2, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    @property
    def num_features(self) -> int:  # torchmetrics' FID reads this from a custom feature network
        return self.config["hidden"]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1], C in {1, 3} -> (B, 1, R, R): channels averaged, resized to R if needed."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
        x = x.float().mean(dim=1, keepdim=True)
        r = self.config["resolution"]
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, hidden): the FID feature space."""
        h = self.conv(self.prepare(x))  # (B, c2, R/4, R/4)
        return F.relu(self.fc(h.flatten(1)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))

    forward = logits

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class ids (B,), in eval mode, in batches."""
        was = self.training
        self.eval()
        try:
            return torch.cat([self.logits(c).argmax(1) for c in x.split(batch_size)])
        finally:
            self.train(was)


def accuracy(net: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` classified as ``labels``."""
    return float((net.predict(images).cpu() == labels.cpu()).double().mean())


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: float = 1.5, max_rotate: float = 10.0,
            max_scale: float = 0.1, noise_std: float = 0.1) -> torch.Tensor:
    """Mild random affine jitter (shift in pixels, rotation in degrees, relative scale) and Gaussian pixel
    noise, so the classifier stays right on imperfect generated digits. Background stays at -1."""
    b, _, h, w = x.shape
    u = torch.rand(b, 4, generator=generator) * 2 - 1  # (B, 4) in [-1, 1]
    ang = u[:, 0] * math.radians(max_rotate)
    scale = 1 + u[:, 1] * max_scale
    shift = u[:, 2:] * max_shift * 2 / torch.tensor([w, h])  # pixels -> normalised [-1, 1] coordinates
    cos, sin = ang.cos() / scale, ang.sin() / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    out = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    noise = torch.randn(x.shape, generator=generator) * noise_std
    return (out + noise.to(x)).clamp(-1, 1)


def build_classifier(arch: dict | None) -> DigitClassifier:
    try:
        return DigitClassifier(**(arch or {}))
    except TypeError as e:
        raise UsageError(f"model.arch for the digit classifier: {e}") from None


def save_classifier(net: DigitClassifier, path: Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG).write_text(json.dumps({"_class_name": "DigitClassifier", **net.config}, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, path / WEIGHTS)


def load_classifier(path: str | Path | None = None, device: torch.device | str = "cpu") -> DigitClassifier:
    """The classifier in ``path`` (default: the shipped ``digits-classifier`` asset), frozen, in eval mode."""
    from safetensors.torch import load_file

    if path is None:
        from . import assets

        path = assets.path(ASSET)
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise UsageError(f"{path} is not a digit classifier folder (needs {CONFIG} and {WEIGHTS})")
    cfg = json.loads((path / CONFIG).read_text())
    cfg.pop("_class_name", None)
    net = DigitClassifier(**cfg)
    net.load_state_dict(load_file(path / WEIGHTS))
    return net.requires_grad_(False).eval().to(device)
