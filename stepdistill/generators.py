"""Few-step generators built from a student Denoiser, sampled exactly as Diffusers' ``LCMScheduler`` with
fixed timesteps does: at each timestep the consistency-model boundary output
``c_out(t) * x0_pred + c_skip(t) * x_t`` is taken, then re-noised with *fresh* noise to the next timestep.
A student trained through this class therefore samples identically in a stock pipeline.

Backward simulation (DMD2, Sec. 4.5): training inputs of step k are produced by running the first k
steps without gradient from pure noise, so the student trains on its own intermediate samples.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .denoisers import Cond, Denoiser


class FewStepGenerator:
    def __init__(self, student: Denoiser, timesteps: Sequence[int]):
        ts = [int(t) for t in timesteps]
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[0] >= student.schedule.num_train_timesteps:
            raise ValueError(f"student timesteps must be strictly decreasing within the schedule, got {ts}")
        self.student, self.timesteps = student, ts
        self.schedule = student.schedule

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def denoise(self, x_t: torch.Tensor, t: int, cond: Cond | None) -> torch.Tensor:
        """One generator evaluation: LCM boundary-scaled x0 at timestep t (what LCMScheduler.step returns)."""
        c_skip, c_out = self.schedule.lcm_boundary_scalings(t)
        x0 = self.student.x0(x_t, t, cond)
        return float(c_out) * x0 + float(c_skip) * x_t

    @torch.no_grad()
    def simulate(self, noise: torch.Tensor, cond: Cond | None, k: int,
                 fresh_noise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Input of step k: run steps 0..k-1 without gradient from ``noise`` (re-noising with fresh noise)."""
        x = noise
        for i in range(k):
            x0 = self.denoise(x, self.timesteps[i], cond)
            x = self.schedule.add_noise(x0, fresh_noise(x0), self.timesteps[i + 1])
        return x

    def __call__(self, noise: torch.Tensor, cond: Cond | None, k: int,
                 fresh_noise: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """x0 of step k (with gradient), from backward-simulated inputs; returns (x0, timestep of step k)."""
        x_t = self.simulate(noise, cond, k, fresh_noise)
        t = self.timesteps[k]
        return self.denoise(x_t, t, cond), t

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Cond | None,
               fresh_noise: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """All steps, no gradient: the final sample."""
        x_t = self.simulate(noise, cond, self.num_steps - 1, fresh_noise)
        return self.denoise(x_t, self.timesteps[-1], cond)


@torch.no_grad()
def tcd_sample(student: Denoiser, noise: torch.Tensor, cond: Cond | None, timesteps: Sequence[int], eta: float,
               fresh_noise: Callable[[torch.Tensor], torch.Tensor], guidance: float | None = None) -> torch.Tensor:
    """Trajectory-consistency sampling (TCD, Zheng et al. 2024, Alg. 4) in pure schedule math, step for step as
    a stock pipeline with ``TCDScheduler`` (``timesteps`` from ``schedules.tcd_timesteps``): at each timestep
    the student's x0 / eps, a DDIM jump to s = floor((1 - eta) t_prev), re-noising to t_prev with fresh noise
    (not after the last step, whose t_prev is 0). eta = 0 with segment edges as ``timesteps`` is the student's
    own segment-to-segment DDIM chain. ``fresh_noise(like)`` draws in the order the scheduler does."""
    schedule, ts = student.schedule, [int(t) for t in timesteps]
    x = noise
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        t_prev = 0 if last else ts[i + 1]
        x0, eps = student.x0_eps(x, t, cond, guidance)
        x = schedule.tcd_step(x0, eps, t_prev, eta, None if (last or eta == 0) else fresh_noise(x))
    return x


class ExpertChain:
    """A few-step generator made of experts that take turns (Phased DMD): expert k runs ``timesteps[k]``, the
    first of which is its phase's upper boundary; every step is a deterministic DDIM jump of the running
    expert's (x0, eps) to the next timestep, and the last step lands on timestep 0 -- step for step what a stock
    ``TCDScheduler`` with eta 0 and the chained timesteps does while a callback switches adapters
    (:func:`tcd_sample`'s schedule math)."""

    def __init__(self, experts: Sequence[Denoiser], timesteps: Sequence[Sequence[int]]):
        if len(experts) != len(timesteps) or not experts:
            raise ValueError("one timestep list per expert")
        chain = [int(t) for ts in timesteps for t in ts]
        if any(a <= b for a, b in zip(chain, chain[1:])) or chain[-1] < 0:
            raise ValueError(f"the experts' timesteps must chain strictly decreasing to >= 0, got {timesteps}")
        self.experts = list(experts)
        self.timesteps = [[int(t) for t in ts] for ts in timesteps]
        self.chain = chain
        self.owner = [k for k, ts in enumerate(self.timesteps) for _ in ts]  # expert of each step
        self.schedule = experts[0].schedule

    @property
    def num_phases(self) -> int:
        return len(self.experts)

    def phase_steps(self, k: int) -> range:
        """Indices (into ``chain``) of expert k's steps."""
        first = sum(len(ts) for ts in self.timesteps[:k])
        return range(first, first + len(self.timesteps[k]))

    def phase_end(self, k: int) -> int:
        """Lower boundary of phase k: the next phase's first timestep, or CLEAN (-1) for the last phase."""
        return self.timesteps[k + 1][0] if k + 1 < self.num_phases else -1

    def step(self, x: torch.Tensor, i: int, cond: Cond | None, to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i: (x0, x at ``to``) with the owning expert's DDIM jump; ``to`` defaults to the next timestep
        (timestep 0 after the last step)."""
        x0, eps = self.experts[self.owner[i]].x0_eps(x, self.chain[i], cond)
        if to is None:
            to = self.chain[i + 1] if i + 1 < len(self.chain) else 0
        return x0, (x0 if to < 0 else self.schedule.ddim_jump(x0, eps, to))

    @torch.no_grad()
    def simulate(self, noise: torch.Tensor, cond: Cond | None, upto: int) -> torch.Tensor:
        """Input of step ``upto``: steps 0..upto-1 without gradient from ``noise``."""
        x = noise
        for i in range(upto):
            _, x = self.step(x, i, cond)
        return x

    def phase_output(self, noise: torch.Tensor, cond: Cond | None, k: int, j: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Phase k's output with gradient through one step (backward simulation, DMD2 Sec. 4.5): earlier steps
        run without gradient, then expert k's ``j``-th step jumps straight to the phase's lower boundary s.
        Returns (x_s, the step's x0-prediction, s); s = CLEAN for the last phase, where x_s is the x0-prediction."""
        i = self.phase_steps(k)[j]
        x = self.simulate(noise, cond, i)
        x0, x_s = self.step(x, i, cond, to=self.phase_end(k))
        return x_s, x0, self.phase_end(k)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        return self.simulate(noise, cond, len(self.chain))
