"""Hybrid sampling over two stock pipelines ("Distilling Diversity and Control in Diffusion Models", Gandikota &
Bau 2025, Sec. 5): the base model (the teacher) takes the first steps, where a sample's layout and diversity are
decided, the distilled model the rest -- the two-segment plan of :func:`~stepdistill.pipelines.plan.plan_hybrid`,
with the hand-off of ``pipelines.handoff``. A student whose networks are adapters of one pipeline needs no second
pipeline: ``pipelines.load_student`` runs the same plan there."""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UsageError
from .plan import MODES, TEACHER, SamplingRecipe, plan_hybrid


class HybridPipeline:
    """Base pipeline for the first ``base_steps`` steps, distilled pipeline for the rest; both stock Diffusers
    pipelines of one family (``StableDiffusionPipeline``, SDXL, ``ClassConditionalPipeline``) with the schedulers
    the caller set on them (the distilled one continues on a partial schedule, so it must take custom timesteps,
    as LCMScheduler does; the base may also be DDIM on its own grid, e.g. ``timestep_spacing="trailing"``).
    Called like a pipeline::

        hybrid = HybridPipeline(teacher_pipe, student_pipe, base_steps=1)
        images = hybrid("a handwritten digit seven", timesteps=[999, 749, 499, 249], guidance_scale=1.0).images

    ``base_guidance_scale`` is the base's CFG scale (default 1: none, the paper's setting); other keyword
    arguments (prompt, class_labels, generator, output_type ...) go to both pipelines. A student whose networks
    are adapters of one pipeline needs no second pipeline: ``pipelines.load_student`` runs the same plan there.
    """

    def __init__(self, base, distilled, base_steps: int = 1, mode: str = "replace"):
        if mode not in MODES:
            raise UsageError(f"hybrid mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.base, self.distilled, self.base_steps, self.mode = base, distilled, base_steps, mode

    @property
    def device(self):
        return self.distilled.device

    def to(self, device):
        self.base.to(device)
        self.distilled.to(device)
        return self

    def set_progress_bar_config(self, **kwargs):
        self.base.set_progress_bar_config(**kwargs)
        self.distilled.set_progress_bar_config(**kwargs)

    def plan(self, timesteps=None, num_inference_steps=None, guidance_scale: float = 1.0,
             base_guidance_scale: float = 1.0) -> SamplingRecipe:
        sched_d, sched_b = self.distilled.scheduler, self.base.scheduler
        if timesteps is None and num_inference_steps is None:
            raise UsageError("HybridPipeline needs timesteps or num_inference_steps")
        recipe = SamplingRecipe(scheduler=type(sched_d).__name__, scheduler_kwargs=dict(sched_d.config),
                                timesteps=list(timesteps) if timesteps else None,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
        return plan_hybrid(recipe, recipe.resolved_timesteps(sched_d.config), self.base_steps, self.mode,
                           (type(sched_b).__name__, dict(sched_b.config)), base_guidance_scale)

    @torch.no_grad()
    def __call__(self, *args, timesteps: Sequence[int] | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float = 1.0, base_guidance_scale: float = 1.0, generator=None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None, **kwargs):
        from .runner import run_pipelines

        recipe = self.plan(timesteps, num_inference_steps, guidance_scale, base_guidance_scale)
        networks = {TEACHER: (self.base, None), "student": (self.distilled, None)}
        configs = {id(p): dict(p.scheduler.config) for p in (self.base, self.distilled)}
        return run_pipelines(recipe, recipe.plan_segments(), networks, "student", configs, args, kwargs,
                             generator=generator, output_type=output_type, return_dict=return_dict,
                             callback_on_step_end=callback_on_step_end)
