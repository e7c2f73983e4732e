"""Reference sets for FID / precision-recall: features of real data, cached as ``.npz`` keyed by dataset +
feature extractor (the extractor's name carries a hash of its weights)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .features import FeatureExtractor, extract
from .fid import FIDStats


@dataclass
class Reference:
    name: str  # e.g. "digits-train"
    features: torch.Tensor  # (N, D) float32
    stats: FIDStats


def cache_dir() -> Path:
    """``$STEPDISTILL_CACHE/fid`` or ``~/.cache/stepdistill/fid``."""
    root = os.environ.get("STEPDISTILL_CACHE") or Path.home() / ".cache" / "stepdistill"
    return Path(root) / "fid"


def cache_file(dataset: str, extractor: FeatureExtractor, root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{dataset}__{extractor.name}.npz"


def reference(dataset: str, extractor: FeatureExtractor, batches: Callable[[], Iterable[torch.Tensor]] | None,
              total: int | None = None, root: Path | None = None, progress: bool = True,
              build: Callable[[], torch.Tensor] | None = None) -> Reference:
    """Cached reference features / statistics of ``dataset``; on a cache miss built from ``batches()`` (images
    in [0, 1]) or ``build()`` (features), and written atomically."""
    path = cache_file(dataset, extractor, root)
    if path.exists():
        try:
            with np.load(path) as z:
                feats = torch.from_numpy(z["features"])
                return Reference(dataset, feats, FIDStats(z["mu"], z["sigma"], int(z["n"])))
        except (OSError, KeyError, ValueError):
            pass  # unreadable cache: rebuild below
    if build is not None:
        feats = build().float()
    else:
        feats = extract(extractor, batches(), total=total, desc=f"reference {dataset}", progress=progress).float()
    stats = FIDStats.from_features(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, features=feats.numpy(), mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n))
    os.replace(tmp, path)
    return Reference(dataset, feats, stats)
