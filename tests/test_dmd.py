"""DMD / DMD2: the loss's sign and gradient, backward simulation, the update schedule, and smoke runs."""

import json
from pathlib import Path

import pytest
import torch

from stepdistill import losses as L
from stepdistill.config import Toy2DData, validate
from stepdistill.data.toy2d import GaussianMixtureX0, MixtureSpec
from stepdistill.denoisers import Denoiser
from stepdistill.generators import FewStepGenerator
from stepdistill.schedules import NoiseSchedule
from stepdistill.trainers import Trainer, method_class

SCHED = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def test_distribution_matching_gradient_is_g():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    g = torch.randn(3, 2, 4, 4)
    L.distribution_matching(x, g).mean().backward()
    assert torch.allclose(x.grad, g / (2 * 4 * 4) / 3, atol=1e-7)


def test_dmd_gradient_normalisation_and_nan_guard():
    x = torch.tensor([[1.0, 3.0]])
    real, fake = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 2.0]])
    g = L.dmd_gradient(x, real, fake)  # (f - r) / mean|x - r| = [2, 1] / 1.5
    assert torch.allclose(g, torch.tensor([[2.0, 1.0]]) / 1.5)
    g = L.dmd_gradient(torch.tensor([[float("nan"), 0.0]]), real, fake)
    assert torch.isfinite(g).all()


def test_dm_loss_moves_samples_toward_the_teacher_density():
    """Sign check: following -g moves samples of a wrong distribution (the ring rotated by half a mode) toward
    the teacher's modes, when the fake score is the exact score of the samples' own distribution."""
    sched = NoiseSchedule.from_scheduler_config(SCHED)
    true = MixtureSpec.from_config(Toy2DData())
    ang = torch.arange(8, dtype=torch.float64) * 2 * torch.pi / 8 + torch.pi / 8
    wrong = MixtureSpec(2.0 * torch.stack([ang.cos(), ang.sin()], 1), true.stds.clone(), true.weights.clone())
    real = Denoiser(GaussianMixtureX0(true, sched), sched, "sample")
    fake = Denoiser(GaussianMixtureX0(wrong, sched), sched, "sample")
    g = torch.Generator().manual_seed(0)
    x, _ = wrong.sample(512, g)
    teacher_density = GaussianMixtureX0(true, sched).log_density
    t_clean = torch.zeros(len(x), dtype=torch.long)
    before = teacher_density(x, t_clean).mean()
    for _ in range(10):
        x = x.requires_grad_(True)
        t = torch.randint(20, 980, (len(x),), generator=g)
        eps = torch.randn(x.shape, generator=g)
        x_t = sched.add_noise(x.detach(), eps, t)
        grad = L.dmd_gradient(x, real.x0(x_t, t), fake.x0(x_t, t))
        (L.distribution_matching(x, grad).sum(),)[0].backward()
        x = (x - 0.1 * x.grad).detach()  # x.grad = g / 2 (the 0.5*MSE trick hands g / numel to autograd)
    after = teacher_density(x, t_clean).mean()
    assert after > before + 1.0


def test_backward_simulation_uses_fresh_noise():
    sched = NoiseSchedule.from_scheduler_config(SCHED)

    class Half(torch.nn.Module):
        def forward(self, x, t):
            return 0.5 * x

    gen = FewStepGenerator(Denoiser(Half(), sched, "sample"), [999, 749, 499, 249])
    drawn = []

    def fresh(like):
        e = torch.randn(like.shape, generator=torch.Generator().manual_seed(100 + len(drawn)))
        drawn.append(e)
        return e
    z = torch.randn(4, 2)
    x3 = gen.simulate(z, None, 3, fresh)
    assert len(drawn) == 3  # one fresh draw per re-noise, none reused
    assert not torch.allclose(drawn[0], drawn[1])
    x = z  # replay: x0 = boundary-scaled 0.5 x, re-noised with the recorded fresh noise
    for i, t in enumerate([999, 749, 499]):
        c_skip, c_out = sched.lcm_boundary_scalings(t)
        x0 = float(c_out) * 0.5 * x + float(c_skip) * x
        x = sched.add_noise(x0, drawn[i], [749, 499, 249][i])
    assert torch.allclose(x3, x, atol=1e-6)
    out, t = gen(z, None, 0, fresh)
    assert t == 999 and len(drawn) == 3


