"""What ``stepdistill eval`` samples: a :class:`SamplerSpec` (the sampling recipe, the same fields as a run's
``student/sampling.json``) applied by a :class:`Sampler` (a teacher or student behind one call).

``Sampler(spec, conditions, seeds)`` returns images in [0, 1] ``(B, C, H, W)`` (or points ``(B, D)`` for
toy2d). Noise comes from one generator per sample (seed ``seeds[i]``), so an image does not depend on the
batch it is drawn in. Samplers go through stock Diffusers schedulers (``pipelines.sample`` for Denoisers,
the stock ``StableDiffusionPipeline`` for text-to-image models).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..errors import UsageError
from ..pipelines import make_scheduler, sample
from ..recipe import SamplingRecipe


SamplerSpec = SamplingRecipe  # one recipe schema for students and evaluated teacher configurations


@dataclass
class Conditions:
    """Per-sample conditions: class / digit ids and/or prompts (None for unconditional models)."""

    labels: torch.Tensor | None = None  # (N,) long
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.prompts or [])

    def slice(self, start: int, stop: int) -> "Conditions":
        return Conditions(None if self.labels is None else self.labels[start:stop],
                          None if self.prompts is None else self.prompts[start:stop])

    def groups(self) -> list | None:
        """One key per sample naming its condition (for per-condition diversity)."""
        if self.prompts is not None:
            return list(self.prompts)
        return None if self.labels is None else self.labels.tolist()


def seeds_for(seed: int, start: int, stop: int) -> list[int]:
    return list(range(seed + start, seed + stop))


# ---- samplers -------------------------------------------------------------------------------------
class Sampler:
    output: str = "images"  # "images" | "points"
    net: torch.nn.Module  # the network whose calls count as NFE

    def uses_cfg(self, spec: SamplerSpec) -> bool:
        return spec.guidance_scale is not None and spec.guidance_scale != 1.0

    def __call__(self, spec: SamplerSpec, conds: Conditions, seeds: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class DenoiserSampler(Sampler):
    """Any :class:`~stepdistill.denoisers.Denoiser` through ``pipelines.sample`` and a stock scheduler built
    from the teacher's scheduler config (its ``prediction_type`` set to the Denoiser's)."""

    def __init__(self, denoiser, scheduler_config: dict, shape: Sequence[int], conditioner, decode=None,
                 output: str = "images", device="cpu"):
        self.denoiser, self.scheduler_config, self.shape = denoiser, dict(scheduler_config), tuple(shape)
        self.conditioner, self.decode, self.output, self.device = conditioner, decode, output, torch.device(device)
        self.net = denoiser.net

    def uses_cfg(self, spec):
        return super().uses_cfg(spec) and self.conditioner.conditional

    def __call__(self, spec, conds, seeds):
        base = {**self.scheduler_config, "prediction_type": self.denoiser.prediction_type}
        scheduler = make_scheduler(spec.scheduler, base, **spec.scheduler_kwargs)
        cond = None
        if self.conditioner.conditional:
            labels = None if conds.labels is None else conds.labels.to(self.device)
            cond = self.conditioner.encode(labels=labels, prompts=conds.prompts, n=len(seeds))
        x = sample(self.denoiser, scheduler, (len(seeds), *self.shape), cond,
                   num_inference_steps=None if spec.timesteps else spec.num_inference_steps,
                   timesteps=spec.timesteps or None, guidance=spec.guidance_scale, eta=spec.eta,
                   generator=_generators(seeds), device=self.device)
        if self.output == "points":
            return x.float().cpu()
        if self.decode is not None:
            x = self.decode(x)
        return (x.float() / 2 + 0.5).clamp(0, 1).cpu()


class PipelineSampler(Sampler):
    """A stock Diffusers text-to-image pipeline (``StableDiffusionPipeline``, SDXL): the recipe's scheduler
    is built from the pipeline's own scheduler config; ``output_type="pt"``, one generator per sample."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.base_config = dict(pipe.scheduler.config)
        self.net = pipe.unet
        pipe.set_progress_bar_config(disable=True)

    def uses_cfg(self, spec):
        return spec.guidance_scale is not None and spec.guidance_scale > 1.0

    def __call__(self, spec, conds, seeds):
        if conds.prompts is None:
            raise UsageError("a text-to-image pipeline needs prompts (--prompts FILE)")
        self.pipe.scheduler = make_scheduler(spec.scheduler, self.base_config, **spec.scheduler_kwargs)
        kw: dict[str, Any] = dict(prompt=list(conds.prompts), generator=_generators(seeds), output_type="pt",
                                  guidance_scale=1.0 if spec.guidance_scale is None else spec.guidance_scale)
        if spec.timesteps:
            kw["timesteps"] = list(spec.timesteps)
        else:
            kw["num_inference_steps"] = spec.num_inference_steps
        if spec.eta is not None:
            kw["eta"] = spec.eta
        with torch.no_grad():
            images = self.pipe(**kw).images
        return images.float().clamp(0, 1).cpu()


@contextlib.contextmanager
def count_calls(net: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the rows a network is evaluated on (``[rows]``): NFE per image = rows / images; a batched
    classifier-free-guidance call on 2B rows counts as 2 evaluations per image."""
    rows = [0]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("x"))
        rows[0] += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else 1

    handle = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()
