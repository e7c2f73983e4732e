"""Samplers: a teacher, a student or any plan behind one call, ``sampler(recipe, conditions, seeds)`` -> images in
[0, 1] ``(B, C, H, W)`` (points ``(B, D)`` for toy2d). Noise comes from one generator per sample (seed
``seeds[i]``), so an image does not depend on the batch it is drawn in.

A sampler holds named networks (``teacher``, ``student``, experts ...) and a main one (what a plan segment without
a network name runs). :class:`DenoiserSampler` runs plans over Denoisers through ``pipelines.sample``;
:class:`PipelineSampler` over stock Diffusers pipelines (adapters switched with ``set_adapters`` in
``callback_on_step_end``). A routed plan is split into per-route sub-batches and reassembled in input order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..denoisers import Denoiser
from ..errors import UsageError
from .plan import TEACHER, SamplingRecipe, Segment
from .runner import StepCallback, run_denoisers, run_pipelines
from .sampling import seeded_generators


@dataclass
class Conditions:
    """Per-sample conditions: class / digit ids and/or prompts (None for unconditional models)."""

    labels: torch.Tensor | None = None  # (N,) long
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else len(self.prompts or [])

    def slice(self, start: int, stop: int) -> "Conditions":
        return self.index(list(range(start, min(stop, len(self)))))

    def index(self, idx: Sequence[int]) -> "Conditions":
        idx = [int(i) for i in idx]
        return Conditions(None if self.labels is None else self.labels[idx],
                          None if self.prompts is None else [self.prompts[i] for i in idx])

    def groups(self) -> list | None:
        """One key per sample naming its condition (for per-condition diversity)."""
        if self.prompts is not None:
            return list(self.prompts)
        return None if self.labels is None else self.labels.tolist()


def seeds_for(seed: int, start: int, stop: int) -> list[int]:
    return list(range(seed + start, seed + stop))


class Sampler:
    output: str = "images"  # "images" | "points"
    main: str

    @property
    def nets(self) -> list[torch.nn.Module]:
        """The networks whose calls count as NFE."""
        raise NotImplementedError

    @property
    def net(self) -> torch.nn.Module:
        return self.nets[0]

    def scheduler_config(self, network: str | None = None) -> dict:
        raise NotImplementedError

    def timesteps(self, recipe: SamplingRecipe) -> list[int]:
        """A one-segment recipe's timesteps (its scheduler's grid when it gives a step count)."""
        return recipe.resolved_timesteps(self.scheduler_config())

    def __call__(self, recipe: SamplingRecipe, conds: Conditions, seeds: Sequence[int],
                 callback: StepCallback | None = None) -> torch.Tensor:
        """Sample the whole plan. ``callback(i, t, x, x0_pred, network)`` runs after every step (unrouted plans)."""
        recipe.check_timesteps(self.scheduler_config().get("num_train_timesteps", 1000))
        if recipe.router is None:
            return self.run(recipe, recipe.plan_segments(), conds, list(seeds), callback)
        if callback is not None:
            raise UsageError("per-step x0 traces are not taken of routed plans; trace one route's student")
        router = recipe.router
        route = router.route(labels=conds.labels,
                             embeddings=self.prompt_embeddings(conds.prompts) if router.by == "prompt_embedding"
                             else None)
        out = None
        for r in route.unique().tolist():
            idx = (route == r).nonzero().flatten().tolist()
            y = self.run(recipe, router.routes[r].segments, conds.index(idx), [seeds[i] for i in idx], None)
            if out is None:
                out = torch.empty((len(route), *y.shape[1:]), dtype=y.dtype)
            out[idx] = y
        return out

    def run(self, recipe: SamplingRecipe, segments: list[Segment], conds: Conditions, seeds: list[int],
            callback: StepCallback | None) -> torch.Tensor:
        raise NotImplementedError

    def prompt_embeddings(self, prompts: Sequence[str] | None) -> torch.Tensor:
        raise UsageError("this model has no text encoder to route prompts with")


class DenoiserSampler(Sampler):
    """Plans over :class:`~stepdistill.denoisers.Denoiser`\\ s through ``pipelines.sample`` and stock schedulers
    built from the teacher's scheduler config (their ``prediction_type`` set to each network's)."""

    def __init__(self, networks: Denoiser | Mapping[str, Denoiser], scheduler_config: dict, shape: Sequence[int],
                 conditioner, decode=None, output: str = "images", device="cpu", main: str = "student"):
        self.networks = {main: networks} if isinstance(networks, Denoiser) else dict(networks)
        self.main = main if main in self.networks else next(iter(self.networks))
        self._config, self.shape = dict(scheduler_config), tuple(shape)
        self.conditioner, self.decode, self.output, self.device = conditioner, decode, output, torch.device(device)

    @property
    def denoiser(self) -> Denoiser:
        return self.networks[self.main]

    @property
    def nets(self):
        ordered = [self.networks[self.main], *self.networks.values()]  # the main network first
        return list({id(d.net): d.net for d in ordered}.values())

    def scheduler_config(self, network: str | None = None) -> dict:
        return {**self._config, "prediction_type": self.networks[network or self.main].prediction_type}

    def cond(self, conds: Conditions):
        if not self.conditioner.conditional:
            return None
        labels = None if conds.labels is None else conds.labels.to(self.device)
        return self.conditioner.encode(labels=labels, prompts=conds.prompts)

    def prompt_embeddings(self, prompts):
        if prompts is None or not hasattr(self.conditioner, "pooled"):
            return super().prompt_embeddings(prompts)
        return self.conditioner.pooled(prompts)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> what this sampler returns (images in [0, 1], or points)."""
        if self.output == "points":
            return x.float().cpu()
        if self.decode is not None:
            x = self.decode(x)
        return (x.float() / 2 + 0.5).clamp(0, 1).cpu()

    def run(self, recipe, segments, conds, seeds, callback):
        x = run_denoisers(recipe, segments, self.networks, self.main, self._config, (len(seeds), *self.shape),
                          self.cond(conds), generator=seeded_generators(seeds), device=self.device, callback=callback)
        return self.images(x)