TOY_DMD = {
    "method": {"name": "dmd", "timesteps": [999], "student_every": 3, "loss_weights": {"dm": 1.0, "fake": 1.0}},
    "model": {"pretrained": "toy2d", "arch": {"hidden": 32, "depth": 1}, "prediction_type": "epsilon",
              "scheduler": SCHED},
    "data": {"name": "toy2d"},
    "train": {"steps": 10, "batch_size": 16, "checkpoint_every": 100, "log_every": 5, "log_with": "none"},
}


def toy_dmd(**method):
    raw = json.loads(json.dumps(TOY_DMD))
    raw["method"].update(method)
    return validate(raw)


def test_update_schedule_follows_config(tmp_path, monkeypatch):
    from stepdistill.trainers.dmd import DMDMethod

    calls = []
    for name in ("student_losses", "fake_losses"):
        real = getattr(DMDMethod, name)

        def wrapped(self, batch, _real=real, _name=name):
            calls.append((_name, self.ctx.generator.initial_seed()))
            return _real(self, batch)
        monkeypatch.setattr(DMDMethod, name, wrapped)
    cfg = toy_dmd(student_every=3, fake_repeats=2)
    t = Trainer(cfg, method_class("dmd"), tmp_path / "run", show_progress=False)
    t.fit()
    names = [c[0] for c in calls]
    assert names.count("student_losses") == 4  # steps 0, 3, 6, 9
    assert names.count("fake_losses") == 20  # every step, twice
    assert names[:3] == ["student_losses", "fake_losses", "fake_losses"]


@pytest.mark.parametrize("variant", [
    {"student": {"lora": {"rank": 4}}, "fake_score": {"lora": {"rank": 4}}, "shared_base": True,
     "gan": {"hidden": 16}, "regression": {"num_pairs": 32, "teacher_steps": 4},
     "loss_weights": {"dm": 1.0, "fake": 1.0, "reg": 0.25, "gan_g": 0.01, "gan_d": 0.01}},
    {"timesteps": [999, 749, 499, 249], "gan": {"hidden": 16},
     "loss_weights": {"dm": 1.0, "fake": 1.0, "gan_g": 0.01, "gan_d": 0.01}},
], ids=["lora-shared-gan-reg", "4step-full-gan"])
def test_toy_smoke_run_exports_a_student(tmp_path, variant):
    from stepdistill.pipelines.plan import SamplingRecipe

    cfg = toy_dmd(**variant)
    t = Trainer(cfg, method_class("dmd"), tmp_path / "run", show_progress=False)
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(all(v == v for v in r.values()) for r in rows)  # finite (no NaN)
    assert {"student/dm", "fake_score/fake"} <= set(rows[-1]) or {"fake_score/fake"} <= set(rows[-1])
    recipe = SamplingRecipe.load(tmp_path / "run" / "student")
    assert recipe.scheduler == "LCMScheduler" and recipe.timesteps == variant.get("timesteps", [999])
    if "regression" in variant:
        assert (tmp_path / "run" / "regression_pairs.safetensors").exists()


def test_regression_pairs_cache_is_reused_only_for_the_same_settings(tmp_path, monkeypatch):
    from stepdistill.trainers.common import RegressionPairs

    real, built = RegressionPairs.build, []

    def counting(*args, **kwargs):
        built.append(args[3:5])  # (num, steps)
        return real(*args, **kwargs)

    monkeypatch.setattr(RegressionPairs, "build", counting)
    for steps in (2, 2, 3):
        cfg = toy_dmd(regression={"num_pairs": 8, "teacher_steps": steps}, loss_weights={"reg": 0.25})
        cfg.train.steps = 1
        Trainer(cfg, method_class("dmd"), tmp_path / "run", show_progress=False).fit()
    assert built == [(8, 2), (8, 3)]  # made, reused, remade for other teacher steps


@pytest.mark.parametrize("config,sdxl", [("configs/sd15/dmd2_lora.yaml", False),
                                         ("configs/sdxl/dmd2_4step_lora.yaml", True)], ids=["sd15", "sdxl"])
