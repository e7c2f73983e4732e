"""VP noise-schedule math. This module alone owns alpha/sigma/SNR, the eps / v / x0 conversions,
DDIM jumps, re-noising and the timestep lists every method and sampler uses.

Notation (DDPM/DDIM, Ho et al. 2020; Song et al. 2021): ``x_t = a_t x0 + s_t eps`` with
``a_t = sqrt(alphas_cumprod[t])``, ``s_t = sqrt(1 - alphas_cumprod[t])``, ``SNR = a_t^2 / s_t^2``,
``v = a_t eps - s_t x0`` (Salimans & Ho 2022). Timesteps are the teacher scheduler's discrete
indices ``0 .. T-1``; ``-1`` denotes the clean end (``final_alpha_cumprod``, as in Diffusers' DDIM
and LCM schedulers), so a jump "to -1" returns x0.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
CLEAN = -1  # timestep label of the clean end of the trajectory


class NoiseSchedule:
    """Discrete VP schedule read from a Diffusers scheduler's ``alphas_cumprod``."""

    def __init__(self, alphas_cumprod: torch.Tensor, final_alpha_cumprod: float = 1.0):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.ndim != 1 or len(ac) < 2 or not bool(torch.all(ac[1:] <= ac[:-1])):
            raise ValueError("alphas_cumprod must be a decreasing 1-D sequence")
        # index 0 holds the clean end (t = -1), index t+1 holds timestep t
        self._ac = torch.cat([torch.tensor([float(final_alpha_cumprod)], dtype=torch.float64), ac])
        self.num_train_timesteps = len(ac)

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from any Diffusers scheduler config (beta schedule computed by Diffusers itself)."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(dict(config))
        return cls(sched.alphas_cumprod, float(sched.final_alpha_cumprod))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._ac[1:]

    @property
    def final_alpha_cumprod(self) -> float:
        return float(self._ac[0])

    # ---- per-timestep coefficients -------------------------------------------------------
    def alpha_bar(self, t, like: torch.Tensor | None = None) -> torch.Tensor:
        """alphas_cumprod[t] (t = -1 -> final_alpha_cumprod), broadcastable to ``like``."""
        t = torch.as_tensor(t)
        idx = (t.round().long() + 1).clamp(0, self.num_train_timesteps).cpu()
        out = self._ac[idx]
        if like is not None:
            out = out.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
            out = out.reshape(out.shape + (1,) * (like.ndim - out.ndim))
        return out

    def alpha(self, t, like=None) -> torch.Tensor:
        return self.alpha_bar(t, like).sqrt()

    def sigma(self, t, like=None) -> torch.Tensor:
        return (1 - self.alpha_bar(t, like)).sqrt()

    def ve_sigma(self, t, like=None) -> torch.Tensor:
        """s_t / a_t: the noise level of the sigma-scaled latents x_t / a_t = x0 + (s_t / a_t) eps that Euler-type
        (k-diffusion, Karras et al. 2022) schedulers step; their latents are the VP latents times 1 / a_t."""
        return self.sigma(t, like) / self.alpha(t, like)

    def snr(self, t) -> torch.Tensor:
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def log_snr(self, t) -> torch.Tensor:
        return self.snr(t).log()

    def timestep_range(self, lo: float, hi: float) -> tuple[int, int]:
        """The integer timesteps (first, last; both included) of the fraction range [lo, hi] of the T training
        timesteps: (int(lo T), int(hi T)), the last clamped to T - 1, the largest timestep a network was trained on
        (hi = 1 would give T)."""
        T = self.num_train_timesteps
        return min(int(lo * T), T - 1), min(int(hi * T), T - 1)

    def t_from_log_snr(self, log_snr, round_to_int: bool = True) -> torch.Tensor:
        """Inverse of ``log_snr`` on 0..T-1 by linear interpolation (log-SNR decreases with t)."""
        table = self.log_snr(torch.arange(self.num_train_timesteps)).numpy()
        t = np.interp(-np.asarray(log_snr, dtype=np.float64), -table, np.arange(self.num_train_timesteps))
        t = torch.as_tensor(t)
        return t.round().long() if round_to_int else t

    # ---- forward process and parameterisations -------------------------------------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """q(x_t | x0): a_t x0 + s_t eps."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * eps

    def to_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str) -> torch.Tensor:
        a, s = self.alpha(t, x_t), self.sigma(t, x_t)
        if prediction_type == "epsilon":
            return (x_t - s * pred) / a
        if prediction_type == "v_prediction":
            return a * x_t - s * pred
        if prediction_type == "sample":
            return pred
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str) -> torch.Tensor:
        a, s = self.alpha(t, x_t), self.sigma(t, x_t)
        if prediction_type == "epsilon":
            return pred
        if prediction_type == "v_prediction":
            return a * pred + s * x_t
        if prediction_type == "sample":
            return (x_t - a * pred) / s
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t, src: str, dst: str) -> torch.Tensor:
        """Re-express a model output of type ``src`` as type ``dst`` (epsilon / v_prediction / sample)."""
        if src == dst:
            return pred
        x0 = self.to_x0(pred, x_t, t, src)
        eps = self.to_eps(pred, x_t, t, src)
        if dst == "sample":
            return x0
        if dst == "epsilon":
            return eps
        if dst == "v_prediction":
            return self.alpha(t, x_t) * eps - self.sigma(t, x_t) * x0
        raise ValueError(f"unknown prediction_type {dst!r}; expected one of {PREDICTION_TYPES}")

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t, prediction_type: str) -> torch.Tensor:
        """Regression target of a denoiser trained with ``prediction_type`` on x_t = add_noise(x0, eps, t)."""
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        if prediction_type == "v_prediction":
            return self.alpha(t, x0) * eps - self.sigma(t, x0) * x0
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    # ---- moving along the trajectory ------------------------------------------------------
    def ddim_jump(self, x0: torch.Tensor, eps: torch.Tensor, s) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) jump to timestep ``s`` given x0 and eps estimates: a_s x0 + s_s eps."""
        return self.alpha(s, x0) * x0 + self.sigma(s, x0) * eps

    def renoise(self, x_s: torch.Tensor, s, t, eps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_s) for t > s: (a_t/a_s) x_s + s_{t|s} eps (Phased DMD, Eq. for noising from s)."""
        a_t, a_s = self.alpha(t, x_s), self.alpha(s, x_s)
        return (a_t / a_s) * x_s + self.sigma_t_given_s(s, t, x_s) * eps

    def sigma_t_given_s(self, s, t, like=None) -> torch.Tensor:
        """s_{t|s} = sqrt(s_t^2 - (a_t/a_s)^2 s_s^2), the std of q(x_t | x_s)."""
        a_t, a_s = self.alpha(t, like), self.alpha(s, like)
        s_t, s_s = self.sigma(t, like), self.sigma(s, like)
        return (s_t**2 - (a_t / a_s) ** 2 * s_s**2).clamp_min(0).sqrt()

    # ---- inside an SNR subinterval (Phased DMD, Fan et al. 2025) ---------------------------------------------
    # Samples x_s of a subinterval's lower end s have no clean counterpart. Noising them to t > s by q(x_t | x_s)
    # and regressing onto the conditional score -eps / s_{t|s} (denoising score matching from s) has the marginal
    # score of x_t as its solution; the functions below give that target in each parameterisation. s < 0 (the
    # clean end) means x_s is a clean sample: plain noising and plain denoising targets, exactly.
    def noise_from(self, x_s: torch.Tensor, s: int, t, eps: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_s) for t > s; ``add_noise`` when s is the clean end."""
        return self.add_noise(x_s, eps, t) if int(s) < 0 else self.renoise(x_s, s, t, eps)

    def subinterval_target(self, x_s: torch.Tensor, eps: torch.Tensor, s: int, t, prediction_type: str) -> torch.Tensor:
        """Regression target of a denoiser at x_t = ``noise_from(x_s, s, t, eps)`` whose minimiser is the marginal
        score at t (Phased DMD's score matching within a subinterval), in the denoiser's ``prediction_type``:
        eps_target = (s_t / s_{t|s}) eps, x0_target = x_s / a_s - a_t s_s^2 / (a_s^2 s_{t|s}) eps,
        v_target = a_t eps_target - s_t x0_target. ``target(x_s, eps, t, .)`` when s is the clean end."""
        if int(s) < 0:
            return self.target(x_s, eps, t, prediction_type)
        a_t, s_t = self.alpha(t, x_s), self.sigma(t, x_s)
        a_s, s_s = self.alpha(s, x_s), self.sigma(s, x_s)
        s_ts = self.sigma_t_given_s(s, t, x_s)
        eps_target = (s_t / s_ts) * eps
        x0_target = x_s / a_s - (a_t * s_s**2 / (a_s**2 * s_ts)) * eps
        if prediction_type == "epsilon":
            return eps_target
        if prediction_type == "sample":
            return x0_target
        if prediction_type == "v_prediction":
            return a_t * eps_target - s_t * x0_target
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")

    def subinterval_weight(self, s: int, t, like: torch.Tensor | None = None, kind: str = "variance") -> torch.Tensor:
        """Per-sample weight of the subinterval loss. The target's noise grows as 1 / s_{t|s} when t nears s;
        ``variance``: (s_{t|s} / s_t)^2, which keeps it bounded and is 1 at the clean end (plain denoising);
        ``clamp``: clamp(1 / s_{t|s}^2, 0, 10) (the clamp suggested for Phased DMD)."""
        if kind not in ("variance", "clamp"):
            raise ValueError(f"subinterval weighting must be 'variance' or 'clamp', got {kind!r}")
        s_t = self.sigma(t, like)
        s_ts = s_t if int(s) < 0 else self.sigma_t_given_s(s, t, like)
        if kind == "variance":
            return (s_ts / s_t) ** 2
        return (1.0 / s_ts.clamp_min(1e-12) ** 2).clamp(0.0, 10.0)

    def tcd_step(self, x0: torch.Tensor, eps: torch.Tensor, t_prev: int, eta: float,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """TCD's gamma step (Zheng et al. 2024, Alg. 4; Diffusers' ``TCDScheduler.step``): DDIM jump to
        s = floor((1 - eta) t_prev), then re-noise s -> t_prev with ``noise``; ``noise=None`` or eta = 0 stays
        at s (TCD's last step, which lands at timestep 0)."""
        s = tcd_intermediate_timestep(t_prev, eta)
        x_s = self.ddim_jump(x0, eps, s)
        if noise is None or eta == 0:
            return x_s
        return self.renoise(x_s, s, t_prev, noise)

    @staticmethod
    def lcm_boundary_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        """Consistency-model boundary scalings (c_skip, c_out) at timestep t, as Diffusers' LCMScheduler."""
        st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
        c_skip = sigma_data**2 / (st**2 + sigma_data**2)
        c_out = st / (st**2 + sigma_data**2) ** 0.5
        return c_skip, c_out


# ---- timestep lists (pure functions; tested for monotonicity, coverage and endpoints) -----------
def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Descending 'trailing' timesteps, as Diffusers (T-1, ..., T/n - 1); e.g. 4 -> [999, 749, 499, 249]."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return [int(v) for v in np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1]


def ddim_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Ascending N-step DDIM solver grid used by consistency distillation, e.g. 50 -> [19, 39, ..., 999]."""
    return trailing_timesteps(num_steps, num_train_timesteps)[::-1]


def segment_edges(num_segments: int, num_train_timesteps: int = 1000) -> list[int]:
    """Edges of k equal trajectory segments, ascending: [-1 (clean), T/k - 1, ..., T - 1].

    Segment i spans (edges[i], edges[i+1]]; its lower edge is where a TSCD student jumps to, and
    ``edges[1:]`` reversed is exactly the k-step trailing sampling schedule (Hyper-SD / DDIM trailing).
    """
    return [CLEAN] + trailing_timesteps(num_segments, num_train_timesteps)[::-1]


def lower_edge(t: torch.Tensor, edges: Sequence[int]) -> torch.Tensor:
    """For each timestep in ``t`` (>= 0), the largest segment edge strictly below it."""
    e = torch.as_tensor(list(edges), device=t.device)
    idx = torch.searchsorted(e, t.long(), right=False) - 1  # edges[idx] < t <= edges[idx+1]
    return e[idx.clamp(min=0)]


def snr_subintervals(num_phases: int, schedule: NoiseSchedule, spacing: str = "log_snr",
                     t_max: int | None = None) -> list[int]:
    """Phase boundaries t_0 = T-1 > t_1 > ... > t_K = -1 (clean) splitting the trajectory into K SNR
    subintervals (Phased DMD): equal steps in log-SNR (``log_snr``) or in timestep (``timestep``)."""
    T = schedule.num_train_timesteps
    t_max = T - 1 if t_max is None else t_max
    if num_phases < 1:
        raise ValueError("num_phases must be >= 1")
    if spacing == "timestep":
        inner = [int(round(t_max - i * (t_max + 1) / num_phases)) for i in range(1, num_phases)]
    elif spacing == "log_snr":
        lo, hi = float(schedule.log_snr(t_max)), float(schedule.log_snr(0))
        targets = [lo + i * (hi - lo) / num_phases for i in range(1, num_phases)]
        inner = [int(schedule.t_from_log_snr(v)) for v in targets]
    else:
        raise ValueError(f"spacing must be 'log_snr' or 'timestep', got {spacing!r}")
    bounds = [t_max] + inner + [CLEAN]
    if any(b <= c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"phase boundaries are not strictly decreasing: {bounds}")
    return bounds


# ---- trajectory-segmented consistency distillation and TCD sampling (Hyper-SD; Zheng et al. 2024) -------------
def tscd_timesteps(num_teacher_steps: int, num_segments: int, num_train_timesteps: int = 1000) -> list[int]:
    """Ascending timesteps a TSCD student trains at: the N-step DDIM solver grid plus every segment's upper
    edge (the k-step trailing schedule), so the timesteps a k-step sampler visits are trained exactly."""
    edges = segment_edges(num_segments, num_train_timesteps)
    return sorted(set(ddim_grid(num_teacher_steps, num_train_timesteps)) | set(edges[1:]))


def solver_target_timestep(t: torch.Tensor, skip: int, edges: Sequence[int]) -> torch.Tensor:
    """t' of the teacher's one solver step from t: ``skip`` timesteps down, clamped at t's segment lower edge
    (TSCD never lets the teacher step across a segment boundary)."""
    return torch.maximum(t.long() - int(skip), lower_edge(t, edges))


def tcd_timesteps(num_steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """Descending inference timesteps of Diffusers' ``TCDScheduler.set_timesteps(num_steps)``: ``num_steps``
    points, evenly spaced by index, of the ``original_steps``-point distillation grid (k = T // N, k - 1 .. N k - 1)."""
    if not 1 <= num_steps <= original_steps <= num_train_timesteps:
        raise ValueError(f"need 1 <= num_steps ({num_steps}) <= original_steps ({original_steps}) <= "
                         f"{num_train_timesteps}")
    grid = (np.arange(1, original_steps + 1) * (num_train_timesteps // original_steps) - 1)[::-1]
    idx = np.floor(np.linspace(0, len(grid), num=num_steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[idx]]


def tcd_intermediate_timestep(t_prev: int, eta: float) -> int:
    """TCD's s = floor((1 - eta) t_prev), computed in float32 exactly as ``TCDScheduler.step`` does."""
    if not 0 <= eta <= 1:
        raise ValueError(f"TCD eta (gamma) must be in [0, 1], got {eta}")
    return int(torch.floor((1 - eta) * torch.tensor(int(t_prev))))
