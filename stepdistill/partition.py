"""Partitions of the condition space into K parts (multi-student distillation): class ids into consecutive
ranges or an explicit mapping, and prompts into balanced parts of their pooled text embedding. Pure functions of
their inputs (deterministic); the result is stored as a router in the student's ``sampling.json``.

Prompts: the training prompts' embeddings are split into K parts of equal size along their principal directions
(recursive halving along the leading principal component of each part, then equal-count slices when K is not a
power of two). K-means would give unbalanced clusters (Song et al. 2024 report the same). A prompt routes to the
part of its nearest *anchor*: every training prompt's embedding is an anchor of its own part (up to
``max_anchors`` per part, then k-means centres inside the part), so the training prompts route to exactly their
part and unseen prompts to the part of the most similar training prompt.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def label_parts(num_classes: int, k: int, mapping: Mapping[int, int] | None = None) -> list[list[int]]:
    """Class ids 0..num_classes-1 in k parts: consecutive ranges as equal as can be, or ``mapping`` (id -> part)."""
    if not 1 <= k <= num_classes:
        raise ValueError(f"cannot split {num_classes} classes into {k} parts")
    if mapping is not None:
        missing = sorted(set(range(num_classes)) - {int(c) for c in mapping})
        bad = sorted({int(p) for p in mapping.values()} - set(range(k)))
        if missing or bad:
            raise ValueError(f"the class mapping must give every class 0..{num_classes - 1} a part 0..{k - 1} "
                             f"(missing classes {missing}, unknown parts {bad})")
        parts = [sorted(int(c) for c, p in mapping.items() if int(p) == i) for i in range(k)]
        if any(not p for p in parts):
            raise ValueError(f"the class mapping leaves part(s) {[i for i, p in enumerate(parts) if not p]} empty")
        return parts
    bounds = [round(i * num_classes / k) for i in range(k + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def balanced_split(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) part index 0..k-1 of each row of x (N, D): parts of N/k rows (+-1), split along principal directions."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} conditions into {k} parts")
    out = torch.empty(n, dtype=torch.long)

    def split(idx: torch.Tensor, first: int, parts: int) -> None:
        if parts == 1:
            out[idx] = first
            return
        sub = x[idx].double()
        sub = sub - sub.mean(dim=0)
        direction = torch.linalg.svd(sub, full_matrices=False).Vh[0] if len(idx) > 1 else torch.ones(x.shape[1])
        direction = direction * (1 if direction[direction.abs().argmax()] >= 0 else -1)  # deterministic sign
        order = idx[torch.argsort(sub @ direction.double(), stable=True)]
        left = parts // 2
        cut = round(len(idx) * left / parts)
        split(order[:cut], first, left)
        split(order[cut:], first + left, parts - left)

    split(torch.arange(n), 0, k)
    return out


def kmeans(x: torch.Tensor, k: int, iters: int = 25) -> torch.Tensor:
    """k centres of x (deterministic: initialised at evenly spaced rows of x sorted by its first principal
    component)."""
    x = x.double()
    pc = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[0]
    order = torch.argsort(x @ pc, stable=True)
    c = x[order[torch.linspace(0, len(x) - 1, k).round().long()]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        for j in range(k):
            if (a == j).any():
                c[j] = x[a == j].mean(0)
    return c


def prompt_parts(embeddings: torch.Tensor, k: int, max_anchors: int = 256
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Balanced parts of the training prompts' pooled embeddings (N, D): (part per prompt, anchors per part)."""
    x = embeddings.double()
    part = balanced_split(x, k)
    anchors = []
    for j in range(k):
        own = x[part == j]
        anchors.append(own if len(own) <= max_anchors else kmeans(own, max_anchors))
    return part, anchors


def route_by_anchors(embeddings: torch.Tensor, anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) part of the nearest anchor."""
    owner = torch.cat([torch.full((len(a),), j, dtype=torch.long) for j, a in enumerate(anchors)])
    return owner[torch.cdist(embeddings.double(), torch.cat([a.double() for a in anchors])).argmin(1)]
