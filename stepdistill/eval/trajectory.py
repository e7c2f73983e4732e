"""x0 trajectories: the decoded x0-prediction of every sampling step, as a grid (one row per sample, one column
per step) and as the distance of each step's x0 to the final image in the benchmark's feature space, which shows
when a sample's layout is fixed ("Distilling Diversity and Control in Diffusion Models", Gandikota & Bau 2025,
Sec. 4: distilled models decide the layout at the first step, base models over several)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UsageError
from ..pipelines.samplers import Conditions, DenoiserSampler, PipelineSampler, Sampler

SETTLE_TOL = 0.05  # cosine feature distance under which a step's x0 counts as the final layout


@dataclass
class Trajectory:
    timesteps: list[int]  # per step
    models: list[str]  # per step: the network that ran it (teacher, student, an expert ...)
    x0: list[torch.Tensor]  # per step: decoded x0-predictions, images in [0, 1] (B, C, H, W)
    final: torch.Tensor  # the sampler's output (B, C, H, W)

    @property
    def steps(self) -> int:
        return len(self.x0)


def traceable(sampler: Sampler, spec=None) -> bool:
    return isinstance(sampler, (DenoiserSampler, PipelineSampler)) and sampler.output == "images" and \
        (spec is None or spec.router is None)


def trace(sampler: Sampler, spec, conds: Conditions, seeds: Sequence[int]) -> Trajectory:
    """Sample with ``sampler`` and keep each step's x0-prediction (stock pipelines are traced through the same
    networks as Denoisers, ``PipelineSampler.denoiser_sampler``)."""
    if not traceable(sampler, spec):
        raise UsageError(f"cannot trace x0 predictions of a {type(sampler).__name__} with {sampler.output} output "
                         f"or of a routed plan")
    if isinstance(sampler, PipelineSampler):
        sampler = sampler.denoiser_sampler()
    decode = sampler.images
    steps: list[tuple[int, str, torch.Tensor]] = []

    def record(i, t, x, x0, model):
        steps.append((int(t), model, (x0 if x0 is not None else x).detach()))

    with torch.no_grad():
        final = sampler(spec, conds, seeds, callback=record)
        x0 = [decode(s[2]) for s in steps]
    return Trajectory([s[0] for s in steps], [s[1] for s in steps], x0, final)


def save_x0_grid(traj: Trajectory, path: Path, scale: int | None = None) -> Path:
    """PNG grid: one row per sample, one column per step (left: first step)."""
    from .images import save_grid

    stacked = torch.stack(traj.x0, dim=1)  # (B, steps, C, H, W)
    images = stacked.flatten(0, 1)
    scale = scale or max(1, 64 // images.shape[-1])
    return save_grid(images, Path(path), nrow=traj.steps, scale=scale)


@torch.no_grad()
def feature_distances(traj: Trajectory, extractor) -> list[float]:
    """Per step: mean over samples of the cosine distance between the features of the step's x0 and of the
    final image."""
    final = torch.nn.functional.normalize(extractor(traj.final).double(), dim=1)
    out = []
    for x0 in traj.x0:
        f = torch.nn.functional.normalize(extractor(x0).double(), dim=1)
        out.append(float((1 - (f * final).sum(1)).mean()))
    return out


def settle_step(distances: Sequence[float], tol: float = SETTLE_TOL) -> int | None:
    """The first step (1-based) from which every later x0 is within ``tol`` of the final image; None if the
    last step's is not."""
    settled = None
    for i in range(len(distances), 0, -1):
        if distances[i - 1] > tol:
            break
        settled = i
    return settled
