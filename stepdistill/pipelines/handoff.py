"""Hand-offs between schedulers: where one plan segment continues another's trajectory on a different stock
scheduler, the latent is converted between the two schedulers' latent spaces here, and only here. VP schedulers
(DDIM, LCM, TCD, DPM-Solver) step ``x_t = a_t x0 + s_t eps``, Euler-type schedulers step ``x_t / a_t``
(``NoiseSchedule.ve_sigma``). A pair is refused (``UsageError``) when that is not exact: different noise schedules,
or a sigma-scaled scheduler whose sigma at the hand-off is not the schedule's (Karras sigmas ...)."""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import torch

from ..errors import UsageError
from ..schedules import NoiseSchedule
from .sampling import randn


def schedule_of(scheduler) -> NoiseSchedule:
    return NoiseSchedule(scheduler.alphas_cumprod)


def check_schedules(schedulers: Sequence) -> NoiseSchedule:
    """The noise schedule the schedulers share; UsageError if they differ."""
    first = schedule_of(schedulers[0])
    for other in schedulers[1:]:
        b = schedule_of(other)
        if first.num_train_timesteps != b.num_train_timesteps or not torch.allclose(
                first.alphas_cumprod, b.alphas_cumprod, rtol=1e-4, atol=1e-7):
            raise UsageError(f"the {type(schedulers[0]).__name__} and {type(other).__name__} schedulers of this plan "
                             f"have different noise schedules (alphas_cumprod); a plan needs one schedule, so build "
                             f"every scheduler from the teacher's config")
    return first


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
        raise UsageError(f"{name} has init_noise_sigma != 1 but no sigmas; cannot convert its latents for a "
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
                         f"{ts}; use LCMScheduler, TCDScheduler or EulerDiscreteScheduler for this plan")
    return {"num_inference_steps": len(ts)}


def set_schedule(scheduler, timesteps: Sequence[int], device=None) -> dict[str, Any]:
    """Set ``scheduler`` to exactly ``timesteps``; returns the kwargs that did it."""
    kw = schedule_kwargs(scheduler, timesteps)
    try:
        scheduler.set_timesteps(**kw, device=device)
    except ValueError as e:  # e.g. Euler with use_karras_sigmas refuses custom timesteps
        raise UsageError(f"{type(scheduler).__name__} cannot run the plan's timesteps {list(timesteps)}: "
                         f"{str(e).splitlines()[0]}") from None
    return kw


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
    """q(x_t | x0) with per-sample noise from ``generator`` (a segment that starts a new trajectory)."""
    eps = randn(tuple(x0.shape), generator, x0.device, x0.dtype)
    return schedule.add_noise(x0, eps, t).to(x0.dtype)


def handoff(x: torch.Tensor, entry: str, prev_scheduler, prev_index: int, scheduler, index: int, first_t: int,
            schedule: NoiseSchedule, generator) -> torch.Tensor:
    """The previous segment's output in ``scheduler``'s latent space at ``scheduler.timesteps[index]``: its latent
    at the same timestep converted (``continue``), or its clean output re-noised to ``first_t`` (``renoise``)."""
    if entry == "renoise":  # VP and sigma latents agree at t = 0
        x_vp = renoise_to(x, first_t, schedule, generator)
    else:
        x_vp = x / latent_scale(prev_scheduler, prev_index, schedule)
    return x_vp * latent_scale(scheduler, index, schedule)