class PipelineSampler(Sampler):
    """Plans on stock Diffusers text-to-image pipelines (``StableDiffusionPipeline``, SDXL). ``networks``: name ->
    adapter name on ``pipe`` (None: its LoRAs off, the base model), or -> (another pipeline, adapter or None: that
    pipeline as it is) for networks that are whole models of their own; default ``{"teacher": None}``. Schedulers
    are built from each pipeline's own scheduler config; ``output_type="pt"``, one generator per sample.
    ``stack``: adapters (name -> weight) active on top of every segment's (control LoRAs)."""

    def __init__(self, pipe, networks: Mapping[str, object] | None = None, main: str = TEACHER,
                 prediction_types: Mapping[str, str | None] | None = None):
        self.pipe = pipe
        nets = dict(networks or {TEACHER: None})
        self.networks = {k: (v if isinstance(v, tuple) else (pipe, v)) for k, v in nets.items()}
        self.main = main if main in self.networks else next(iter(self.networks))
        self.prediction_types = dict(prediction_types or {})
        self.configs = {id(p): dict(p.scheduler.config) for p, _ in self.networks.values()}
        self.stack: dict[str, float] = {}
        for p in self.pipes:
            p.set_progress_bar_config(disable=True)

    @property
    def pipes(self) -> list:
        ordered = [self.networks[self.main], *self.networks.values()]  # the main network's first
        return list({id(p): p for p, _ in ordered}.values())

    @property
    def nets(self):
        return [p.unet for p in self.pipes]

    def scheduler_config(self, network: str | None = None) -> dict:
        name = network or self.main
        pred = self.prediction_types.get(name)
        return {**self.configs[id(self.networks[name][0])], **({"prediction_type": pred} if pred else {})}

    def prompt_embeddings(self, prompts):
        from ..conditioners import pooled_prompt_embedding

        if prompts is None:
            return super().prompt_embeddings(prompts)
        return pooled_prompt_embedding(self.pipe.tokenizer, self.pipe.text_encoder, prompts)

    def run(self, recipe, segments, conds, seeds, callback):
        if callback is not None:  # stock pipelines do not report each step's x0: trace the same networks
            return self.denoiser_sampler().run(recipe, segments, conds, seeds, callback)
        if conds.prompts is None:
            raise UsageError("a text-to-image pipeline needs prompts (--prompts FILE)")
        images = run_pipelines(recipe, segments, self.networks, self.main, self.configs, (),
                               {"prompt": list(conds.prompts)}, generator=seeded_generators(seeds), output_type="pt",
                               stack=self.stack, prediction_types=self.prediction_types,
                               managed=[self.pipe]).images
        return images.float().clamp(0, 1).cpu()

    def denoiser_sampler(self) -> DenoiserSampler:
        """The same networks as a :class:`DenoiserSampler` (``pipelines.sample`` reports every step's x0, which a
        stock pipeline does not); it samples the same images as the pipelines."""
        from ..models import bundle_from_pipeline

        bundles = {id(p): bundle_from_pipeline(p) for p in self.pipes}
        networks = {}
        for name, (pipe, adapter) in self.networks.items():
            b = bundles[id(pipe)]
            managed = pipe is self.pipe or any(a for q, a in self.networks.values() if q is pipe)
            off = adapter is None and managed and bool(getattr(pipe.unet, "peft_config", None))
            pred = self.prediction_types.get(name) or b.prediction_type
            networks[name] = Denoiser(pipe.unet, b.schedule, pred, adapter=adapter, adapters_off=off)
        main = bundles[id(self.networks[self.main][0])]
        return DenoiserSampler(networks, main.scheduler_config, main.sample_shape, main.conditioner,
                               decode=lambda x: main.decode(x), device=self.pipe.device, main=self.main)
