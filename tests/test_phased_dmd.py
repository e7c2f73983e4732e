"""Phased DMD: the subinterval score-matching target against the exact score of a Gaussian, gradients reaching only
the current expert, backward simulation through the earlier experts, phases that leave earlier experts untouched,
and the exported experts in a stock StableDiffusionPipeline."""

import json
from pathlib import Path

import pytest
import torch

from stepdistill.config import validate
from stepdistill.errors import UsageError
from stepdistill.registry import method_class
from stepdistill.schedules import CLEAN, NoiseSchedule
from stepdistill.training import Trainer

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
TEACHER = {"pretrained": "toy2d", "arch": {"hidden": 16, "depth": 1}, "prediction_type": "epsilon",
           "scheduler": SCHED}
ROOT = Path(__file__).resolve().parents[1]


def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(SCHED)


def toy(method=None, **train):
    m = {"name": "phased_dmd", "boundaries": [999, 599, 299], "student_every": 1, **(method or {})}
    t = {"steps": 6, "batch_size": 8, "log_every": 1, "log_with": "none", "checkpoint_every": 1, "num_threads": 1,
         "optim": {"lr": 1e-2}, "ema": {"decay": None}, **train}
    return validate({"method": m, "model": TEACHER, "data": {"name": "toy2d", "conditional": True}, "train": t})


def fit(cfg, run_dir, **kw) -> Trainer:
    t = Trainer(cfg, method_class("phased_dmd"), run_dir, show_progress=False, **kw)
    t.fit()
    return t


# ---- the subinterval target ------------------------------------------------------------------------------------
@pytest.mark.parametrize("s,t", [(200, 400), (300, 600), (500, 540), (600, 800)])
def test_subinterval_target_regresses_to_the_exact_score_of_a_gaussian(s, t):
    """x0 ~ N(mu, v0) in 1-D: p_t = N(a_t mu, a_t^2 v0 + s_t^2) is exact. Samples exist only at s; x_t ~ q(x_t | x_s).
    The least-squares fit of each target on x_t (linear: everything is Gaussian) is the regression solution a
    network converges to; the subinterval target's equals the true eps / x0 / v of p_t, the naive target's (x_s
    taken as clean: eps for the noise added, x_s / a_s for x0) does not."""
    sch, g = schedule(), torch.Generator().manual_seed(0)
    n, mu, v0 = 400_000, 0.7, 0.3**2
    x0 = mu + v0**0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    x_s = sch.add_noise(x0, torch.randn(n, generator=g, dtype=torch.float64), s)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    x_t = sch.noise_from(x_s, s, t, eps)
    a_t, s_t = float(sch.alpha(t)), float(sch.sigma(t))
    var_t = a_t**2 * v0 + s_t**2
    assert float(x_t.var()) == pytest.approx(var_t, rel=0.01)  # the transition gives the marginal at t

    def fit_line(y):  # least squares y ~ c0 + c1 x_t
        A = torch.stack([torch.ones_like(x_t), x_t], 1)
        return torch.linalg.lstsq(A, y[:, None]).solution.flatten()

    score = lambda x: -(x - a_t * mu) / var_t  # noqa: E731
    grid = torch.tensor([a_t * mu - 1.0, a_t * mu + 1.0], dtype=torch.float64)  # compare the fitted lines at two points
    true = {"epsilon": -s_t * score(grid), "sample": (grid + s_t**2 * score(grid)) / a_t}
    true["v_prediction"] = a_t * true["epsilon"] - s_t * true["sample"]
    for kind in ("epsilon", "sample", "v_prediction"):
        c = fit_line(sch.subinterval_target(x_s, eps, s, t, kind))
        got = c[0] + c[1] * grid
        assert torch.allclose(got, true[kind], atol=0.015), (kind, got, true[kind])
    naive = {"epsilon": eps, "sample": x_s / sch.alpha(s)}
    for kind, y in naive.items():
        c = fit_line(y)
        assert (c[0] + c[1] * grid - true[kind]).abs().max() > 0.05, kind  # biased beyond Monte-Carlo error


def test_subinterval_math_reduces_to_plain_denoising_at_the_clean_end():
    sch, g = schedule(), torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    t = torch.tensor([10, 200, 500, 800, 999])
    assert torch.equal(sch.noise_from(x0, CLEAN, t, eps), sch.add_noise(x0, eps, t))
    for kind in ("epsilon", "sample", "v_prediction"):
        assert torch.equal(sch.subinterval_target(x0, eps, CLEAN, t, kind), sch.target(x0, eps, t, kind))
    assert torch.allclose(sch.subinterval_weight(CLEAN, t).float(), torch.ones(5))
    w = sch.subinterval_weight(300, torch.tensor([301, 320, 600, 999]))
    assert bool((w > 0).all() and (w <= 1).all() and (w[1:] > w[:-1]).all())  # grows with the distance from s
    assert float(sch.subinterval_weight(300, torch.tensor([301]), kind="clamp")) == 10.0


