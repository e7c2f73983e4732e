"""DMD's loss terms as free functions, for DMD and any method built on it. Like NVlabs/edm's
``training/loss.py``: a term draws its noise, calls the networks and returns a per-sample loss; the loop
reduces, weights and steps. Timesteps and noise come from ``draw`` (anything with ``randint`` and
``randn_like``: the loop's :class:`~stepdistill.training.Context`) unless ``t`` / ``eps`` are passed.

x is a generator sample (B, ...), ``real`` the teacher's Denoiser (the real score), ``fake`` the fake
score's, ``head`` a :class:`~stepdistill.gan.GANHead` on the fake score's bottleneck features. x is clean
(``s = CLEAN``), or a sample at timestep ``s`` >= 0 (Phased DMD's expert outputs at a subinterval's lower end):
it is then noised by q(x_t | x_s) to t > s, and the fake score learns the subinterval target
(``schedules.subinterval_target``).
"""

from __future__ import annotations

import torch

from .. import losses as L
from ..denoisers import Cond, Denoiser, frozen
from ..gan import GANHead, predict_with_features
from ..schedules import CLEAN, NoiseSchedule


def noised(schedule: NoiseSchedule, x: torch.Tensor, t_range: tuple[int, int], draw, t: torch.Tensor | None = None,
           eps: torch.Tensor | None = None, s: int = CLEAN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, eps) with t ~ U{t_range[0], ..., t_range[1]} (both ends included) and x_t = a_t x + s_t eps, or
    x_t ~ q(x_t | x_s) for x at timestep ``s`` >= 0. A range outside the trained timesteps [0, T) is an error."""
    if t is None:
        if not 0 <= t_range[0] <= t_range[1] < schedule.num_train_timesteps:
            raise ValueError(f"timestep range {t_range} leaves [0, {schedule.num_train_timesteps})")
        t = draw.randint(t_range[0], t_range[1] + 1, (x.shape[0],))
    if eps is None:
        eps = draw.randn_like(x)
    return schedule.noise_from(x, s, t, eps), t, eps


def full_range(schedule: NoiseSchedule) -> tuple[int, int]:
    return 0, schedule.num_train_timesteps - 1


def distribution_matching_loss(x: torch.Tensor, cond: Cond | None, real: Denoiser, fake: Denoiser, draw,
                               t_range: tuple[int, int], guidance: float = 1.0, *, t: torch.Tensor | None = None,
                               eps: torch.Tensor | None = None, s: int = CLEAN,
                               x0: torch.Tensor | None = None) -> torch.Tensor:
    """DMD's distribution-matching loss (Yin et al. 2023, Eq. 7-8): at x_t of x, g = (f - r) / mean|x0 - r| from
    the real score's CFG x0-prediction r and the fake score's f; per-sample 0.5 ||x - sg(x - g)||^2, whose
    gradient flows into x only. x0 (the normaliser's clean estimate) is x itself for clean x; for x at timestep
    s >= 0 pass the generator's own x0-prediction. x_t and the x0-conversions are fp32, so g is fp32 wherever the
    networks run fp32 (the fake score's ``precision``): its f - r is amplified by s_t / a_t at high t."""
    with torch.no_grad():
        x_t, t, _ = noised(fake.schedule, x.detach().float(), t_range, draw, t, eps, s)
        real_x0 = real.x0(x_t, t, cond, guidance)
        fake_x0 = fake.x0(x_t, t, cond)
        grad = L.dmd_gradient(x if x0 is None else x0, real_x0, fake_x0)
    return L.distribution_matching(x, grad)


def fake_score_loss(fake: Denoiser, x: torch.Tensor, cond: Cond | None, draw, *, t: torch.Tensor | None = None,
                    eps: torch.Tensor | None = None, features: bool = False, s: int = CLEAN,
                    t_range: tuple[int, int] | None = None, weighting: str = "variance"):
    """The fake score's denoising loss on (detached) generator samples at t ~ U[0, T) (DMD Sec. 3.2), in its
    prediction type; for x at timestep s >= 0, score matching within the subinterval (t in ``t_range`` above s,
    the exact conditional target weighted by ``schedules.subinterval_weight(kind=weighting)``).
    ``features=True`` also returns the bottleneck features of the same evaluation, which DMD2's discriminator
    reads (:func:`gan_discriminator_loss`)."""
    sch = fake.schedule
    x_t, t, eps = noised(sch, x, t_range or full_range(sch), draw, t, eps, s)
    if s < 0:
        target, weight = sch.target(x, eps, t, fake.prediction_type), None
    else:
        target = sch.subinterval_target(x, eps, s, t, fake.prediction_type)
        weight = sch.subinterval_weight(s, t, x, weighting)
    pred, feats = predict_with_features(fake, x_t, t, cond) if features else (fake.predict(x_t, t, cond), None)
    loss = L.mse(pred.float(), target.float()) if weight is None else \
        L.subinterval_score_matching(pred, target, weight)
    return (loss, feats) if features else loss


def gan_generator_loss(fake: Denoiser, head: GANHead, x: torch.Tensor, cond: Cond | None, draw, *,
                       t: torch.Tensor | None = None, eps: torch.Tensor | None = None, s: int = CLEAN,
                       t_range: tuple[int, int] | None = None) -> torch.Tensor:
    """DMD2's generator term (Yin et al. 2024, Sec. 4.3): x noised at t ~ U[0, T) (or within ``t_range`` from
    timestep s), read through the frozen fake score's bottleneck and the frozen head; non-saturating loss
    softplus(-D)."""
    x_t, t, _ = noised(fake.schedule, x, t_range or full_range(fake.schedule), draw, t, eps, s)
    with frozen(fake.net, head):
        _, feats = predict_with_features(fake, x_t, t, cond)
        return L.gan_generator(head(feats))


def gan_discriminator_loss(fake: Denoiser, head: GANHead, fake_features: torch.Tensor, real: torch.Tensor,
                           real_cond: Cond | None, draw, *, t: torch.Tensor | None = None,
                           eps: torch.Tensor | None = None, t_range: tuple[int, int] | None = None) -> torch.Tensor:
    """DMD2's discriminator term (Sec. 4.3): real data noised at t ~ U[0, T) (or ``t_range``, the generated
    samples' range) against generated samples, both through the fake score's bottleneck (``fake_features``:
    from :func:`fake_score_loss` with ``features=True``), so the head and the fake score's features both learn."""
    real_t, t, _ = noised(fake.schedule, real, t_range or full_range(fake.schedule), draw, t, eps)
    _, real_features = predict_with_features(fake, real_t, t, real_cond)
    return L.gan_discriminator(head(real_features), head(fake_features))
