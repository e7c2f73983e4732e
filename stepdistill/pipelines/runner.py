"""Run a plan's segments (``pipelines.plan``): over Denoisers through :func:`pipelines.sample`, or over stock
Diffusers pipelines, whose networks take turns through ``set_adapters`` inside the stock
``callback_on_step_end`` and hand latents over between scheduler passes (``output_type="latent"`` + ``latents``).
Both forms give the same images; hand-off conversions come from ``pipelines.handoff``."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..denoisers import Cond, Denoiser
from ..errors import UsageError
from .handoff import check_schedules, handoff, latent_scale, set_schedule, takes_timesteps
from .plan import Pass, SamplingRecipe, Segment, passes
from .sampling import make_scheduler, sample

StepCallback = Callable[[int, int, torch.Tensor, "torch.Tensor | None", str], None]


def _prepare(ps: list[Pass], schedulers: list, partial: bool, device=None):
    """Set every pass's scheduler to its timesteps and check each hand-off converts, before any network runs.
    ``partial``: a continuing pass's scheduler gets only its own part of the chain (stock pipelines start at
    index 0), else the whole chain with a begin index. Returns the shared schedule and each pass's kwargs."""
    schedule = check_schedules(schedulers)
    kws = []
    for p, sched in zip(ps, schedulers):
        if p.chain is None:
            sched.set_timesteps(p.num_inference_steps, device=device)
            kws.append({"num_inference_steps": p.num_inference_steps})
            continue
        chain = list(p.chain[p.start:]) if partial else list(p.chain)
        if partial and p.entry == "continue" and not takes_timesteps(sched):
            raise UsageError(f"the {p.networks[0] or 'student'} segment continues on a partial schedule {chain}, "
                             f"which needs a scheduler that takes custom timesteps (LCMScheduler, TCDScheduler, "
                             f"EulerDiscreteScheduler ...); {type(sched).__name__} does not")
        kws.append(set_schedule(sched, chain, device))
    for k, (p, sched) in enumerate(zip(ps, schedulers)):
        offset = p.start if partial else 0
        if p.entry == "continue":
            latent_scale(schedulers[k - 1], p.start - (ps[k - 1].start if partial else 0), schedule)
        latent_scale(sched, p.start - offset, schedule)
    return schedule, kws


# ---- Denoisers ------------------------------------------------------------------------------------------
@torch.no_grad()
def run_denoisers(recipe: SamplingRecipe, segments: Sequence[Segment], networks: dict[str, Denoiser], main: str,
                  scheduler_config: dict, shape: Sequence[int], cond: Cond | None, *, generator=None,
                  device="cpu", dtype=torch.float32, callback: StepCallback | None = None) -> torch.Tensor:
    """Sample a plan over Denoisers (model space). ``callback(i, t, x, x0_pred, network)`` after every step."""
    ps = passes(recipe, segments)

    def net(name):
        key = name or main
        if key not in networks:
            raise UsageError(f"the plan names network {key!r}; this sampler has {sorted(networks)}")
        return networks[key]

    schedulers = [make_scheduler(p.scheduler, {**scheduler_config,
                                                "prediction_type": net(p.networks[0]).prediction_type},
                                 **p.scheduler_kwargs) for p in ps]
    schedule, kws = _prepare(ps, schedulers, partial=False, device=device)
    x, done = None, 0
    for k, (p, sched) in enumerate(zip(ps, schedulers)):
        if p.entry != "noise":
            x = handoff(x, p.entry, schedulers[k - 1], p.start, sched, p.start, p.chain[0], schedule, generator)
        pick = (lambda i, p=p: net(p.networks[min(i - p.start, len(p.networks) - 1)]))
        cb = None
        if callback is not None:
            cb = (lambda i, t, xx, x0, p=p, off=done - p.start:
                  callback(i + off, t, xx, x0, p.networks[min(i - p.start, len(p.networks) - 1)] or main))
        x = sample(pick, sched, shape, cond, timesteps=kws[k].get("timesteps"),
                   num_inference_steps=kws[k].get("num_inference_steps"), guidance=p.guidance_scale, eta=recipe.eta,
                   generator=generator, latents=x, device=device, dtype=dtype, callback=cb, start_index=p.start,
                   stop_index=p.stop)
        done += (p.stop or len(sched.timesteps)) - p.start
    return x


