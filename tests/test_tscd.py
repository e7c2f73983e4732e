"""TSCD (Hyper-SD): segment and solver timesteps, the boundary condition, the EMA target, progressive stages with
exact resume, our TCD sampler against the stock TCDScheduler, and the exported LoRA in a stock pipeline."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import TCDScheduler

from stepdistill.config import validate
from stepdistill.denoisers import Denoiser
from stepdistill.errors import UsageError
from stepdistill.generators import tcd_sample
from stepdistill.pipelines import sample
from stepdistill.schedules import (CLEAN, NoiseSchedule, ddim_grid, lower_edge, segment_edges, solver_target_timestep,
                                   tcd_timesteps, tscd_timesteps)
from stepdistill.trainers import Trainer, method_class
from stepdistill.training import latest_checkpoint
from stepdistill.trainers.common import ema_update, make_target, make_trainable
from stepdistill.trainers.tscd import DDIM_TRAILING_RECIPE, consistency_target

ROOT = Path(__file__).resolve().parents[1]
SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
TINY_UNET = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "num_class_embeds": 11,
             "block_out_channels": [8, 16], "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": 8}
DIGITS = {
    "method": {"name": "tscd", "stages": [{"segments": 8, "steps": 2}, {"segments": 4, "steps": 2},
                                          {"segments": 1, "steps": 2}],
               "guidance_min": 1.5, "guidance_max": 3.0, "student": {"lora": {"rank": 4}}},
    "model": {"kind": "unet2d", "arch": TINY_UNET, "prediction_type": "v_prediction",
              "scheduler": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}},
    "data": {"name": "digits"},
    "train": {"steps": 6, "batch_size": 4, "log_every": 1, "log_with": "none", "checkpoint_every": 100,
              "optim": {"lr": 1e-2}, "num_threads": 1},
}


def digits_config(method=None, **train):
    raw = json.loads(json.dumps(DIGITS))
    raw["method"].update(method or {})
    raw["train"].update(train)
    return validate(raw)


def fit(cfg, run_dir, **kw) -> Trainer:
    t = Trainer(cfg, method_class("tscd"), Path(run_dir), show_progress=False, **kw)
    t.fit()
    return t


# ---- schedule math ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_segment_edges_and_training_timesteps(k):
    e = segment_edges(k)
    assert len(e) == k + 1 and e[0] == CLEAN and e[-1] == 999  # k segments, the first edge is the clean end
    assert all(a < b for a, b in zip(e, e[1:]))
    ts = tscd_timesteps(50, k)
    assert set(ddim_grid(50)) <= set(ts) and set(e[1:]) <= set(ts)  # the grid and every upper edge are trained
    t = torch.tensor(ts)
    edge = lower_edge(t, e)
    assert bool(torch.all(edge < t))
    # the segments cover the grid: every timestep lies in exactly one segment (edge, next edge]
    for ti, le in zip(ts, edge.tolist()):
        assert sum(lo < ti <= hi for lo, hi in zip(e, e[1:])) == 1 and le == max(x for x in e if x < ti)
    t_prev = solver_target_timestep(t, 20, e)
    assert bool(torch.all((t_prev >= edge) & (t_prev < t)))  # the teacher never steps across an edge
    assert bool(torch.all((t_prev == t - 20) | (t_prev == edge)))


def test_solver_step_clamps_at_the_edge():
    e = segment_edges(8)  # [-1, 124, 249, ...]
    t = torch.tensor([19, 124, 139, 159, 999])
    assert solver_target_timestep(t, 20, e).tolist() == [-1, 104, 124, 139, 979]


@pytest.mark.parametrize("original", [50, 30])
def test_tcd_timesteps_match_diffusers(original):
    sched = TCDScheduler(**SD, original_inference_steps=original)
    for n in (1, 2, 3, 4, 8):
        sched.set_timesteps(n)
        assert tcd_timesteps(n, original) == sched.timesteps.tolist()


class _Toy(torch.nn.Module):
    """A small conv net whose output depends on x and t, enough to tell samplers apart."""

    def __init__(self, channels=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (1 + t.float()[:, None, None, None] / 1000)


def _per_sample(gens):
    return lambda like: torch.cat([torch.randn((1,) + tuple(like.shape[1:]), generator=g) for g in gens])


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_our_tcd_sampler_equals_stock_tcd_scheduler(pred, eta):
    torch.manual_seed(0)
    d = Denoiser(_Toy(), NoiseSchedule.from_scheduler_config(SD), pred)
    for steps in (1, 2, 4, 8):
        seeds = [11, 12, 13]
        ref = sample(d, TCDScheduler.from_config({**SD, "prediction_type": pred}), (3, 4, 8, 8), None,
                     num_inference_steps=steps, eta=eta, generator=[torch.Generator().manual_seed(s) for s in seeds])
        draw = _per_sample([torch.Generator().manual_seed(s) for s in seeds])
        ours = tcd_sample(d, draw(torch.zeros(3, 4, 8, 8)), None, tcd_timesteps(steps), eta, draw)
        assert (ours - ref).abs().max() <= 1e-4, (steps, eta)


# ---- the TSCD target and the EMA target network ---------------------------------------------------------------
def test_boundary_condition_target_is_x_prev_at_the_edge():
    sched = NoiseSchedule.from_scheduler_config(SD)
    calls = []

    class Rec(_Toy):
        def forward(self, x, t):
            calls.append(t.clone())
            return super().forward(x, t)
    target = Denoiser(Rec(), sched, "epsilon")
    x_prev = torch.randn(4, 4, 8, 8)
    t_prev = torch.tensor([124, 139, -1, 499])
    edge = torch.tensor([124, 124, -1, 374])
    out = consistency_target(target, x_prev, t_prev, edge, None)
    assert torch.equal(out[0], x_prev[0]) and torch.equal(out[2], x_prev[2])  # t' = e: x_t' itself
    assert calls and calls[0].tolist() == [139, 499]  # the network only runs where t' > e
    x0, eps = target.x0_eps(x_prev[[1, 3]], t_prev[[1, 3]])
    assert torch.allclose(out[[1, 3]], sched.ddim_jump(x0, eps, edge[[1, 3]]), atol=1e-6)
    # a jump of zero length from the student's own prediction is the identity too (DDIM parameterisation)
    x0, eps = target.x0_eps(x_prev, torch.full((4,), 300))
    assert torch.allclose(sched.ddim_jump(x0, eps, 300), x_prev, atol=1e-4)


@pytest.mark.parametrize("lora", [True, False], ids=["lora-twin-adapter", "full-copy"])
def test_ema_target_update(lora):
    from stepdistill.config import LoRAConfig, ModelConfig
    from stepdistill.models import load_bundle

    bundle = load_bundle(ModelConfig(kind="unet2d", arch=TINY_UNET), None)
    lora_cfg = LoRAConfig(rank=4) if lora else None
    student = make_trainable(bundle, "student", lora_cfg, bundle.init_net if lora else None)
    target = make_target(bundle, student, lora_cfg)
    assert (target.module is student.module) == lora  # LoRA: one frozen base carries both adapters
    s, tw = student.weights(), target.weights()
    assert s.keys() == tw.keys() and all(torch.equal(s[k], tw[k]) for k in s)  # starts equal
    assert not any(p.requires_grad for p in tw.values())
    assert {id(p) for _, p in student.named_parameters()}.isdisjoint({id(p) for p in tw.values()})
    before = {k: p.detach().clone() for k, p in tw.items()}
    with torch.no_grad():
        for p in s.values():
            p.add_(torch.randn_like(p))
    ema_update(target, student, 0.9)
    for k, p in tw.items():
        assert torch.allclose(p, 0.9 * before[k] + 0.1 * s[k], atol=1e-6)
    ema_update(target, student, 0.0)
    assert all(torch.equal(tw[k], s[k]) for k in s)


# ---- progressive stages, resume ----------------------------------------------------------------------------
def test_stage_transitions_keep_weights(tmp_path, monkeypatch):
    from stepdistill.trainers.tscd import TSCDMethod

    seen = []
    real_losses = TSCDMethod.losses

    def spy(self, batch, phase):
        seen.append(self.stage.segments)
        return real_losses(self, batch, phase)
    monkeypatch.setattr(TSCDMethod, "losses", spy)
    snapshots = {}
    real_enter = TSCDMethod._enter_stage

    def enter(self, index):
        if hasattr(self, "student"):
            snapshots[index] = {k: p.detach().clone() for k, p in self.student.weights().items()}
        real_enter(self, index)
    monkeypatch.setattr(TSCDMethod, "_enter_stage", enter)
    t = fit(digits_config(), tmp_path / "run", max_steps=4)
    assert seen == [8, 8, 4, 4]
    m = t.method
    assert m.stage_index == 2 and m.edges == segment_edges(1)  # the transition after step 4 happened
    # stage 1 started from the student weights stage 0 ended with, and those are trained (not the init)
    trained_b = [v for k, v in snapshots[1].items() if "lora_B" in k]
    assert any(float(v.abs().max()) > 0 for v in trained_b)
    last = snapshots[2]
    now = m.student.weights()
    assert all(torch.equal(now[k], last[k]) for k in now)  # entering a stage does not touch the student
    assert all(torch.equal(m.target.weights()[k], now[k]) for k in now)  # the target is re-synced to it


def test_stages_must_add_up_to_train_steps(tmp_path):
    with pytest.raises(UsageError, match="add up to 6 steps but train.steps is 7"):
        fit(digits_config(steps=7), tmp_path / "run")


def _losses(run_dir):
    return [json.loads(x)["student/tscd"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_keeps_stage_and_target(tmp_path):
    """Interrupted in stage 1 and resumed, the run continues stage 1 with the saved target and ends where an
    uninterrupted run ends."""
    cfg = digits_config(checkpoint_every=1)
    full = fit(cfg, tmp_path / "full")
    fit(cfg, tmp_path / "cut", max_steps=3)
    ckpt = latest_checkpoint(tmp_path / "cut")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 3 and state["extra"]["stage"] == 1 and state["extra"]["segments"] == 4
    resumed = Trainer(cfg, method_class("tscd"), tmp_path / "cut", resume=True, show_progress=False)
    resumed.fit()
    assert resumed.method.stage_index == 2 and len(resumed.method.stages.finished) == 3
    a, b = full.method.student.weights(), resumed.method.student.weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = full.method.target.weights(), resumed.method.target.weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "cut")
    stages = json.loads((tmp_path / "cut" / "stages.json").read_text())  # per-stage wall clock, across the resume
    assert [(r["segments"], r["steps"]) for r in stages] == [(8, 2), (4, 2), (1, 2)]
    assert all(r["seconds"] >= 0 for r in stages)


def test_adversarial_weight_follows_the_stage_of_the_step():
    """loss_weights(step): gan_g times the adv_weight of the stage that step is in; other weights as configured."""
    cfg = digits_config({"gan": {"hidden": 8}, "loss_weights": {"gan_g": 2.0},
                         "stages": [{"segments": 8, "steps": 2}, {"segments": 4, "steps": 2, "adv_weight": 0.25},
                                    {"segments": 1, "steps": 2, "adv_weight": 0.5}]})
    t = Trainer(cfg, method_class("tscd"), None, max_steps=1, show_progress=False)
    t.fit()
    weights = [t.method.loss_weights(step) for step in range(6)]
    assert [w["gan_g"] for w in weights] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    assert all(w["tscd"] == 1.0 and w["gan_d"] == 1.0 for w in weights)  # left out: the defaults


# ---- smoke runs and export ------------------------------------------------------------------------------------
def test_digits_smoke_run_exports_both_recipes(tmp_path):
    """Pixel digits with the adversarial term in the last stage; the student loads with the evaluator's
    load_student and samples with both recipes at 1, 2, 4 and 8 steps."""
    from stepdistill.pipelines.loading import load_run as load_student
    from stepdistill.pipelines.samplers import Conditions
    from stepdistill.pipelines.plan import SamplingRecipe

    cfg = digits_config({"gan": {"hidden": 8}, "stages": [{"segments": 8, "steps": 2}, {"segments": 4, "steps": 2},
                                                          {"segments": 1, "steps": 2, "adv_weight": 0.5}]})
    fit(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(all(v == v for v in r.values()) for r in rows)
    assert "student/gan_g" in rows[-1] and "student/gan_d" in rows[-1] and "student/gan_g" not in rows[1]
    student = tmp_path / "run" / "student"
    tcd = SamplingRecipe.load(student)
    ddim = SamplingRecipe.load(student / DDIM_TRAILING_RECIPE)
    assert tcd.scheduler == "TCDScheduler" and tcd.guidance_scale == 1.0 and tcd.eta == 0.3
    assert ddim.scheduler == "DDIMScheduler" and ddim.scheduler_kwargs == {"timestep_spacing": "trailing"}
    loaded = load_student(tmp_path / "run")
    conds = Conditions(labels=torch.tensor([3, 7]))
    for recipe in (tcd, ddim):
        for steps in (1, 2, 4, 8):
            x = loaded.sampler(recipe.model_copy(update={"num_inference_steps": steps}), conds, [0, 1])
            assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    # `stepdistill eval --run RUN --steps 1,2 [--recipe FILE]`: one row per step count and recipe
    from stepdistill.cli import main

    for recipe, label in (("sampling.json", "TCD"), (DDIM_TRAILING_RECIPE, "DDIM")):
        out = tmp_path / f"eval-{label}"
        assert main(["eval", "--run", str(tmp_path / "run"), "--steps", "1,2", "--recipe", recipe, "--num-samples",
                     "4", "--batch-size", "4", "--no-speed", "--quiet", "--out", str(out)]) == 0
        rows = json.loads((out / "report.json").read_text())["rows"]
        assert [(r["name"], r["steps"], r["nfe"]) for r in rows] == [(f"run {label}-1", 1, 1), (f"run {label}-2", 2, 2)]


def test_exported_lora_in_stock_pipeline_reproduces_our_sampler(tmp_path):
    """A TSCD LoRA trained on a tiny SD pipeline, loaded with the stock load_lora_weights and sampled with the
    stock TCDScheduler, gives the images of our own TCD sampler over the trained student (same seeds)."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.testing import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "base")
    cfg = validate({"method": {"name": "tscd", "stages": [{"segments": 4, "steps": 2}, {"segments": 1, "steps": 1}],
                               "guidance_min": 2.0, "guidance_max": 4.0, "student": {"lora": {"rank": 4}}},
                    "model": {"pretrained": str(base)}, "data": {"name": "digits_sd", "empty_prompt_prob": 0.0},
                    "train": {"steps": 3, "batch_size": 4, "log_with": "none", "optim": {"lr": 5e-2},
                              "num_threads": 1}})
    t = fit(cfg, tmp_path / "run")
    recipe = json.loads((tmp_path / "run" / "student" / "sampling.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TCDScheduler.from_config({**pipe.scheduler.config, **recipe["scheduler_kwargs"]})
    prompts, seeds = ["a handwritten digit seven", "the number 3"], [5, 6]

    def stock(steps):
        return pipe(prompts, num_inference_steps=steps, guidance_scale=recipe["guidance_scale"], eta=recipe["eta"],
                    generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
    without = stock(4)
    pipe.load_lora_weights(tmp_path / "run" / "student")
    m = t.method
    cond = m.bundle.conditioner.encode(None, prompts)
    for steps in (1, 2, 4):
        draw = _per_sample([torch.Generator().manual_seed(s) for s in seeds])
        ours = tcd_sample(m.student.denoiser, draw(torch.zeros(2, 4, 8, 8)), cond, tcd_timesteps(steps),
                          recipe["eta"], draw)
        assert (stock(steps) - ours).abs().max() <= 1e-4, steps
    assert (stock(4) - without).abs().max() > 1e-3  # the LoRA really changes the images


@pytest.mark.parametrize("config,sdxl", [("configs/sd15/tscd_lora.yaml", False),
                                         ("configs/sdxl/tscd_lora.yaml", True)], ids=["sd15", "sdxl"])
def test_real_scale_config_runs_on_tiny_pipeline(tmp_path, config, sdxl):
    """The shipped SD1.5 / SDXL recipes (data-free: the target's own samples are noised to x_t) on tiny random
    pipelines with bf16 autocast; the exported LoRA loads in the stock pipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from stepdistill.config import load_config
    from stepdistill.testing import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "base", sdxl=sdxl)
    cfg = load_config(ROOT / config, [
        f"model.pretrained={base}", "train.steps=4", "train.batch_size=2", "train.precision=bf16",
        "train.log_every=1", "train.log_with=none", "method.student.lora.rank=4",
        "method.stages=[{segments: 8, steps: 1}, {segments: 4, steps: 1}, {segments: 2, steps: 1}, "
        "{segments: 1, steps: 1}]", f"data.file={ROOT / 'configs/prompts/coco_style.txt'}"])
    assert cfg.method.x0_source in ("auto", "student")
    fit(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 <= r["student/tscd"] < 1e3 for r in rows)
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_pretrained(base) if sdxl else cls.from_pretrained(base, safety_checker=None)
    pipe.load_lora_weights(tmp_path / "run" / "student")
    assert "default_0" in pipe.unet.peft_config
    assert (tmp_path / "run" / "student" / DDIM_TRAILING_RECIPE).exists()


def test_gradient_checkpointing_recomputes_with_the_adapter_that_ran(tmp_path):
    """Shared base: the student's forward runs with its adapter, other views (teacher, target) run before the
    backward pass; with checkpointing the recomputation must use the student's adapter again (same gradients
    as without checkpointing)."""
    from diffusers import UNet2DConditionModel

    from stepdistill.lora import add_lora, checkpoint_keeping_adapters, lora_parameters
    from stepdistill.schedules import NoiseSchedule

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                                norm_num_groups=8, cross_attention_dim=16).requires_grad_(False)
    for name in ("student", "target"):
        add_lora(unet, name, 4, init=False)
    for p in lora_parameters(unet, "target"):
        p.requires_grad_(False)
    sched = NoiseSchedule.from_scheduler_config(SD)
    student, target = Denoiser(unet, sched, "epsilon", adapter="student"), Denoiser(unet, sched, "epsilon", "target")
    teacher = Denoiser(unet, sched, "epsilon", adapters_off=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 900])
    kw = {"encoder_hidden_states": torch.randn(2, 5, 16)}
    from stepdistill.denoisers import Cond

    def grads():
        for p in lora_parameters(unet, "student"):
            p.grad = None
        out = student.predict(x, t, Cond(kw))
        with torch.no_grad():
            ref = teacher.predict(x, t, Cond(kw)) + target.predict(x, t, Cond(kw))
        ((out - ref) ** 2).mean().backward()
        return [p.grad.clone() for p in lora_parameters(unet, "student")]
    plain = grads()
    unet.enable_gradient_checkpointing(checkpoint_keeping_adapters)
    unet.train()
    checked = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checked))
