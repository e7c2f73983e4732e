"""Fréchet distance (FID, Heusel et al. 2017) through the field's tools, in any feature space.

- :func:`fid_from_features` -- two ``(N, D)`` feature arrays, clean-fid's ``frechet_distance`` on their
  mean / covariance (the numbers clean-fid reports for the same features).
- :func:`fid_metric` -- torchmetrics' ``FrechetInceptionDistance`` with ``feature=`` a feature module, fed
  images in memory; its real statistics can come from a cached reference (:class:`FIDStats`).
- :func:`folder_fid` -- clean-fid's folder-vs-folder FID (its "clean" resize; Inception by default, fetched
  by clean-fid on a connected machine, or a custom feature extractor).

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError


@dataclass
class FIDStats:
    """Mean and covariance (float64) of ``n`` feature vectors."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    n: int

    @classmethod
    def from_features(cls, feats) -> "FIDStats":
        f = _as_2d(feats)
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), len(f))


def _as_2d(feats) -> np.ndarray:
    f = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    f = f.astype(np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if len(f) < 2:
        raise UsageError(f"FID needs at least 2 samples per set, got {len(f)}")
    return f


def fid_from_stats(a: FIDStats, b: FIDStats) -> float:
    """Fréchet distance of two Gaussians (clean-fid's ``frechet_distance``); tiny negative round-off -> 0."""
    from cleanfid.fid import frechet_distance

    if a.mu.shape != b.mu.shape:
        raise UsageError(f"feature sizes differ ({a.mu.shape[0]} vs {b.mu.shape[0]}): compare sets in one "
                         f"feature space")
    return max(float(frechet_distance(a.mu, a.sigma, b.mu, b.sigma)), 0.0)


def fid_from_features(a, b) -> float:
    """FID between two ``(N, D)`` feature arrays (numpy or torch)."""
    return fid_from_stats(FIDStats.from_features(a), FIDStats.from_features(b))


# ---- torchmetrics, in memory ----------------------------------------------------------------------
def fid_metric(feature: torch.nn.Module, real: FIDStats | None = None):
    """torchmetrics ``FrechetInceptionDistance(feature=feature)`` taking float images in [0, 1]; ``real``
    pre-loads the reference statistics into its running sums, so only generated images need updating."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)
    if real is not None:
        load_real_stats(metric, real)
    return metric


def load_real_stats(metric, stats: FIDStats) -> None:
    """Set a torchmetrics FID's real-feature sums from (mu, sigma, n): sum = n mu, sum xx^T = (n-1) S + n mu mu^T."""
    mu = torch.as_tensor(stats.mu, dtype=torch.float64)
    sigma = torch.as_tensor(stats.sigma, dtype=torch.float64)
    if mu.shape[0] != metric.real_features_sum.shape[0]:
        raise UsageError(f"reference statistics have {mu.shape[0]} features, the extractor gives "
                         f"{metric.real_features_sum.shape[0]}; rebuild the reference cache")
    device = metric.real_features_sum.device
    metric.real_features_sum = (stats.n * mu).to(device)
    metric.real_features_cov_sum = ((stats.n - 1) * sigma + stats.n * torch.outer(mu, mu)).to(device)
    metric.real_features_num_samples = torch.tensor(stats.n, device=device)


# ---- clean-fid, folders ---------------------------------------------------------------------------
def folder_fid(dir1: str | Path, dir2: str | Path, extractor=None, device: str | torch.device = "cpu",
               batch_size: int = 64) -> float:
    """clean-fid's folder-vs-folder FID. ``extractor=None``: clean-fid's Inception (it downloads its
    weights on first use); otherwise a :class:`~stepdistill.eval.features.FeatureExtractor`."""
    from cleanfid import fid

    kwargs = {}
    if extractor is not None:
        from .features import CleanFIDAdapter

        kwargs = dict(custom_feat_extractor=CleanFIDAdapter(extractor), custom_fn_resize=_no_resize)
    return float(fid.compute_fid(str(dir1), str(dir2), mode="clean", num_workers=0, batch_size=batch_size,
                                 device=torch.device(device), verbose=False, **kwargs))


def _no_resize(img: np.ndarray) -> np.ndarray:
    """clean-fid resize hook for extractors that resize themselves (HxWx3 uint8 in, unchanged out)."""
    return img
