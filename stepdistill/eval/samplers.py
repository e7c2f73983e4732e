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

    def scheduler(self, spec):
        base = {**self.scheduler_config, "prediction_type": self.denoiser.prediction_type}
        return make_scheduler(spec.scheduler, base, **spec.scheduler_kwargs)

    def cond(self, conds, n: int):
        if not self.conditioner.conditional:
            return None
        labels = None if conds.labels is None else conds.labels.to(self.device)
        return self.conditioner.encode(labels=labels, prompts=conds.prompts, n=n)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> what this sampler returns (images in [0, 1], or points)."""
        if self.output == "points":
            return x.float().cpu()
        if self.decode is not None:
            x = self.decode(x)
        return (x.float() / 2 + 0.5).clamp(0, 1).cpu()

    def __call__(self, spec, conds, seeds, callback=None):
        """``callback(i, t, x, x0_pred, model)`` (model 'model') runs after every step (x0 trajectories)."""
        cb = None if callback is None else (lambda i, t, x, x0: callback(i, t, x, x0, "model"))
        x = sample(self.denoiser, self.scheduler(spec), (len(seeds), *self.shape), self.cond(conds, len(seeds)),
                   num_inference_steps=None if spec.timesteps else spec.num_inference_steps,
                   timesteps=spec.timesteps or None, guidance=spec.guidance_scale, eta=spec.eta,
                   generator=_generators(seeds), device=self.device, callback=cb)
        return self.images(x)


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

    def pipeline_kwargs(self, spec, conds, seeds) -> dict[str, Any]:
        """Set the recipe's scheduler on the pipeline; the call's keyword arguments."""
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
        return kw

    def __call__(self, spec, conds, seeds):
        with torch.no_grad():
            images = self.pipe(**self.pipeline_kwargs(spec, conds, seeds)).images
        return images.float().clamp(0, 1).cpu()

    def denoiser_sampler(self) -> DenoiserSampler:
        """The same networks as a :class:`DenoiserSampler` (``pipelines.sample`` reports every step's x0, which a
        stock pipeline does not); it samples the same images as the pipeline."""
        from ..denoisers import Denoiser
        from ..models import TextConditioner
        from ..schedules import NoiseSchedule

        pipe, sdxl = self.pipe, hasattr(self.pipe, "text_encoder_2")
        toks = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
        encs = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
        unet, vae = pipe.unet, pipe.vae
        res = unet.config.sample_size * pipe.vae_scale_factor
        conditioner = TextConditioner(toks, encs, pipe.device, sdxl=sdxl, resolution=res)
        pred = self.base_config.get("prediction_type", "epsilon")
        denoiser = Denoiser(unet, NoiseSchedule.from_scheduler_config(self.base_config), pred)
        shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

        def decode(x):
            return vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample.float()

        return DenoiserSampler(denoiser, {**self.base_config, "prediction_type": pred}, shape, conditioner,
                               decode=decode, device=pipe.device)


class HybridSampler(Sampler):
    """The base model for the first ``base_steps`` steps of the distilled recipe, the distilled model for the
    rest (``pipelines.hybrid``; Gandikota & Bau 2025). ``spec`` is the distilled model's recipe; the base uses
    its scheduler class too (``base_scheduler=None``, the paper's setting), ``"ode"`` (deterministic DDIM / Euler
    steps on the same timesteps, ``pipelines.hybrid.ode_base_scheduler``) or a named scheduler; each model's from
    its own scheduler config; the base runs with ``base_guidance`` (None: no CFG). Two :class:`PipelineSampler` go
    through :class:`~stepdistill.pipelines.hybrid.HybridPipeline` (stock pipelines), two :class:`DenoiserSampler`
    through ``hybrid_sample``."""

    def __init__(self, base: Sampler, distilled: Sampler, base_steps: int = 1, mode: str = "replace",
                 base_guidance: float | None = None, base_scheduler: str | None = None,
                 base_scheduler_kwargs: dict | None = None):
        if type(base) is not type(distilled) or not isinstance(base, (DenoiserSampler, PipelineSampler)):
            raise UsageError(f"a hybrid needs two samplers of one kind (pipelines or denoisers), got "
                             f"{type(base).__name__} and {type(distilled).__name__}")
        self.base, self.distilled, self.base_steps, self.mode = base, distilled, base_steps, mode
        self.base_guidance, self.base_scheduler = base_guidance, base_scheduler
        self.base_scheduler_kwargs = dict(base_scheduler_kwargs or {})
        self.output, self.net, self.nets = distilled.output, distilled.net, [base.net, distilled.net]

    def uses_cfg(self, spec):
        return self.distilled.uses_cfg(spec) or (self.base_guidance or 1.0) > 1.0

    def timesteps(self, spec) -> list[int]:
        """The distilled recipe's timesteps (its scheduler's grid when the recipe gives a step count)."""
        if spec.timesteps:
            return [int(t) for t in spec.timesteps]
        sched = make_scheduler(spec.scheduler, getattr(self.distilled, "base_config", None) or
                               self.distilled.scheduler_config, **spec.scheduler_kwargs)
        sched.set_timesteps(spec.num_inference_steps)
        return [int(t) for t in sched.timesteps]

    def plan(self, spec):
        from ..pipelines.hybrid import plan_hybrid

        return plan_hybrid(self.timesteps(spec), self.base_steps, self.mode)

    def base_spec(self, spec):
        """The recipe the base runs: the distilled recipe, with ``base_scheduler`` if one is given."""
        if self.base_scheduler is None:
            return spec
        name, kwargs = self.base_scheduler, self.base_scheduler_kwargs
        if name == "ode":
            from ..pipelines.hybrid import ode_base_scheduler

            config = getattr(self.base, "base_config", None) or self.base.scheduler_config
            name, kwargs = ode_base_scheduler(config, self.plan(spec).base_timesteps)
        return spec.model_copy(update={"scheduler": name, "scheduler_kwargs": kwargs})

    def label(self, spec) -> str:
        w = "" if (self.base_guidance or 1.0) <= 1.0 else f" w={self.base_guidance:g}"
        sched = "" if self.base_scheduler is None else f" {self.base_scheduler.removesuffix('Scheduler')}"
        return f"hybrid {self.mode} base-{self.base_steps}{sched}{w} + {spec.label()}"

    def __call__(self, spec, conds, seeds, callback=None):
        if isinstance(self.distilled, PipelineSampler) and callback is None:
            from ..pipelines.hybrid import HybridPipeline

            kw = self.distilled.pipeline_kwargs(spec, conds, seeds)
            self.base.pipeline_kwargs(self.base_spec(spec), conds, seeds)  # sets the base pipeline's scheduler
            kw.pop("num_inference_steps", None), kw.pop("timesteps", None)
            hybrid = HybridPipeline(self.base.pipe, self.distilled.pipe, self.base_steps, self.mode)
            with torch.no_grad():
                images = hybrid(timesteps=self.timesteps(spec), base_guidance_scale=self.base_guidance or 1.0,
                                **kw).images
            return images.float().clamp(0, 1).cpu()
        base, dist = self._denoiser_samplers()
        from ..pipelines.hybrid import hybrid_sample

        x = hybrid_sample(base.denoiser, dist.denoiser, base.scheduler(self.base_spec(spec)), dist.scheduler(spec),
                          (len(seeds), *dist.shape), dist.cond(conds, len(seeds)), self.plan(spec),
                          guidance=spec.guidance_scale, base_guidance=self.base_guidance, eta=spec.eta,
                          generator=_generators(seeds), device=dist.device, callback=callback)
        return dist.images(x)

    def _denoiser_samplers(self) -> tuple[DenoiserSampler, DenoiserSampler]:
        if isinstance(self.distilled, PipelineSampler):
            return self.base.denoiser_sampler(), self.distilled.denoiser_sampler()
        return self.base, self.distilled


def parse_scheduler(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value,key=value`` (values read as YAML), e.g.
    ``DDIMScheduler:timestep_spacing=trailing``."""
    import yaml

    name, _, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"scheduler {text!r}: give NAME or NAME:key=value,key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    return name.strip(), kwargs


@contextlib.contextmanager
def count_calls(*nets: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the rows the networks are evaluated on (``[rows]``): NFE per image = rows / images; a batched
    classifier-free-guidance call on 2B rows counts as 2 evaluations per image. Several networks (a hybrid's
    base and distilled model) add up; a network passed twice counts once."""
    rows = [0]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("x"))
        rows[0] += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else 1

    unique = list({id(n): n for n in nets}.values())
    handles = [n.register_forward_pre_hook(hook, with_kwargs=True) for n in unique]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()