# ---- training ---------------------------------------------------------------------------------------------------
def test_phases_split_steps_and_validate_boundaries(tmp_path):
    from stepdistill.trainers.phased_dmd import phase_timesteps, split_steps

    assert phase_timesteps([999, 499], 2) == [[999, 749], [499, 249]]
    assert phase_timesteps([999, 749, 499, 249], 1) == [[999], [749], [499], [249]]
    assert split_steps(10, 4) == [2, 2, 3, 3]
    with pytest.raises(UsageError, match="strictly decreasing"):
        toy({"boundaries": [500, 700]})
    with pytest.raises(UsageError, match="add up to train.steps"):
        fit(toy({"phase_steps": [1, 1, 1]}), tmp_path / "a")
    with pytest.raises(UsageError, match="too narrow"):
        fit(toy({"boundaries": [999, 998], "steps_per_phase": 2}), tmp_path / "b")
    with pytest.raises(UsageError, match="leave the teacher's schedule"):
        fit(toy({"boundaries": None, "boundaries_log_snr": [-9.0, -2.0, 2.0]}), tmp_path / "d")
    t = fit(toy({"boundaries": None, "boundaries_log_snr": [-5.0, -2.0, 2.0]}, steps=3), tmp_path / "c", max_steps=1)
    sch = schedule()
    assert [float(sch.log_snr(b)) for b in t.method.starts] == pytest.approx([-5.0, -2.0, 2.0], abs=0.05)


def test_only_the_current_expert_gets_gradients(tmp_path):
    t = fit(toy(), tmp_path / "run", max_steps=1)
    m = t.method
    ids = {name: {id(p) for _, p in named} for name, named in t.params.items()}
    names = sorted(ids)
    assert names == ["expert_0", "expert_1", "expert_2", "fake_score_0", "fake_score_1", "fake_score_2"]
    assert all(not (ids[a] & ids[b]) for a in names for b in names if a < b)  # disjoint optimiser groups
    for name, opt in t.opts.items():
        assert sum(len(gr["params"]) for gr in opt.param_groups) == len(t.params[name])
    for k in range(3):
        for opt in t.opts.values():
            opt.zero_grad(set_to_none=True)
        losses = m.losses(m.batch(f"expert_{k}"), f"expert_{k}")
        sum(v.mean() for v in losses.values()).backward()
        for name, named in t.params.items():
            grads = [p.grad for _, p in named]
            if name == f"expert_{k}":
                assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
            else:
                assert all(g is None for g in grads), (k, name)


def test_backward_simulation_runs_earlier_experts_on_their_own_timesteps(tmp_path):
    t = fit(toy({"boundaries": [999, 599, 299], "steps_per_phase": 2}), tmp_path / "run", max_steps=1)
    chain = t.method.chain
    assert chain.timesteps == [[999, 799], [599, 449], [299, 149]]
    calls = []

    class Spy:
        def __init__(self, k, d):
            self.k, self.d, self.schedule = k, d, d.schedule

        def x0_eps(self, x, ts, cond):
            calls.append((self.k, int(ts), torch.is_grad_enabled()))
            return self.d.x0_eps(x, ts, cond)

    chain.experts = [Spy(k, d) for k, d in enumerate(chain.experts)]
    cond = t.method.batch("expert_2")["cond"]
    x_s, x0, s = chain.phase_output(torch.randn(8, 2), cond, 2, j=1)
    assert calls == [(0, 999, False), (0, 799, False), (1, 599, False), (1, 449, False), (2, 299, False),
                     (2, 149, True)]
    assert s == CLEAN and x_s is x0 and x_s.requires_grad
    calls.clear()
    x_s, x0, s = chain.phase_output(torch.randn(8, 2), cond, 1, j=0)
    assert calls == [(0, 999, False), (0, 799, False), (1, 599, True)] and s == 299  # jumps to the phase's end
    assert not torch.equal(x_s, x0)


def test_phases_leave_earlier_experts_bit_identical_and_record_phases_json(tmp_path):
    cfg = toy({"init": "previous", "phase_steps": [2, 2, 2]}, keep_checkpoints=10, ema={"decay": 0.9})
    t = fit(cfg, tmp_path / "run")
    from safetensors.torch import load_file

    def weights(step, net):
        w = load_file(tmp_path / "run" / "checkpoints" / f"step-{step:07d}" / "weights.safetensors")
        return {k.split("/", 1)[1]: v for k, v in w.items() if k.startswith(net + "/")}

    final = {n: {k: p.detach() for k, p in named} for n, named in t.params.items()}
    for k, end in ((0, 2), (1, 4)):
        done = weights(end, f"expert_{k}")
        assert all(torch.equal(done[n], final[f"expert_{k}"][n]) for n in done)  # untouched after its phase
        assert done != {} and not all(torch.equal(done[n], weights(end - 1, f"expert_{k}")[n]) for n in done)
    # init "previous": expert 1 starts as expert 0 ended, and its EMA starts there too
    e0, e1 = weights(2, "expert_0"), weights(2, "expert_1")
    assert all(torch.equal(e0[n], e1[n]) for n in e0)
    ema = load_file(tmp_path / "run" / "checkpoints" / "step-0000002" / "ema.safetensors")
    names = [n for n, _ in t.params["expert_1"]]
    assert all(torch.equal(ema[f"expert_1/{i}"], e0[n]) for i, n in enumerate(names))
    phases = json.loads((tmp_path / "run" / "phases.json").read_text())
    assert [(p["expert"], p["timesteps"], p["steps"]) for p in phases] == [
        ("expert_0", [999], 2), ("expert_1", [599], 2), ("expert_2", [299], 2)]
    assert phases[1]["subinterval"] == [599, 299] and phases[2]["subinterval"] == [299, CLEAN]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted({k.split("/")[0] for k in r if k.startswith("expert")}) for r in rows][::2] == \
        [["expert_0"], ["expert_1"], ["expert_2"]]


