"""toy2d's teacher is exact: its x0-prediction is E[x0 | x_t] of the mixture, its score is the gradient of the noisy
log-density, and a DDIM-50 run of it covers every mode."""

import pytest
import torch

from stepdistill.config import Toy2DData
from stepdistill.data.toy2d import GaussianMixtureX0, MixtureSpec, mode_stats, sliced_w2, toy_metrics
from stepdistill.models import DEFAULT_SCHEDULER
from stepdistill.schedules import NoiseSchedule


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_scheduler_config(DEFAULT_SCHEDULER)


@pytest.fixture(scope="module")
def spec():  # unequal weights and stds, so a formula that ignores either would show
    return MixtureSpec.from_config(Toy2DData(means=[(2.0, 0.0), (0.0, 2.0), (-2.0, -1.0)], stds=[0.1, 0.3, 0.2],
                                             weights=[0.5, 0.3, 0.2]))


def monte_carlo_x0(spec, schedule, x_t, t, n=2_000_000, seed=0):
    """E[x0 | x_t] by self-normalised importance sampling: x0 ~ prior, weights N(x_t; a x0, s^2 I)."""
    g = torch.Generator().manual_seed(seed)
    modes = torch.multinomial(spec.weights, n, replacement=True, generator=g)
    x0 = spec.means[modes] + spec.stds[modes, None] * torch.randn(n, 2, generator=g, dtype=torch.float64)
    a = schedule.alpha(torch.tensor([t])).double().item()
    s2 = 1 - schedule.alpha_bar(torch.tensor([t])).double().item()
    logw = -((x_t.double()[None] - a * x0) ** 2).sum(1) / (2 * s2)
    w = (logw - logw.max()).exp()
    return (w[:, None] * x0).sum(0) / w.sum()


@pytest.mark.parametrize("t", [200, 500, 900])
def test_x0_prediction_matches_monte_carlo(spec, schedule, t):
    teacher = GaussianMixtureX0(spec, schedule)
    a = schedule.alpha(torch.tensor([t])).item()
    points = torch.tensor([[1.2 * a, 0.4], [0.1, 1.5 * a], [-a, -0.3 * a]], dtype=torch.float64)
    exact = teacher(points, torch.full((3,), t)).double()
    mc = torch.stack([monte_carlo_x0(spec, schedule, p, t, seed=i) for i, p in enumerate(points)])
    assert torch.allclose(exact, mc, atol=5e-3), (exact, mc)


def test_score_is_the_gradient_of_the_log_density(spec, schedule):
    """Tweedie: grad log p_t(x_t) = (a E[x0 | x_t] - x_t) / s^2, against autograd of the closed-form density."""
    teacher = GaussianMixtureX0(spec, schedule)
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(64, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = torch.randint(1, 1000, (64,), generator=g)
    (grad,) = torch.autograd.grad(teacher.log_density(x, t).sum(), x)
    a = schedule.alpha(t).double()[:, None]
    s2 = (1 - schedule.alpha_bar(t)).double()[:, None]
    tweedie = (a * teacher(x.detach(), t).double() - x.detach()) / s2
    assert torch.allclose(grad, tweedie, rtol=1e-9, atol=1e-9)


def test_class_conditional_teacher_is_each_modes_own_posterior(spec, schedule):
    teacher = GaussianMixtureX0(spec, schedule)
    one = MixtureSpec(spec.means[1:2], spec.stds[1:2], torch.ones(1, dtype=torch.float64))
    x, t = torch.tensor([[0.3, -0.2]], dtype=torch.float64), torch.tensor([400])
    conditional = teacher(x, t, class_labels=torch.tensor([1]))
    assert torch.allclose(conditional, GaussianMixtureX0(one, schedule)(x, t), atol=1e-12)
    unconditional = teacher(x, t, class_labels=torch.tensor([spec.num_modes]))  # id K: no condition
    assert torch.allclose(unconditional, teacher(x, t), atol=1e-12)


def test_ddim50_of_the_exact_teacher_covers_every_mode():
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_bundle
    from stepdistill.pipelines import make_scheduler, sample

    b = load_bundle(ModelConfig(pretrained="toy2d"), Toy2DData())
    ring = b.extras["spec"]
    scheduler = make_scheduler("DDIMScheduler", b.scheduler_config, prediction_type="sample")
    x = sample(b.teacher, scheduler, (2000, 2), num_inference_steps=50, generator=torch.Generator().manual_seed(0))
    m = toy_metrics(x, ring)
    assert m["modes_covered"] == 8 and m["on_mode"] > 0.97 and m["sw2"] < 0.25, m
    x1 = sample(b.teacher, scheduler, (2000, 2), num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    assert toy_metrics(x1, ring)["modes_covered"] == 0  # one step gives the posterior mean at T: the metric can fail


def test_metrics_on_constructed_sets():
    ring = MixtureSpec.from_config(Toy2DData())
    x, _ = ring.sample(4000, torch.Generator().manual_seed(0))
    assert sliced_w2(x, x) == 0.0
    assert abs(sliced_w2(x, x + torch.tensor([0.5, 0.0])) - 0.5 * 0.5 ** 0.5) < 0.03  # RMS of 0.5 cos(angle)
    half = x[(x[:, 0] > 0.5)]  # only the modes on the right: 3 of 8
    stats = mode_stats(half, ring)
    assert stats["modes_covered"] == 3 and stats["on_mode"] > 0.98  # 3 std in 2-D hold 98.9%
