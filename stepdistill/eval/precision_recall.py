"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019), k-NN manifold estimate with k = 3.

Each set's manifold is the union of balls around its points, each ball reaching that point's k-th nearest
neighbour in the same set. Precision: share of generated samples inside the real manifold (fidelity);
recall: share of real samples inside the generated manifold (coverage).
"""

from __future__ import annotations

import numpy as np
import torch


def _t(x) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).double().cpu()


def knn_radii(feats: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Distance from every point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(feats) <= k:
        raise ValueError(f"need more than k={k} points for the k-NN manifold, got {len(feats)}")
    out = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats)  # (c, N)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def _inside(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For each query point: does it lie within radii[j] of some support point j?"""
    out = []
    for i in range(0, len(query), chunk):
        d = torch.cdist(query[i:i + chunk], support)  # (c, M)
        out.append((d <= radii[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of ``fake`` against ``real``, both ``(N, D)`` features."""
    real, fake = _t(real), _t(fake)
    precision = _inside(fake, real, knn_radii(real, k)).double().mean()
    recall = _inside(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)
