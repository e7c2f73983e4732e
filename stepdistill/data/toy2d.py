"""toy2d: a 2-D Gaussian mixture whose noisy posterior mean is known in closed form, so the teacher is exact.

For p(x0) = sum_k w_k N(mu_k, s_k^2 I) and x_t = a x0 + s eps (VP), the marginal is
p(x_t) = sum_k w_k N(a mu_k, v_k I) with v_k = a^2 s_k^2 + s^2, and
E[x0 | x_t] = sum_k r_k(x_t) [mu_k + (a s_k^2 / v_k)(x_t - a mu_k)], r_k the posterior responsibilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..schedules import NoiseSchedule


@dataclass
class MixtureSpec:
    means: torch.Tensor  # (K, 2)
    stds: torch.Tensor  # (K,)
    weights: torch.Tensor  # (K,)

    @classmethod
    def from_config(cls, cfg) -> "MixtureSpec":
        if cfg.means is not None:
            means = torch.tensor(cfg.means, dtype=torch.float64)
        else:
            ang = torch.arange(cfg.num_modes, dtype=torch.float64) * 2 * math.pi / cfg.num_modes
            means = cfg.radius * torch.stack([ang.cos(), ang.sin()], dim=1)
        k = len(means)
        stds = torch.tensor(cfg.stds, dtype=torch.float64) if cfg.stds is not None else torch.full((k,), cfg.std,
                                                                                                  dtype=torch.float64)
        w = torch.tensor(cfg.weights, dtype=torch.float64) if cfg.weights is not None else torch.ones(k, dtype=torch.float64)
        if len(stds) != k or len(w) != k:
            raise ValueError("means, stds and weights must have the same length")
        return cls(means, stds, w / w.sum())

    @property
    def num_modes(self) -> int:
        return len(self.means)

    def sample(self, n: int, generator: torch.Generator | None = None, modes: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (n, 2) float32, mode ids (n,))."""
        if modes is None:
            modes = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        x = self.means[modes] + self.stds[modes, None] * noise
        return x.float(), modes


def same_mixture(a, b) -> bool:
    """Whether two toy2d data configs describe the same mixture (means, stds, weights and conditioning)."""
    x, y = MixtureSpec.from_config(a), MixtureSpec.from_config(b)
    return (a.conditional == b.conditional and x.means.shape == y.means.shape and torch.allclose(x.means, y.means)
            and torch.allclose(x.stds, y.stds) and torch.allclose(x.weights, y.weights))


class GaussianMixtureX0(nn.Module):
    """Exact E[x0 | x_t] of a Gaussian mixture under a VP schedule: ``net(x_t, t, class_labels=None) -> x0``.

    With ``class_labels`` (mode ids; id K means unconditional) it returns the posterior mean of that mode
    alone, so the same module is an exact class-conditional teacher.
    """

    def __init__(self, spec: MixtureSpec, schedule: NoiseSchedule):
        super().__init__()
        self.spec, self.schedule = spec, schedule
        self.register_buffer("_dummy", torch.zeros(0), persistent=False)  # gives the module a device

    def log_responsibilities(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x_t.double()
        a = self.schedule.alpha(t).to(x.device)[:, None]  # (B, 1)
        s2 = (1 - self.schedule.alpha_bar(t)).to(x.device)[:, None]
        mu, sd, w = (v.to(x.device) for v in (self.spec.means, self.spec.stds, self.spec.weights))
        var = a**2 * sd[None] ** 2 + s2  # (B, K)
        d2 = ((x[:, None, :] - a[:, :, None] * mu[None]) ** 2).sum(-1)  # (B, K)
        logp = w.log()[None] - d2 / (2 * var) - var.log()  # 2-D Gaussian: log det = 2 log sqrt(var) = log var
        return logp - torch.logsumexp(logp, dim=1, keepdim=True)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x_t.double()
        a = self.schedule.alpha(t).to(x.device)[:, None, None]  # (B, 1, 1)
        s2 = (1 - self.schedule.alpha_bar(t)).to(x.device)[:, None, None]
        mu, sd = self.spec.means.to(x.device), self.spec.stds.to(x.device)
        var = a**2 * sd[None, :, None] ** 2 + s2  # (B, K, 1)
        per_mode = mu[None] + (a * sd[None, :, None] ** 2 / var) * (x[:, None, :] - a * mu[None])  # (B, K, 2)
        r = self.log_responsibilities(x_t, t).exp()  # (B, K)
        if class_labels is not None:
            onehot = torch.nn.functional.one_hot(class_labels.clamp(max=self.spec.num_modes - 1),
                                                 self.spec.num_modes).double()
            uncond = (class_labels >= self.spec.num_modes)[:, None]
            r = torch.where(uncond, r, onehot)
        return (r[:, :, None] * per_mode).sum(1).to(x_t.dtype)

    def log_density(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_t(x_t) of the noisy marginal (for score checks)."""
        x = x_t.double()
        a = self.schedule.alpha(t).to(x.device)[:, None]
        s2 = (1 - self.schedule.alpha_bar(t)).to(x.device)[:, None]
        mu, sd, w = (v.to(x.device) for v in (self.spec.means, self.spec.stds, self.spec.weights))
        var = a**2 * sd[None] ** 2 + s2
        d2 = ((x[:, None, :] - a[:, :, None] * mu[None]) ** 2).sum(-1)
        logp = w.log()[None] - d2 / (2 * var) - var.log() - math.log(2 * math.pi)
        return torch.logsumexp(logp, dim=1)


# ---- metrics ---------------------------------------------------------------------------------------
def sliced_w2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equal-size point sets (fixed seeded projections)."""
    theta = _projections(x.shape[1], num_projections, seed)
    n = min(len(x), len(y))
    px = (x[:n].double().cpu() @ theta).sort(dim=0).values
    py = (y[:n].double().cpu() @ theta).sort(dim=0).values
    return float(((px - py) ** 2).mean().sqrt())


def _projections(dim: int, num: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(dim, num, generator=g, dtype=torch.float64)
    return theta / theta.norm(dim=0, keepdim=True)


def mode_stats(x: torch.Tensor, spec: MixtureSpec, radius_std: float = 3.0, min_share: float = 0.25) -> dict:
    """Modes covered (>= min_share of a mode's expected count within radius_std stds of it) and the share
    of samples within radius_std stds of some mode."""
    x = x.double().cpu()
    d = torch.cdist(x, spec.means)  # (N, K)
    near = d <= radius_std * spec.stds[None]
    counts = near.sum(0).double()
    expected = spec.weights * len(x)
    covered = int((counts >= min_share * expected).sum())
    return {"modes_covered": covered, "num_modes": spec.num_modes, "on_mode": float(near.any(1).double().mean())}


def toy_metrics(samples: torch.Tensor, spec: MixtureSpec, seed: int = 0) -> dict:
    """Sliced W2 to an equally large fresh sample of the mixture (seeded), modes covered, on-mode share.
    Sliced W2 between two finite samples has a noise floor (~0.1 at 2,000 points, mostly from mode counts),
    so compare models at the same sample count, against the exact teacher's DDIM-50 value."""
    ref, _ = spec.sample(len(samples), torch.Generator().manual_seed(10_000 + seed))
    return {"sw2": sliced_w2(samples, ref, seed=seed), **mode_stats(samples, spec)}
