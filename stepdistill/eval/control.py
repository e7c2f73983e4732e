"""Control transfer ("Distilling Diversity and Control in Diffusion Models", Gandikota & Bau 2025, Sec. 3): a LoRA
trained on the base model (here: 'bold strokes', trained by the denoising trainer on dilated digits) is stacked
on the distilled model with Diffusers' ``set_adapters``; its effect on a measurable statistic (mean ink per
image) is compared between the two. Transfer = effect on the distilled model / effect on the base."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from ..errors import UsageError
from .samplers import Conditions, HybridSampler, PipelineSampler, Sampler

CONTROL = "control"


def mean_ink(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean gray value in [0, 1] (digits are bright strokes on black); bold strokes raise it."""
    return images.float().mean(dim=(1, 2, 3))


def pipelines_of(sampler: Sampler) -> list:
    if isinstance(sampler, HybridSampler):
        return pipelines_of(sampler.base) + pipelines_of(sampler.distilled)
    if isinstance(sampler, PipelineSampler):
        return [sampler.pipe]
    raise UsageError(f"control LoRAs stack on Diffusers pipelines (load_lora_weights / set_adapters); a "
                     f"{type(sampler).__name__} has none")


def load_control(sampler: Sampler, lora_dir: str | Path, name: str = CONTROL) -> None:
    """Load the control LoRA into every pipeline of ``sampler`` as adapter ``name`` (beside any student LoRA)."""
    for pipe in pipelines_of(sampler):
        before = _adapters(pipe)
        if name not in before:
            pipe.load_lora_weights(str(lora_dir), adapter_name=name)
        _only(pipe, before, [1.0] * len(before))


def _adapters(pipe) -> list[str]:
    return list(getattr(pipe.unet, "peft_config", {}) or {})


def _only(pipe, names: list[str], weights: list[float]) -> None:
    """Exactly these adapters active at these weights (none: LoRA off)."""
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, weights)
    else:
        pipe.disable_lora()


@contextlib.contextmanager
def control(sampler: Sampler, weight: float, name: str = CONTROL) -> Iterator[None]:
    """Every pipeline's own adapters (a student LoRA) at 1, stacked with the control adapter at ``weight``
    (``set_adapters``; 0: the control is off), restored afterwards."""
    pipes = pipelines_of(sampler)
    try:
        for pipe in pipes:
            own = [a for a in _adapters(pipe) if a != name]
            if name not in _adapters(pipe):
                raise UsageError(f"control adapter {name!r} is not loaded; call load_control first")
            names, weights = (own + [name], [1.0] * len(own) + [weight]) if weight else (own, [1.0] * len(own))
            _only(pipe, names, weights)
        yield
    finally:
        for pipe in pipes:
            own = [a for a in _adapters(pipe) if a != name]
            _only(pipe, own, [1.0] * len(own))


@torch.no_grad()
def statistic(sampler: Sampler, spec, conds: Conditions, seeds: Sequence[int], batch_size: int = 100,
              stat: Callable[[torch.Tensor], torch.Tensor] = mean_ink) -> float:
    """Mean of ``stat`` over the samples (same seeds and conditions for every configuration)."""
    vals = [stat(sampler(spec, conds.slice(i, i + batch_size), seeds[i:i + batch_size]))
            for i in range(0, len(seeds), batch_size)]
    return float(torch.cat(vals).mean())


@dataclass
class ControlEffect:
    name: str
    off: float  # statistic without the control LoRA
    on: float  # with it (stacked with the model's own LoRA)

    @property
    def effect(self) -> float:
        return self.on - self.off

    def as_dict(self) -> dict:
        return {**asdict(self), "effect": self.effect}


def control_effect(name: str, sampler: Sampler, spec, conds: Conditions, seeds: Sequence[int], weight: float = 1.0,
                   batch_size: int = 100) -> ControlEffect:
    """The statistic of ``sampler`` with the control LoRA off and on (``load_control`` first)."""
    with control(sampler, 0.0):
        off = statistic(sampler, spec, conds, seeds, batch_size)
    with control(sampler, weight):
        on = statistic(sampler, spec, conds, seeds, batch_size)
    return ControlEffect(name, off, on)


def transfer(base: ControlEffect, other: ControlEffect) -> float:
    """Share of the control's effect on the base that it keeps on another model (1 = all of it)."""
    return other.effect / base.effect if base.effect else float("nan")