def test_real_scale_config_runs_on_tiny_pipeline_bf16(tmp_path, config, sdxl):
    """The shipped SD1.5 / SDXL recipes, on a tiny random pipeline of the same shape, with bf16 autocast on CPU;
    the exported LoRA loads into the stock pipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from stepdistill.config import load_config
    from stepdistill.testing import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "base", sdxl=sdxl)
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / config, [f"model.pretrained={base}", "train.steps=3", "train.batch_size=2",
                                      "train.precision=bf16", "train.log_every=1", "train.log_with=none",
                                      "method.student.lora.rank=4", "method.fake_score.lora.rank=4",
                                      "method.student_every=2", f"data.file={root / 'configs/prompts/coco_style.txt'}"])
    t = Trainer(cfg, method_class("dmd"), tmp_path / "run", show_progress=False)
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(abs(r["fake_score/fake"]) < 1e3 for r in rows)
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(base) if sdxl else cls.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "run" / "student")
    assert "default_0" in pipe.unet.peft_config


def test_digits_sd_lora_matches_stock_pipeline(tmp_path):
    """Export -> StableDiffusionPipeline.from_pretrained(digits-sd).load_lora_weights(RUN/student) + stock
    LCMScheduler with the recipe's timesteps gives the images of `stepdistill sample` (the run's own student
    view, sampled through pipelines.sample) and of the training-time generator, within 1e-4; also after fuse_lora."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from stepdistill import assets
    from stepdistill.config import load_config
    from stepdistill.pipelines.loading import load_run as load_student
    from stepdistill.pipelines.samplers import Conditions
    from stepdistill.pipelines.plan import SamplingRecipe

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/digits_sd/dmd_lora.yaml",
                      ["train.steps=2", "train.batch_size=4", "method.regression=null", "method.student_every=1",
                       "train.log_with=none", "train.optim.lr=1e-2", "method.student.lora.rank=4",
                       "method.fake_score.lora.rank=4", "train.ema.decay=null"])  # export = live weights
    run = tmp_path / "run"
    t = Trainer(cfg, method_class("dmd"), run, show_progress=False)
    t.fit()
    method = t.method
    recipe = SamplingRecipe.load(run / "student")
    prompts = ["a handwritten digit seven", "the number 3"]
    seeds = [11, 12]

    pipe = StableDiffusionPipeline.from_pretrained(assets.path("digits-sd"), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run / "student")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    stock = pipe(prompts, generator=gens(), output_type="pt", **recipe.pipeline_kwargs()).images
    ours = load_student(run).sampler(recipe, Conditions(prompts=prompts), seeds)  # what `stepdistill sample` draws
    assert (stock - ours).abs().max() <= 1e-4

    # the training-time generator on the same noise, decoded by the same VAE
    with torch.no_grad():
        z = torch.stack([torch.randn(method.bundle.sample_shape, generator=g) for g in gens()])
        x0 = method.generator.sample(z, method.bundle.conditioner.encode(prompts=prompts), lambda x: None)
        trained = (method.bundle.decode(x0) / 2 + 0.5).clamp(0, 1)
    assert (stock - trained).abs().max() <= 1e-4

    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe(prompts, generator=gens(), output_type="pt", **recipe.pipeline_kwargs()).images
    assert (stock - fused).abs().max() <= 1e-4
    base = StableDiffusionPipeline.from_pretrained(assets.path("digits-sd"), safety_checker=None)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    untouched = base(prompts, generator=gens(), output_type="pt", **recipe.pipeline_kwargs()).images
    assert (stock - untouched).abs().max() > 1e-3  # the LoRA changed the model


def test_digits_smoke_run_4step_with_gan(tmp_path):
    """The shipped digits 4-step recipe with the GAN head, two steps on the real teacher: finite losses, an
    exported ClassConditionalPipeline student that samples with its recipe."""
    from stepdistill.config import load_config
    from stepdistill.pipelines.loading import load_run as load_student
    from stepdistill.pipelines.samplers import Conditions

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/digits/dmd_4step.yaml",
                      ["train.steps=2", "train.batch_size=4", "method.student_every=1", "train.log_with=none",
                       "train.log_every=1", "method.gan.hidden=16",
                       "method.loss_weights={dm: 1.0, fake: 1.0, gan_g: 0.003, gan_d: 0.01}"])
    t = Trainer(cfg, method_class("dmd"), tmp_path / "run", show_progress=False)
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"student/dm", "student/gan_g", "fake_score/fake", "fake_score/gan_d"} <= set(rows[0])
    assert all(v == v and abs(v) < 1e4 for r in rows for v in r.values())
    loaded = load_student(tmp_path / "run")
    x = loaded.sampler(loaded.spec, Conditions(labels=torch.tensor([3, 7])), [0, 1])
    assert x.shape == (2, 1, 16, 16) and loaded.spec.timesteps == [999, 749, 499, 249]
