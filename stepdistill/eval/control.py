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
from ..pipelines.samplers import Conditions, PipelineSampler, Sampler

CONTROL = "control"


def mean_ink(images: torch.Tensor) -> torch.Tensor:
    """Per image: mean gray value in [0, 1] (digits are bright strokes on black); bold strokes raise it."""
    return images.float().mean(dim=(1, 2, 3))


def _pipeline_sampler(sampler: Sampler) -> PipelineSampler:
    if not isinstance(sampler, PipelineSampler):
        raise UsageError(f"control LoRAs stack on Diffusers pipelines (load_lora_weights / set_adapters); a "
                         f"{type(sampler).__name__} has none")
    return sampler


def load_control(sampler: Sampler, lora_dir: str | Path, name: str = CONTROL) -> None:
    """Load the control LoRA into every pipeline of ``sampler`` as adapter ``name`` (beside any student LoRA); it
    stays off until :func:`control` stacks it."""
    for pipe in _pipeline_sampler(sampler).pipes:
        if name not in (getattr(pipe.unet, "peft_config", None) or {}):
            pipe.load_lora_weights(str(lora_dir), adapter_name=name)


@contextlib.contextmanager
def control(sampler: Sampler, weight: float, name: str = CONTROL) -> Iterator[None]:
    """The control adapter at ``weight`` stacked on every network the plan runs (0: off), restored afterwards."""
    ps = _pipeline_sampler(sampler)
    if any(name not in (getattr(p.unet, "peft_config", None) or {}) for p in ps.pipes):
        raise UsageError(f"control adapter {name!r} is not loaded; call load_control first")
    before = dict(ps.stack)
    ps.stack = {**before, name: weight} if weight else {k: v for k, v in before.items() if k != name}
    try:
        yield
    finally:
        ps.stack = before


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