# ---- stock pipelines --------------------------------------------------------------------------------------
def select(pipe, adapter: str | None, stack: dict[str, float] | None = None) -> None:
    """Exactly ``adapter`` (None: no own adapter) plus the ``stack`` adapters at their weights active on ``pipe``
    (Diffusers' ``set_adapters`` / ``disable_lora``)."""
    names = ([adapter] if adapter else []) + list(stack or {})
    weights = ([1.0] if adapter else []) + list((stack or {}).values())
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, weights)
    elif getattr(pipe.unet, "peft_config", None):
        pipe.disable_lora()


@torch.no_grad()
def run_pipelines(recipe: SamplingRecipe, segments: Sequence[Segment], networks: dict[str, tuple], main: str,
                  base_configs: dict[int, dict], args: tuple = (), kwargs: dict | None = None, *, generator=None,
                  output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None,
                  stack: dict[str, float] | None = None, prediction_types: dict[str, str | None] | None = None,
                  managed: Sequence = ()):
    """Sample a plan on stock pipelines. ``networks``: name -> (pipeline, adapter or None: its LoRA off when it
    carries adapters that other networks use); ``base_configs``: id(pipeline) -> its own scheduler config;
    ``args`` / ``kwargs``: the call's prompt / class_labels ... for every pipeline. Each scheduler pass is one
    pipeline call (``latents`` in, ``output_type="latent"`` out at the hand-off), segments inside a pass switch
    adapters in ``callback_on_step_end``; the user's callback sees the plan's global step index.
    ``managed``: pipelines whose active adapters every pass sets (exactly the network's plus ``stack``), besides
    those where a network names an adapter; other pipelines run as the caller set them."""
    kwargs = dict(kwargs or {})

    def entry(name):
        key = name or main
        if key not in networks:
            raise UsageError(f"the plan names network {key!r}; this pipeline has {sorted(networks)}")
        return networks[key]

    ps = passes(recipe, segments, owner=lambda name: id(entry(name)[0]))

    pipes, schedulers = [], []
    switching = {id(p) for p, a in networks.values() if a} | {id(p) for p in managed
                                                               if getattr(p.unet, "peft_config", None)}
    for p in ps:
        owners = {id(entry(n)[0]) for n in p.networks}
        if len(owners) > 1:
            raise UsageError("segments that share one scheduler pass must be networks of one pipeline")
        preds = {(prediction_types or {}).get(n or main) for n in p.networks}
        if len(preds) > 1:
            raise UsageError(f"networks of different prediction types {sorted(map(str, preds))} cannot share one "
                             f"scheduler pass; give their segments their own schedulers")
        pipe = entry(p.networks[0])[0]
        pred = preds.pop()
        config = {**base_configs[id(pipe)], **({"prediction_type": pred} if pred else {})}
        pipes.append(pipe)
        schedulers.append(make_scheduler(p.scheduler, config, **p.scheduler_kwargs))
    schedule, kws = _prepare(ps, schedulers, partial=True)
    x, done = kwargs.pop("latents", None), 0
    for k, (p, pipe, sched) in enumerate(zip(ps, pipes, schedulers)):
        last = k == len(ps) - 1
        latents = x
        if p.entry != "noise":
            prev = ps[k - 1]
            x = handoff(x, p.entry, schedulers[k - 1], p.start - prev.start, sched, 0, p.chain[0], schedule,
                        generator)
            latents = x / sched.init_noise_sigma  # stock pipelines multiply given latents by init_noise_sigma
        n = None if p.stop is None else p.stop - p.start
        names = [entry(m)[1] for m in p.networks]
        if id(pipe) in switching:
            select(pipe, names[0], stack)
        pipe.scheduler = sched

        def on_step(pipe_, i, t, tensors, p=p, n=n, names=names, off=done, last=last):
            out = callback_on_step_end(pipe_, i + off, t, tensors) if callback_on_step_end is not None else None
            if n is not None and i + 1 >= n and not last:
                pipe_._interrupt = True
            elif id(pipe_) in switching and i + 1 < len(names) and names[i + 1] != names[i]:
                select(pipe_, names[i + 1], stack)
            return out if out is not None else tensors

        extra = {"eta": recipe.eta} if recipe.eta is not None else {}
        result = pipe(*args, **kwargs, **kws[k], **extra, guidance_scale=1.0 if p.guidance_scale is None
                      else p.guidance_scale, generator=generator, latents=latents,
                      output_type=output_type if last else "latent", return_dict=return_dict if last else True,
                      callback_on_step_end=on_step)
        if last:
            return result
        x = result.images
        done += n if n is not None else len(sched.timesteps)
