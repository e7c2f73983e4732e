"""Schedule math against stock Diffusers schedulers (golden: max abs diff <= 1e-5 in fp32)."""

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, TCDScheduler

from stepdistill.schedules import (CLEAN, NoiseSchedule, ddim_grid, lower_edge, segment_edges, snr_subintervals,
                                   trailing_timesteps)

SD_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.fixture(params=["epsilon", "v_prediction", "sample"])
def pred_type(request):
    return request.param


def _schedule(**kw):
    return NoiseSchedule.from_scheduler_config({**SD_CONFIG, **kw})


def test_alphas_match_diffusers():
    ddim = DDIMScheduler(**SD_CONFIG)
    s = _schedule()
    assert torch.allclose(s.alphas_cumprod.float(), ddim.alphas_cumprod, atol=0, rtol=1e-6)
    assert s.final_alpha_cumprod == pytest.approx(float(ddim.final_alpha_cumprod))
    assert float(s.alpha_bar(CLEAN)) == pytest.approx(float(ddim.alphas_cumprod[0]))  # set_alpha_to_one=False


def test_conversions_roundtrip(pred_type):
    s = _schedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    x_t = s.add_noise(x0, eps, t)
    pred = s.target(x0, eps, t, pred_type)
    assert torch.allclose(s.to_x0(pred, x_t, t, pred_type), x0, atol=1e-4)
    assert torch.allclose(s.to_eps(pred, x_t, t, pred_type), eps, atol=1e-3 if pred_type == "sample" else 1e-4)
    for dst in ("epsilon", "v_prediction", "sample"):
        back = s.convert(s.convert(pred, x_t, t, pred_type, dst), x_t, t, dst, pred_type)
        assert torch.allclose(back, pred, atol=1e-3)


@pytest.mark.parametrize("num_steps", [1, 4, 50])
def test_ddim_jump_matches_ddim_step(pred_type, num_steps):
    sched = DDIMScheduler(**SD_CONFIG, prediction_type=pred_type, timestep_spacing="trailing")
    sched.set_timesteps(num_steps)
    s = _schedule()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for t in sched.timesteps[:3]:
        out = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=0.0).prev_sample
        prev = int(t) - 1000 // num_steps
        x0, eps = s.to_x0(out, x, t, pred_type), s.to_eps(out, x, t, pred_type)
        mine = s.ddim_jump(x0, eps, max(prev, CLEAN))
        assert (mine - ref).abs().max() <= 1e-5
        x = ref


def test_lcm_step_matches(pred_type):
    timesteps = [999, 749, 499, 249]
    sched = LCMScheduler(**SD_CONFIG, prediction_type=pred_type)
    sched.set_timesteps(timesteps=timesteps)
    s = _schedule()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(2, 4, 8, 8, generator=g)
        noise_seed = 100 + i
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(noise_seed))
        c_skip, c_out = s.lcm_boundary_scalings(int(t))
        denoised = float(c_out) * s.to_x0(out, x, t, pred_type) + float(c_skip) * x
        assert (denoised - ref.denoised).abs().max() <= 1e-5
        if i + 1 < len(timesteps):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed))
            mine = s.add_noise(denoised, noise, timesteps[i + 1])
        else:
            mine = denoised
        assert (mine - ref.prev_sample).abs().max() <= 1e-5
        x = ref.prev_sample


def test_renoise_marginal_and_sigma_t_given_s():
    s = _schedule()
    # x_s = a_s x0 + s_s e1; x_t = (a_t/a_s) x_s + s_{t|s} e2  must equal  a_t x0 + s_t e (in distribution):
    # its variance around a_t x0 is s_t^2.
    t, u = 700, 200
    st = s.sigma_t_given_s(u, t)
    total = (s.alpha(t) / s.alpha(u)) ** 2 * s.sigma(u) ** 2 + st**2
    assert float(total) == pytest.approx(float(s.sigma(t) ** 2), rel=1e-9)
    assert float(s.sigma_t_given_s(CLEAN, t)) == pytest.approx(
        float((s.sigma(t) ** 2 - s.alpha_bar(t) / s.alpha_bar(CLEAN) * (1 - s.alpha_bar(CLEAN))).sqrt()), rel=1e-9)


def test_log_snr_inverse():
    s = _schedule()
    t = torch.tensor([0, 17, 333, 600, 999])
    assert torch.equal(s.t_from_log_snr(s.log_snr(t)), t)
    assert bool(torch.all(s.log_snr(torch.arange(1000)).diff() < 0))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 50, 1000])
def test_trailing_matches_diffusers(n):
    sched = DDIMScheduler(**SD_CONFIG, timestep_spacing="trailing")
    sched.set_timesteps(n)
    assert trailing_timesteps(n) == sched.timesteps.tolist()
    assert trailing_timesteps(n)[0] == 999


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_segment_edges(k):
    e = segment_edges(k)
    assert len(e) == k + 1 and e[0] == CLEAN and e[-1] == 999
    assert all(a < b for a, b in zip(e, e[1:]))
    assert e[1:][::-1] == trailing_timesteps(k)  # the k-step sampling schedule
    grid = torch.tensor(ddim_grid(50))
    edges = lower_edge(grid, e)
    assert bool(torch.all(edges < grid))
    # every grid point's lower edge is the largest edge below it
    for t, le in zip(grid.tolist(), edges.tolist()):
        assert le == max(x for x in e if x < t)


def test_ddim_grid():
    g = ddim_grid(50)
    assert g[0] == 19 and g[-1] == 999 and len(g) == 50 and all(b - a == 20 for a, b in zip(g, g[1:]))


@pytest.mark.parametrize("spacing", ["log_snr", "timestep"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_snr_subintervals(spacing, k):
    s = _schedule()
    b = snr_subintervals(k, s, spacing)
    assert b[0] == 999 and b[-1] == CLEAN and len(b) == k + 1
    assert all(x > y for x, y in zip(b, b[1:]))
    if spacing == "log_snr" and k > 1:
        ls = [float(s.log_snr(t)) for t in b[:-1]]
        steps = [y - x for x, y in zip(ls, ls[1:])]
        assert max(steps) - min(steps) < 0.1 * abs(sum(steps))  # near-equal log-SNR widths


def test_tcd_consistent_with_ddim_jump():
    """TCD's step = DDIM jump to s = floor((1-gamma) t_prev) then forward-noise to t_prev."""
    sched = TCDScheduler(**SD_CONFIG)
    sched.set_timesteps(4)
    s = _schedule()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    t, t_prev = sched.timesteps[0], sched.timesteps[1]
    out = torch.randn(1, 4, 8, 8, generator=g)
    ref = sched.step(out, t, x, eta=0.0)
    x0, eps = s.to_x0(out, x, t, "epsilon"), s.to_eps(out, x, t, "epsilon")
    assert (s.ddim_jump(x0, eps, int(t_prev)) - ref.prev_sample).abs().max() <= 1e-5
