"""Sample diversity for one condition: mean pairwise feature distance between samples drawn with different
seeds (the LPIPS / DreamSim pairwise diversity of Phased DMD and of Gandikota & Bau 2025, here in the
benchmark's feature space), averaged over conditions."""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence

import numpy as np
import torch


def pairwise_distance(feats: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Condensed pairwise distances of ``(N, D)`` features: cosine distance 1 - cos, or Euclidean ``l2``."""
    f = feats.double()
    if metric == "cosine":
        f = torch.nn.functional.normalize(f, dim=1)
        sim = f @ f.T
        iu = torch.triu_indices(len(f), len(f), offset=1)
        return 1 - sim[iu[0], iu[1]]
    if metric == "l2":
        return torch.pdist(f)
    raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")


def diversity(feats, groups: Sequence[Hashable] | None = None, metric: str = "cosine",
              max_per_group: int = 256) -> float | None:
    """Mean over conditions (``groups``, one key per sample; None: one group) of the mean pairwise distance
    among that condition's samples; conditions with one sample are skipped. None if no pair exists."""
    f = feats if isinstance(feats, torch.Tensor) else torch.as_tensor(np.asarray(feats))
    keys = list(groups) if groups is not None else [0] * len(f)
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        if len(members[key]) < max_per_group:
            members[key].append(i)
    means = [float(pairwise_distance(f[idx], metric).mean()) for idx in members.values() if len(idx) >= 2]
    return float(np.mean(means)) if means else None
