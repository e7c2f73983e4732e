"""Hybrid sampling ("Distilling Diversity and Control in Diffusion Models", Gandikota & Bau 2025, Sec. 5): the
base model takes the first ``base_steps`` steps, where a sample's layout and diversity are decided, and the
distilled model the rest, on one timestep list and one latent parameterisation.

Two modes (:func:`plan_hybrid`):

- ``replace`` (same NFE, the paper's setting): on the distilled recipe's timesteps ``[t_0, ..., t_{k-1}]`` the
  base runs steps ``0 .. b-1`` (with the recipe's scheduler: at ``t_0`` its x0 estimate, re-noised to ``t_1``)
  and hands the latent at ``t_b`` to the distilled model, which runs ``t_b .. t_{k-1}``.
- ``add`` (+b NFE): the base samples ``[t_0 .. t_{b-1}]`` to its clean estimate, which is re-noised to ``t_0``
  with fresh per-sample noise; the distilled model then runs its whole recipe from there.

The hand-off latent is converted between the two schedulers' latent spaces: VP schedulers (DDIM, LCM, TCD,
DPM-Solver) step ``x_t = a_t x0 + s_t eps``, Euler-type schedulers step ``x_t / a_t``
(``NoiseSchedule.ve_sigma``). A pair is refused (``UsageError``) when that is not exact: different noise
schedules, or a sigma-scaled scheduler whose sigma at the hand-off is not the schedule's (Karras sigmas ...).

Two forms share this plan and hand-off: :func:`hybrid_sample` (Denoisers through ``pipelines.sample``, with a
per-step x0 callback) and :class:`HybridPipeline` (two stock Diffusers pipelines: the base stops after b steps
through the stock ``callback_on_step_end`` / ``_interrupt`` and returns ``output_type="latent"``; the distilled
pipeline continues on the partial schedule from ``latents``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..denoisers import Cond, Denoiser
from ..errors import UsageError
from ..schedules import NoiseSchedule
from .sampling import _randn, sample

MODES = ("replace", "add")


# ---- the plan (pure) ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HybridPlan:
    """Which model runs which timesteps. The base runs ``base_timesteps`` and stops after ``base_steps`` of
    them; the distilled model runs ``distilled_timesteps`` from the latent at ``handoff_timestep``."""

    mode: str
    base_steps: int
    base_timesteps: list[int]
    distilled_timesteps: list[int]

    @property
    def handoff_timestep(self) -> int:
        return self.distilled_timesteps[0]

    @property
    def steps(self) -> int:
        """Model evaluations per image without guidance: base steps + distilled steps."""
        return self.base_steps + len(self.distilled_timesteps)


def plan_hybrid(timesteps: Sequence[int], base_steps: int = 1, mode: str = "replace") -> HybridPlan:
    """The hybrid schedule over the distilled recipe's (strictly decreasing) ``timesteps``."""
    ts = [int(t) for t in timesteps]
    if any(a <= b for a, b in zip(ts, ts[1:])) or not ts:
        raise UsageError(f"hybrid timesteps must be a non-empty strictly decreasing list, got {ts}")
    if mode not in MODES:
        raise UsageError(f"hybrid mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "replace":
        if not 1 <= base_steps < len(ts):
            raise UsageError(f"--hybrid-base-steps {base_steps}: mode 'replace' needs 1 <= base steps < {len(ts)} "
                             f"(the recipe's {len(ts)} steps, at least one left to the distilled model); use "
                             f"mode 'add' for a {len(ts)}-step recipe with a base step in front")
        return HybridPlan(mode, base_steps, ts, ts[base_steps:])
    if not 1 <= base_steps <= len(ts):
        raise UsageError(f"--hybrid-base-steps {base_steps}: mode 'add' needs 1 <= base steps <= {len(ts)}")
    return HybridPlan(mode, base_steps, ts[:base_steps], ts)


# ---- latent spaces --------------------------------------------------------------------------------------
def schedule_of(scheduler) -> NoiseSchedule:
    return NoiseSchedule(scheduler.alphas_cumprod)


def check_pair(base_scheduler, distilled_scheduler) -> NoiseSchedule:
    """The shared noise schedule of the two schedulers; UsageError if they differ."""
    a, b = schedule_of(base_scheduler), schedule_of(distilled_scheduler)
    if a.num_train_timesteps != b.num_train_timesteps or not torch.allclose(a.alphas_cumprod, b.alphas_cumprod,
                                                                              rtol=1e-4, atol=1e-7):
        raise UsageError(f"the base ({type(base_scheduler).__name__}) and distilled "
                         f"({type(distilled_scheduler).__name__}) schedulers have different noise schedules "
                         f"(alphas_cumprod); a hybrid needs one schedule, so build both from the teacher's config")
    return b


def sigma_scaled(scheduler) -> bool:
    """True when the scheduler steps sigma-scaled latents x_t / a_t (Euler, Heun, LMS ...), not VP latents."""
    return abs(float(scheduler.init_noise_sigma) - 1.0) > 1e-6


def latent_scale(scheduler, index: int, schedule: NoiseSchedule) -> float:
    """c such that the scheduler's latent at ``scheduler.timesteps[index]`` is c times the VP latent there
    (the scheduler's timesteps must be set). UsageError when no exact conversion exists."""
    if not sigma_scaled(scheduler):
        return 1.0
    name = type(scheduler).__name__
    if not hasattr(scheduler, "sigmas"):
        raise UsageError(f"{name} has init_noise_sigma != 1 but no sigmas; cannot convert its latents for a hybrid "
                         f"hand-off; use a VP scheduler (LCMScheduler, DDIMScheduler, TCDScheduler)")
    t, sigma = float(scheduler.timesteps[index]), float(scheduler.sigmas[index])
    expected = float(schedule.ve_sigma(int(round(t))))
    if not t.is_integer() or abs(sigma - expected) > 1e-3 * expected:
        raise UsageError(f"{name}'s sigma at the hand-off ({sigma:.4g} at timestep {t:g}) is not the noise "
                         f"schedule's ({expected:.4g}): its latents cannot be converted to the other model's "
                         f"(e.g. use_karras_sigmas); give both models schedulers on the same discrete timesteps")
    return (sigma**2 + 1) ** 0.5


def takes_timesteps(scheduler) -> bool:
    return "timesteps" in inspect.signature(scheduler.set_timesteps).parameters


def schedule_kwargs(scheduler, timesteps: Sequence[int]) -> dict[str, Any]:
    """``set_timesteps`` / pipeline kwargs that give ``scheduler`` exactly ``timesteps``: the list itself, or
    ``num_inference_steps`` for schedulers without custom timesteps (DDIM) whose own grid it is."""
    ts = [int(t) for t in timesteps]
    if takes_timesteps(scheduler):
        return {"timesteps": ts}
    scheduler.set_timesteps(len(ts))
    if [int(t) for t in scheduler.timesteps] != ts:
        raise UsageError(f"{type(scheduler).__name__} takes no custom timesteps and its {len(ts)}-step grid is not "
                         f"{ts}; use LCMScheduler, TCDScheduler or EulerDiscreteScheduler for this hybrid")
    return {"num_inference_steps": len(ts)}


def _set(scheduler, timesteps: Sequence[int], device=None) -> None:
    try:
        scheduler.set_timesteps(**schedule_kwargs(scheduler, timesteps), device=device)
    except ValueError as e:  # e.g. Euler with use_karras_sigmas refuses custom timesteps
        raise UsageError(f"{type(scheduler).__name__} cannot run the hybrid's timesteps {list(timesteps)}: "
                         f"{str(e).splitlines()[0]}") from None


def prepare(plan: HybridPlan, base_scheduler, distilled_scheduler, distilled_index: int = 0, device=None
            ) -> NoiseSchedule:
    """Set both schedulers to their stage's timesteps (the distilled one to ``plan.base_timesteps`` when it
    continues one list at ``distilled_index``) and check the hand-off converts, before any model runs."""
    schedule = check_pair(base_scheduler, distilled_scheduler)
    _set(base_scheduler, plan.base_timesteps, device)
    _set(distilled_scheduler, plan.distilled_timesteps if distilled_index == 0 else plan.base_timesteps, device)
    if plan.mode == "replace":
        latent_scale(base_scheduler, plan.base_steps, schedule)
    latent_scale(distilled_scheduler, distilled_index, schedule)
    return schedule


def ode_base_scheduler(config: dict, timesteps: Sequence[int]) -> tuple[str, dict[str, Any]]:
    """A deterministic (probability-flow ODE) scheduler for the base steps on ``timesteps``: DDIM with trailing
    spacing when its grid is exactly ``timesteps`` (e.g. [999, 749, 499, 249]), else Euler, the same first-order
    step in sigma-scaled latents (converted at the hand-off), which takes any integer timesteps."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config({**config, "timestep_spacing": "trailing"})
    ddim.set_timesteps(len(timesteps))
    if [int(t) for t in ddim.timesteps] == [int(t) for t in timesteps]:
        return "DDIMScheduler", {"timestep_spacing": "trailing"}
    return "EulerDiscreteScheduler", {"timestep_spacing": "leading"}  # leading: init sigma sqrt(sigma_max^2 + 1)


def renoise_to(x0: torch.Tensor, t: int, schedule: NoiseSchedule, generator) -> torch.Tensor:
    """q(x_t | x0) with per-sample noise from ``generator`` (mode 'add': the base's estimate back to t_0)."""
    eps = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
    return schedule.add_noise(x0, eps, t).to(x0.dtype)


def handoff(x: torch.Tensor, plan: HybridPlan, base_scheduler, distilled_scheduler, schedule: NoiseSchedule,
            generator=None, distilled_index: int = 0) -> torch.Tensor:
    """The base stage's output in the distilled scheduler's latent space at ``plan.handoff_timestep``, which is
    ``distilled_scheduler.timesteps[distilled_index]``; the base scheduler must be set to ``plan.base_timesteps``."""
    if plan.mode == "add":  # the base's clean estimate (VP and sigma latents agree at t = 0), re-noised to t_0
        x_vp = renoise_to(x, plan.handoff_timestep, schedule, generator)
    else:
        x_vp = x / latent_scale(base_scheduler, plan.base_steps, schedule)
    return x_vp * latent_scale(distilled_scheduler, distilled_index, schedule)


# ---- Denoisers through pipelines.sample -------------------------------------------------------------------
@torch.no_grad()
def hybrid_sample(base: Denoiser, distilled: Denoiser, base_scheduler, scheduler, shape: Sequence[int],
                  cond: Cond | None, plan: HybridPlan, *, guidance: float | None = None,
                  base_guidance: float | None = None, eta: float | None = None, generator=None,
                  latents: torch.Tensor | None = None, device="cpu", dtype=torch.float32,
                  callback: Callable[[int, int, torch.Tensor, torch.Tensor | None, str], None] | None = None
                  ) -> torch.Tensor:
    """Hybrid sample of two Denoisers, each with its own stock scheduler (``base_scheduler`` may be the same
    object as ``scheduler``). ``callback(i, t, x, x0_pred, model)`` runs after every step, model 'base' or
    'distilled', i counting the hybrid's steps."""
    sched_b = base_scheduler
    # replace: one list, the distilled model continues at index base_steps; add: its own list from index 0
    ts, start = (plan.base_timesteps, plan.base_steps) if plan.mode == "replace" else (plan.distilled_timesteps, 0)
    schedule = prepare(plan, sched_b, scheduler, start, device)

    def cb(model, offset):
        if callback is None:
            return None
        return lambda i, t, x, x0: callback(i + offset, t, x, x0, model)

    stop = plan.base_steps if plan.mode == "replace" else None
    x = sample(base, sched_b, shape, cond, **_steps(sched_b, plan.base_timesteps), guidance=base_guidance, eta=eta,
               generator=generator, latents=latents, device=device, dtype=dtype, callback=cb("base", 0),
               stop_index=stop)
    _set(sched_b, plan.base_timesteps, device)
    _set(scheduler, ts, device)
    x = handoff(x, plan, sched_b, scheduler, schedule, generator, distilled_index=start)
    return sample(distilled, scheduler, shape, cond, **_steps(scheduler, ts), guidance=guidance, eta=eta,
                  generator=generator, latents=x, device=device, dtype=dtype,
                  callback=cb("distilled", plan.base_steps - start), start_index=start)


def _steps(scheduler, timesteps) -> dict:
    kw = schedule_kwargs(scheduler, timesteps)
    return {"timesteps": kw.get("timesteps"), "num_inference_steps": kw.get("num_inference_steps")}


# ---- two stock pipelines ----------------------------------------------------------------------------------
def _stop_after(steps: int, user: Callable | None = None, offset: int = 0):
    """A stock ``callback_on_step_end`` that interrupts the pipeline after ``steps`` steps (Diffusers' documented
    way to end a pipeline early), calling ``user(pipe, i + offset, t, kwargs)`` first."""

    def callback(pipe, i, t, kwargs):
        out = user(pipe, i + offset, t, kwargs) if user is not None else kwargs
        if i + 1 >= steps:
            pipe._interrupt = True
        return out if out is not None else kwargs

    return callback


class HybridPipeline:
    """Base pipeline for the first ``base_steps`` steps, distilled pipeline for the rest; both stock Diffusers
    pipelines of one family (``StableDiffusionPipeline``, SDXL, ``ClassConditionalPipeline``) with schedulers the
    caller chooses (the distilled one continues on a partial schedule, so it must take custom timesteps, as
    LCMScheduler does; the base may also be DDIM on its own grid, e.g. ``timestep_spacing="trailing"``).
    Called like a pipeline::

        hybrid = HybridPipeline(teacher_pipe, student_pipe, base_steps=1)
        images = hybrid("a handwritten digit seven", timesteps=[999, 749, 499, 249], guidance_scale=1.0).images

    ``base_guidance_scale`` is the base's CFG scale (default 1: none, the paper's setting); other keyword
    arguments (prompt, class_labels, generator, output_type ...) go to both pipelines.
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

    def plan(self, timesteps=None, num_inference_steps=None) -> HybridPlan:
        if timesteps is None:
            if num_inference_steps is None:
                raise UsageError("HybridPipeline needs timesteps or num_inference_steps")
            self.distilled.scheduler.set_timesteps(num_inference_steps)
            timesteps = [int(t) for t in self.distilled.scheduler.timesteps]
        return plan_hybrid(timesteps, self.base_steps, self.mode)

    @torch.no_grad()
    def __call__(self, *args, timesteps: Sequence[int] | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float = 1.0, base_guidance_scale: float = 1.0, generator=None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None, **kwargs):
        plan = self.plan(timesteps, num_inference_steps)
        sched_b, sched_d = self.base.scheduler, self.distilled.scheduler
        if plan.mode == "replace" and not takes_timesteps(sched_d):
            raise UsageError(f"the distilled pipeline continues on a partial schedule {plan.distilled_timesteps}, "
                             f"which needs a scheduler that takes custom timesteps (LCMScheduler, TCDScheduler, "
                             f"EulerDiscreteScheduler ...); {type(sched_d).__name__} does not")
        schedule = prepare(plan, sched_b, sched_d)
        base_kw = schedule_kwargs(sched_b, plan.base_timesteps)
        dist_kw = schedule_kwargs(sched_d, plan.distilled_timesteps)
        stop = plan.base_steps if plan.mode == "replace" else len(plan.base_timesteps)
        x = self.base(*args, **base_kw, guidance_scale=base_guidance_scale, generator=generator,
                      output_type="latent", callback_on_step_end=_stop_after(stop, callback_on_step_end),
                      **kwargs).images
        # 1. hand-off: the base's latent in the distilled scheduler's space at the hand-off timestep
        _set(sched_b, plan.base_timesteps, x.device)
        _set(sched_d, plan.distilled_timesteps, x.device)
        x = handoff(x, plan, sched_b, sched_d, schedule, generator)
        # 2. stock pipelines multiply given latents by init_noise_sigma
        latents = x / sched_d.init_noise_sigma
        user = None if callback_on_step_end is None else _stop_after(1 << 30, callback_on_step_end, plan.base_steps)
        return self.distilled(*args, **dist_kw, guidance_scale=guidance_scale,
                              generator=generator, latents=latents.to(self.distilled.device), output_type=output_type,
                              return_dict=return_dict, callback_on_step_end=user, **kwargs)