# ---- real-scale recipes and the stock pipeline -------------------------------------------------------------------
@pytest.mark.parametrize("config,sdxl", [("configs/sd15/phased_dmd_lora.yaml", False),
                                         ("configs/sdxl/phased_dmd_4step_lora.yaml", True)], ids=["sd15", "sdxl"])
def test_real_scale_config_runs_on_tiny_pipeline(tmp_path, config, sdxl):
    from stepdistill.config import load_config
    from stepdistill.testing import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "base", sdxl=sdxl)
    cfg = load_config(ROOT / config, [f"model.pretrained={base}", "train.steps=4", "method.phase_steps=null",
                                      "train.batch_size=2", "train.precision=bf16", "train.log_every=1",
                                      "train.log_with=none", "method.student.lora.rank=4",
                                      "method.fake_score.lora.rank=4", "method.student_every=1",
                                      f"data.file={ROOT / 'configs/prompts/coco_style.txt'}"])
    t = fit(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(all(v == v for v in r.values()) for r in rows)
    from stepdistill.pipelines.plan import SamplingRecipe

    recipe = SamplingRecipe.load(tmp_path / "run" / "student")
    assert recipe.scheduler == "TCDScheduler" and recipe.eta == 0.0 and len(recipe.networks) == len(t.method.experts)


def test_exported_experts_in_stock_pipeline_equal_stepdistill_sample(tmp_path):
    """digits-sd, 2 phases x 2 steps, trained briefly: stock StableDiffusionPipeline + load_lora_weights per expert
    + TCDScheduler(eta 0) + an adapter-switching callback gives the images of `stepdistill sample` (``load_run``'s
    sampler) and of the training-time expert chain, within 1e-4 in fp32."""
    from diffusers import StableDiffusionPipeline

    from stepdistill import assets
    from stepdistill.config import load_config
    from stepdistill.pipelines.loading import load_run
    from stepdistill.pipelines.plan import SamplingRecipe
    from stepdistill.pipelines.samplers import Conditions

    cfg = load_config(ROOT / "configs/digits_sd/phased_dmd_lora.yaml",
                      ["method.boundaries=[999,499]", "method.steps_per_phase=2", "train.steps=2", "train.batch_size=4",
                       "method.regression=null", "method.student_every=1", "train.log_with=none",
                       "train.optim.lr=1e-2", "method.student.lora.rank=4", "method.fake_score.lora.rank=4",
                       "train.ema.decay=null"])
    t = fit(cfg, tmp_path / "run")
    student = tmp_path / "run" / "student"
    recipe = SamplingRecipe.load(student)
    assert recipe.timesteps == [999, 749, 499, 249] and [s.network for s in recipe.segments] == ["expert_0", "expert_1"]

    prompts, seeds = ["a handwritten digit 3", "the number 7"], [5, 6]
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    pipe = StableDiffusionPipeline.from_pretrained(assets.path("digits-sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for name, net in recipe.networks.items():
        pipe.load_lora_weights(student / net.path, adapter_name=name)
    pipe.scheduler = recipe.scheduler_for(pipe)
    owner = [s.network for s in recipe.segments for _ in s.timesteps]

    def switch(pipe, i, t, kwargs):
        if i + 1 < len(owner):
            pipe.set_adapters(owner[i + 1])
        return kwargs
    pipe.set_adapters(owner[0])
    stock = pipe(prompts, timesteps=recipe.timesteps, guidance_scale=1.0, eta=0.0, generator=gens(),
                 output_type="pt", callback_on_step_end=switch).images

    ours = load_run(tmp_path / "run").sampler(recipe, Conditions(prompts=prompts), seeds)  # `stepdistill sample`
    assert ours.shape == stock.shape and (stock - ours).abs().max() <= 1e-4
    m = t.method
    with torch.no_grad():  # the chain the experts trained in, on the same noise, decoded by the same VAE
        z = torch.stack([torch.randn(m.bundle.sample_shape, generator=g) for g in gens()])
        x = m.chain.sample(z, m.bundle.conditioner.encode(prompts=prompts))
        trained = (m.bundle.decode(x) / 2 + 0.5).clamp(0, 1)
    assert (stock - trained).abs().max() <= 1e-4
    pipe.set_adapters(owner[0])  # not vacuous: expert 0 throughout gives other images
    one = pipe(prompts, timesteps=recipe.timesteps, guidance_scale=1.0, eta=0.0, generator=gens(),
               output_type="pt").images
    assert (stock - one).abs().max() > 1e-3
