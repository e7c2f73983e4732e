"""One Denoiser interface over every network the project distils (cf. k-diffusion's ``external.py``).

A Denoiser wraps a network whose call is ``net(x_t, t, **cond_kwargs)`` -- Diffusers' ``UNet2DModel``
(``class_labels``), ``UNet2DConditionModel`` (``encoder_hidden_states``, SDXL's ``added_cond_kwargs``)
and the toy ``MLP`` all fit -- and exposes ``x0 / eps / v`` for any training prediction type, with
classifier-free guidance. Model-family differences live in how a :class:`Cond` is built (see
``models.py``), never inside losses. A Denoiser may name a peft adapter of its network: teacher,
fake score and student can then share one frozen base (teacher = adapters off). A Denoiser may also fix the
precision of its network's forward passes (``precision``): fp32 runs outside the training loop's autocast, as DMD2
keeps its fake score, whose f - r is amplified by s_t / a_t (~13 at t = 980) in the x0-prediction.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .schedules import NoiseSchedule


# ---- conditioning -------------------------------------------------------------------------------
def _tree_map(fn: Callable, tree):
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    return tree


def _tree_cat(a, b):
    if isinstance(a, dict):
        return {k: _tree_cat(a[k], b[k]) for k in a}
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    return a


@dataclass
class Cond:
    """Network keyword arguments for a batch: ``kwargs`` for the conditional branch and ``null`` for the
    unconditional one (classifier-free guidance). Tensors have the batch as their first dimension."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    null: dict[str, Any] | None = None
    labels: torch.Tensor | None = None  # condition ids (class / prompt digit), for partitioning and metrics

    def index(self, idx) -> "Cond":
        pick = lambda x: x[idx]  # noqa: E731
        return Cond(_tree_map(pick, self.kwargs), None if self.null is None else _tree_map(pick, self.null),
                    None if self.labels is None else self.labels[idx])


# ---- the interface -------------------------------------------------------------------------------
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Denoiser(nn.Module):
    """Clean-sample / noise predictor D(x_t, t, cond) over a network trained with ``prediction_type``."""

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 adapter: str | None = None, adapters_off: bool = False):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.adapter = adapter  # peft adapter to activate for this view (None: leave the net as it is)
        self.adapters_off = adapters_off  # True: run the frozen base with every adapter disabled (teacher)
        # forward passes: None follows the surrounding autocast (train.precision); "fp32" runs without autocast
        # on fp32 inputs; "bf16" / "fp16" autocast to that dtype
        self.precision: str | None = None

    def view(self, adapter: str | None = None, adapters_off: bool = False, prediction_type: str | None = None
             ) -> "Denoiser":
        """Another Denoiser over the same network (shared weights) with a different adapter selection."""
        return Denoiser(self.net, self.schedule, prediction_type or self.prediction_type, adapter, adapters_off)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond_kwargs: dict | None = None) -> torch.Tensor:
        """Raw network output (in ``prediction_type``) for one branch."""
        t = _as_batch_t(t, x_t)
        from .lora import active_adapter  # local import: lora imports peft lazily

        cond_kwargs = cond_kwargs or {}
        if self.precision == "fp32":
            x_t = x_t.float()
            cond_kwargs = _tree_map(lambda v: v.float() if v.is_floating_point() else v, cond_kwargs)
        with active_adapter(self.net, self.adapter, self.adapters_off), _autocast(self.precision, x_t.device):
            out = self.net(x_t, t, **cond_kwargs)
        return out.sample if hasattr(out, "sample") else out

    def predict(self, x_t: torch.Tensor, t, cond: Cond | None = None,
                guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """Network output with classifier-free guidance u + w (c - u) (Ho & Salimans 2022). As in Diffusers'
        pipelines, ``guidance`` None or <= 1 means no guidance (the conditional branch alone); a (B,) tensor
        gives each sample its own scale (consistency distillation samples w per sample)."""
        t = _as_batch_t(t, x_t)
        kwargs = cond.kwargs if cond is not None else {}
        per_sample = isinstance(guidance, torch.Tensor) and guidance.ndim > 0
        if guidance is None or cond is None or (not per_sample and float(guidance) <= 1.0):
            return self(x_t, t, kwargs)
        if cond.null is None:
            raise ValueError("classifier-free guidance needs an unconditional branch (Cond.null)")
        both = self(torch.cat([x_t, x_t]), torch.cat([t, t]), _tree_cat(cond.null, kwargs))
        uncond, condl = both.chunk(2)
        if per_sample:
            guidance = guidance.to(uncond.device, uncond.dtype).reshape((-1,) + (1,) * (uncond.ndim - 1))
        return uncond + guidance * (condl - uncond)

    def x0(self, x_t, t, cond=None, guidance=None) -> torch.Tensor:
        t = _as_batch_t(t, x_t)
        return self.schedule.to_x0(self.predict(x_t, t, cond, guidance), x_t, t, self.prediction_type)

    def eps(self, x_t, t, cond=None, guidance=None) -> torch.Tensor:
        t = _as_batch_t(t, x_t)
        return self.schedule.to_eps(self.predict(x_t, t, cond, guidance), x_t, t, self.prediction_type)

    def x0_eps(self, x_t, t, cond=None, guidance=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both estimates from one network evaluation."""
        t = _as_batch_t(t, x_t)
        out = self.predict(x_t, t, cond, guidance)
        return (self.schedule.to_x0(out, x_t, t, self.prediction_type),
                self.schedule.to_eps(out, x_t, t, self.prediction_type))


def _autocast(precision: str | None, device: torch.device):
    """The autocast context of a forward pass at ``precision`` (None: whatever surrounds it)."""
    if precision is None:
        return contextlib.nullcontext()
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(PRECISIONS)}")
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def _as_batch_t(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t


# ---- the toy network -----------------------------------------------------------------------------
class MLP(nn.Module):
    """Small residual MLP denoiser for low-dimensional data; ``net(x, t, class_labels=None)``.

    Timesteps enter through a sinusoidal embedding; optional class conditioning (``num_classes``,
    with one extra id for 'unconditional') is added to it. Linear layers are named so that peft
    LoRA can target them (``target_modules=["fc_in", "fc1", "fc2", "fc_out"]``).
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, num_classes: int | None = None,
                 temb_dim: int = 64, num_train_timesteps: int = 1000):
        super().__init__()
        self.config = dict(dim=dim, hidden=hidden, depth=depth, num_classes=num_classes, temb_dim=temb_dim,
                           num_train_timesteps=num_train_timesteps)
        self.temb_dim, self.T = temb_dim, num_train_timesteps
        self.t_proj = nn.Sequential(nn.Linear(temb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.fc_in = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None):
        half = self.temb_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        args = (t.float() * (1000.0 / self.T))[:, None] * freqs[None]
        emb = self.t_proj(torch.cat([args.sin(), args.cos()], dim=-1).to(x.dtype))
        if self.class_emb is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.class_emb.num_embeddings - 1, device=x.device)
            emb = emb + self.class_emb(class_labels)
        h = self.fc_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.fc_out(torch.nn.functional.silu(self.norm_out(h)))


class _MLPBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden * 2)
        self.fc2 = nn.Linear(hidden * 2, hidden)
        self.emb = nn.Linear(hidden, hidden * 2)

    def forward(self, h, emb):
        y = self.fc1(self.norm(h)) + self.emb(torch.nn.functional.silu(emb))
        return h + self.fc2(torch.nn.functional.silu(y))


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """Temporarily set requires_grad=False on the modules' parameters (e.g. a discriminator in a G step)."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
