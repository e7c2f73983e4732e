"""One sampling loop for every Denoiser, driven by a stock Diffusers scheduler (DDIM, LCM, TCD, ...).

It follows Diffusers' pipelines step for step (``set_timesteps``, ``init_noise_sigma``,
``scale_model_input``, ``step`` with ``eta`` / ``generator`` where the scheduler takes them), so a
student sampled here matches the same student inside a stock pipeline.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch

from ..denoisers import Cond, Denoiser


def seeded_generators(seed: int | Sequence[int], n: int | None = None, start: int = 0) -> list[torch.Generator]:
    """Per-sample generators: ``seed + start + i`` for i < n, or one per seed of a list. Sample i is then the
    same whatever the batch it is drawn in."""
    seeds = [seed + start + i for i in range(n)] if isinstance(seed, int) else list(seed)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def make_scheduler(name: str, base_config: dict, **kwargs):
    """A stock Diffusers scheduler class by name, from the teacher's scheduler config plus ``kwargs``."""
    import diffusers

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        from ..errors import UsageError

        raise UsageError(f"unknown scheduler {name!r}; use a Diffusers scheduler class name such as "
                         f"DDIMScheduler, LCMScheduler or TCDScheduler")
    return cls.from_config({**base_config, **kwargs})


def randn(shape, generator, device, dtype) -> torch.Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


@torch.no_grad()
def sample(denoiser: Denoiser | Callable[[int], Denoiser], scheduler, shape: Sequence[int],
           cond: Cond | None = None, *, num_inference_steps: int | None = None,
           timesteps: Sequence[int] | None = None, guidance: float | None = None, eta: float | None = None,
           generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
           callback: Callable[[int, int, torch.Tensor, torch.Tensor | None], bool | None] | None = None,
           start_index: int = 0, stop_index: int | None = None) -> torch.Tensor:
    """Draw ``shape`` samples (model space). ``denoiser`` may be a function of the step index (networks that
    take turns on one schedule); an output in another prediction type than the scheduler's is converted.
    ``callback(i, t, x, x0_pred)`` runs after every step; when it returns True the loop stops there (a hand-off,
    like a stock pipeline's ``_interrupt``). ``start_index`` / ``stop_index`` run a slice of the schedule."""
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps), device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    if latents is None:
        latents = randn(tuple(shape), generator, torch.device(device), dtype) * scheduler.init_noise_sigma
    x = latents.to(device=device, dtype=dtype)
    step_params = set(inspect.signature(scheduler.step).parameters)
    extra = {}
    if "eta" in step_params and eta is not None:
        extra["eta"] = eta
    if "generator" in step_params:
        extra["generator"] = generator
    pick = denoiser if not isinstance(denoiser, Denoiser) else (lambda i: denoiser)
    wanted = scheduler.config.get("prediction_type", None)
    ts = scheduler.timesteps
    if start_index and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start_index)
    for i in range(start_index, len(ts) if stop_index is None else stop_index):
        t = ts[i]
        net = pick(i)
        model_in = scheduler.scale_model_input(x, t)
        out = net.predict(model_in, t, cond, guidance)
        if wanted and net.prediction_type != wanted:  # the scheduler reads its own parameterisation
            tt = torch.as_tensor(t, device=x.device).expand(x.shape[0])
            out = net.schedule.convert(out, model_in, tt, net.prediction_type, wanted)
        res = scheduler.step(out, t, x, **extra, return_dict=True)
        x = res.prev_sample
        if callback is not None:
            x0 = getattr(res, "pred_original_sample", None)
            if x0 is None:
                x0 = getattr(res, "denoised", None)
            if callback(i, int(t), x, x0):
                break
    return x
