"""Hybrid sampling (base model first, distilled after) as a two-segment plan, x0 trajectories and control LoRAs
stacked on a student, on tiny random pipelines: which model runs at which timestep, the hand-off latent, refused
scheduler pairs."""

import pytest
import torch
import yaml

from stepdistill.errors import UsageError
from stepdistill.pipelines import seeded_generators
from stepdistill.pipelines.hybrid import HybridPipeline
from stepdistill.pipelines.loading import hybrid_recipe, parse_scheduler
from stepdistill.pipelines.plan import TEACHER, SamplingRecipe, plan_hybrid
from stepdistill.pipelines.samplers import Conditions, DenoiserSampler, PipelineSampler

SamplerSpec = SamplingRecipe

PROMPTS = ["a handwritten digit three", "the number 7"]
LCM4 = [999, 749, 499, 249]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one thread is ~20x faster than two on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from stepdistill.testing import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("hybrid") / "sd")


def _pipe(folder, scheduler="LCMScheduler", lora_seed=None, **sched_kw):
    import diffusers
    from diffusers import StableDiffusionPipeline

    from stepdistill.lora import add_lora

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config({**pipe.scheduler.config, **sched_kw})
    pipe.set_progress_bar_config(disable=True)
    if lora_seed is not None:  # a stand-in "distilled" model: a random, non-zero LoRA
        torch.manual_seed(lora_seed)
        add_lora(pipe.unet, "student", 4, init=False)
    return pipe


def _denoiser(pipe):
    return PipelineSampler(pipe).denoiser_sampler()


def _two(base, dist) -> DenoiserSampler:
    """Teacher and student Denoisers of two pipelines in one sampler (main: the student)."""
    b = _denoiser(base)
    d = PipelineSampler(dist, {"student": "student"}, main="student").denoiser_sampler()  # its LoRA 'student' on
    return DenoiserSampler({TEACHER: b.denoiser, "student": d.denoiser}, d.scheduler_config(), d.shape,
                           d.conditioner, decode=d.decode, main="student")


def _hybrid(sampler, spec, base_steps=1, mode="replace", base=None, guidance=None):
    """The student recipe with the teacher in front; ``base``: (scheduler name, kwargs) of the teacher's steps."""
    return plan_hybrid(spec, sampler.timesteps(spec), base_steps, mode, base, guidance)


class CallLog:
    """(model, timestep, rows) of every UNet call."""

    def __init__(self, **nets):
        self.calls, self.handles = [], []
        for name, net in nets.items():
            self.handles.append(net.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            self.calls.append((name, int(torch.as_tensor(t).flatten()[0]), int(x.shape[0])))
        return hook

    def timesteps(self, name):
        return [t for n, t, _ in self.calls if n == name]

    def rows(self, name):
        return sum(r for n, _, r in self.calls if n == name)

    def close(self):
        for h in self.handles:
            h.remove()


def test_plan_replace_and_add():
    from stepdistill.pipelines.plan import passes

    spec = SamplerSpec(scheduler="LCMScheduler", timesteps=LCM4)
    p = plan_hybrid(spec, LCM4, 1, "replace")
    assert [s.network for s in p.segments] == [TEACHER, None] and p.steps == 4
    assert p.segments[0].timesteps == [999] and p.segments[1].timesteps == [749, 499, 249]
    (one,) = passes(p, p.segments)  # one scheduler: one pass over the chain, networks taking turns
    assert one.chain == tuple(LCM4) and one.networks == (TEACHER, None, None, None) and one.entry == "noise"
    p = plan_hybrid(spec, LCM4, 2, "replace")
    assert p.segments[1].timesteps == [499, 249] and p.label() == "hybrid replace base-2 + LCM-4"
    p = plan_hybrid(spec, LCM4, 1, "add", ("DDIMScheduler", {"timestep_spacing": "trailing"}), 3.0)
    assert p.segments[0].timesteps == [999] and p.segments[1].timesteps == LCM4 and p.steps == 5
    first, second = passes(p, p.segments)  # add: the student re-noises the teacher's clean estimate
    assert (first.chain, first.stop, second.entry, second.chain) == ((999,), 1, "renoise", tuple(LCM4))
    assert p.label() == "hybrid add base-1 DDIM w=3 + LCM-4"
    assert plan_hybrid(SamplerSpec(timesteps=[999]), [999], 1, "add").steps == 2
    assert SamplerSpec.model_validate_json(p.model_dump_json()) == p  # pure data, JSON round trip

    assert parse_scheduler("DDIMScheduler:timestep_spacing=trailing,eta=0.5") == (
        "DDIMScheduler", {"timestep_spacing": "trailing", "eta": 0.5})
    assert parse_scheduler("ode") == ("ode", {})
    for ts, b, mode in (([999], 1, "replace"), (LCM4, 4, "replace"), (LCM4, 0, "replace"), (LCM4, 5, "add"),
                        ([999, 999], 1, "replace"), (LCM4, 1, "both")):
        with pytest.raises(UsageError):
            plan_hybrid(SamplerSpec(num_inference_steps=4), ts, b, mode)


@pytest.mark.parametrize("mode,base_guidance", [("replace", 1.0), ("replace", 3.0), ("add", 1.0)])
def test_stock_pipelines_call_counts_and_timesteps(sd_folder, mode, base_guidance):
    """The base really runs (at the first timestep), the distilled model at the rest; NFE as planned."""
    base, dist = _pipe(sd_folder), _pipe(sd_folder, lora_seed=1)
    log = CallLog(base=base.unet, distilled=dist.unet)
    HybridPipeline(base, dist, base_steps=1, mode=mode)(PROMPTS, timesteps=LCM4, base_guidance_scale=base_guidance,
                                                       generator=seeded_generators(0, 2), output_type="latent")
    log.close()
    cfg = 2 if base_guidance > 1 else 1
    assert log.timesteps("base") == [999]
    assert log.rows("base") == 2 * cfg  # 2 images, one step (CFG: one batched call on 2B rows)
    assert log.timesteps("distilled") == ([749, 499, 249] if mode == "replace" else LCM4)
    assert log.rows("distilled") == 2 * (3 if mode == "replace" else 4)


def test_two_base_steps_and_ddim_leading_grid_still_runs_the_base(sd_folder):
    """A recipe given as a step count on DDIM's default 'leading' grid ([751, 501, 251, 1] here, never 999): the
    plan is by index, so the base still takes the first steps (a known public hybrid silently ran none)."""
    base, dist = _pipe(sd_folder, "DDIMScheduler"), _pipe(sd_folder, "DDIMScheduler", lora_seed=1)
    hybrid = _two(base, dist)
    spec = _hybrid(hybrid, SamplerSpec(scheduler="DDIMScheduler", num_inference_steps=4), base_steps=2)
    log = CallLog(base=base.unet, distilled=dist.unet)
    hybrid(spec, Conditions(prompts=PROMPTS), [0, 1])
    log.close()
    assert log.timesteps("base") == [751, 501] and log.timesteps("distilled") == [251, 1]


def _interrupt_after(steps, seen=None):
    def callback(pipe, i, t, kwargs):  # Diffusers' documented way to stop a pipeline early
        if seen is not None:
            seen.append(kwargs["latents"].clone())
        if i + 1 == steps:
            pipe._interrupt = True
        return kwargs
    return callback


@pytest.mark.parametrize("base_steps", [1, 2])
def test_handoff_is_the_base_pipeline_run_to_that_step(sd_folder, base_steps):
    """The hand-off latent = the base pipeline run to step b with output_type='latent' (stock interrupt callback)
    = the latents a full base run shows its stock callback after step b; the distilled pipeline continues on the
    partial schedule; the Denoiser path (pipelines.sample with stop/start index) gives the same images."""
    base, dist = _pipe(sd_folder), _pipe(sd_folder, lora_seed=1)
    to_step = base(PROMPTS, timesteps=LCM4, guidance_scale=1.0, generator=seeded_generators(0, 2),
                   output_type="latent", callback_on_step_end=_interrupt_after(base_steps)).images
    seen = []
    base(PROMPTS, timesteps=LCM4, guidance_scale=1.0, generator=seeded_generators(0, 2), output_type="latent",
         callback_on_step_end=_interrupt_after(99, seen))
    assert torch.equal(to_step, seen[base_steps - 1])
    # the Denoiser path's hand-off latent (its callback after the base's last step)
    handed = {}

    def record(i, t, x, x0, model):
        if model == TEACHER:
            handed["x"] = x.clone()
    from stepdistill.pipelines.runner import run_denoisers

    two = _two(base, dist)
    plan = _hybrid(two, SamplerSpec(scheduler="LCMScheduler", timesteps=LCM4), base_steps)
    x = run_denoisers(plan, plan.segments, two.networks, "student", two.scheduler_config(), (2, 4, 8, 8),
                      two.cond(Conditions(prompts=PROMPTS)), generator=seeded_generators(0, 2), callback=record)
    assert torch.allclose(handed["x"], to_step, atol=1e-5)
    # the distilled pipeline from that latent, on the partial schedule, with the generators where the base left them
    gens = seeded_generators(0, 2)
    base(PROMPTS, timesteps=LCM4, guidance_scale=1.0, generator=gens, output_type="latent",
         callback_on_step_end=_interrupt_after(base_steps))
    rest = dist(PROMPTS, timesteps=LCM4[base_steps:], guidance_scale=1.0, latents=to_step, generator=gens,
                output_type="latent").images
    hybrid = HybridPipeline(base, dist, base_steps)(PROMPTS, timesteps=LCM4, generator=seeded_generators(0, 2),
                                                    output_type="latent").images
    assert torch.equal(hybrid, rest)
    assert torch.allclose(x, hybrid, atol=1e-5)


def test_sigma_scaled_base_is_converted(sd_folder):
    """Euler steps sigma-scaled latents x_t / a_t; DDIM is the same ODE solver in VP latents. An Euler base
    hands off the same latent as a DDIM base once converted, so the hybrids agree (LCM distilled)."""
    from stepdistill.pipelines.runner import run_denoisers

    base, dist = _pipe(sd_folder), _pipe(sd_folder, lora_seed=1)
    two = _two(base, dist)
    cond = two.cond(Conditions(prompts=PROMPTS))
    lcm = SamplerSpec(scheduler="LCMScheduler", timesteps=LCM4)
    outs = []
    for name, kw in (("DDIMScheduler", {"timestep_spacing": "trailing"}),
                     ("EulerDiscreteScheduler", {"timestep_spacing": "leading"})):
        plan = _hybrid(two, lcm, 1, base=(name, kw))
        outs.append(run_denoisers(plan, plan.segments, two.networks, "student", two.scheduler_config(),
                                  (2, 4, 8, 8), cond, generator=seeded_generators(0, 2)))
    assert torch.allclose(outs[0], outs[1], atol=1e-4)
    # the same through stock pipelines: an Euler or a DDIM (its own trailing grid) base pipeline, LCM distilled
    for base_pipe in (_pipe(sd_folder, "EulerDiscreteScheduler", timestep_spacing="leading"),
                      _pipe(sd_folder, "DDIMScheduler", timestep_spacing="trailing")):
        stock = HybridPipeline(base_pipe, dist, 1)(PROMPTS, timesteps=LCM4, generator=seeded_generators(0, 2),
                                                   output_type="latent").images
        assert torch.allclose(stock, outs[0], atol=1e-4)
    # 'ode' base steps: DDIM where its trailing grid is the recipe's timesteps, else Euler
    from stepdistill.pipelines.handoff import ode_base_scheduler

    assert ode_base_scheduler(dict(base.scheduler.config), LCM4)[0] == "DDIMScheduler"
    assert ode_base_scheduler(dict(base.scheduler.config), [999, 759, 499, 259])[0] == "EulerDiscreteScheduler"
    hybrid = PipelineSampler(base, {TEACHER: None, "student": (dist, None)}, main="student")
    spec = hybrid_recipe(hybrid, SamplerSpec(scheduler="LCMScheduler", timesteps=LCM4), base_scheduler="ode")
    images = hybrid(spec, Conditions(prompts=PROMPTS), [0, 1])
    assert torch.allclose(images, two.images(outs[0]), atol=1e-4) and "DDIM" in spec.label()


def test_incompatible_scheduler_pairs_are_refused(sd_folder):
    base, dist = _pipe(sd_folder), _pipe(sd_folder, lora_seed=1)
    cases = {
        "karras": (_pipe(sd_folder, "EulerDiscreteScheduler", use_karras_sigmas=True), dist, "cannot run"),
        "schedule": (_pipe(sd_folder, beta_schedule="linear"), dist, "different noise schedules"),
        "ddim": (base, _pipe(sd_folder, "DDIMScheduler", lora_seed=1), "custom timesteps"),
        "leading": (_pipe(sd_folder, "DDIMScheduler"), dist, "grid is not"),
    }
    for name, (b, d, match) in cases.items():
        with pytest.raises(UsageError, match=match):
            HybridPipeline(b, d, 1)(PROMPTS, timesteps=LCM4, generator=seeded_generators(0, 2), output_type="latent")
    # a sigma-scaled scheduler off the discrete schedule (Karras sigmas on its own grid) has no exact conversion
    from diffusers import EulerDiscreteScheduler

    from stepdistill.pipelines.handoff import latent_scale, schedule_of

    karras = EulerDiscreteScheduler.from_config({**base.scheduler.config, "use_karras_sigmas": True})
    karras.set_timesteps(4)
    with pytest.raises(UsageError, match="cannot be converted"):
        latent_scale(karras, 1, schedule_of(base.scheduler))


def test_class_conditional_hybrid_matches_the_denoiser_path(tmp_path):
    """digits shape: two ClassConditionalPipelines through HybridPipeline = the hybrid plan over Denoisers."""
    from diffusers import LCMScheduler

    from stepdistill.denoisers import Denoiser
    from stepdistill.lora import add_lora
    from stepdistill.pipelines import load_teacher
    from stepdistill.pipelines.class_conditional import ClassConditionalPipeline
    from test_eval_samplers import _tiny_unet2d

    folder = _tiny_unet2d(tmp_path / "unet")
    base, dist = (ClassConditionalPipeline.from_pretrained(folder) for _ in range(2))
    torch.manual_seed(2)
    add_lora(dist.unet, "student", 4, init=False)
    for p in (base, dist):
        p.scheduler = LCMScheduler.from_config(p.scheduler.config)
    log = CallLog(base=base.unet, distilled=dist.unet)
    x = HybridPipeline(base, dist, 1)([3, 7], timesteps=LCM4, generator=seeded_generators(0, 2),
                                      output_type="pt").images
    log.close()
    assert log.timesteps("base") == [999] and log.timesteps("distilled") == [749, 499, 249]
    teacher = load_teacher(str(folder)).sampler  # the same weights as `base`, through pipelines.sample
    student = Denoiser(dist.unet, teacher.denoiser.schedule, teacher.denoiser.prediction_type)
    both = DenoiserSampler({TEACHER: teacher.denoiser, "student": student}, teacher.scheduler_config(), teacher.shape,
                           teacher.conditioner, main="student")
    spec = _hybrid(both, SamplerSpec(scheduler="LCMScheduler", timesteps=LCM4))
    y = both(spec, Conditions(torch.tensor([3, 7])), [0, 1])
    assert torch.allclose(x, y, atol=1e-5)


def test_x0_grid_has_one_column_per_step(sd_folder, tmp_path):
    from PIL import Image

    from stepdistill.eval.trajectory import feature_distances, save_x0_grid, settle_step, trace

    base, dist = _pipe(sd_folder), _pipe(sd_folder, lora_seed=1)
    hybrid = PipelineSampler(base, {TEACHER: None, "student": (dist, None)}, main="student")
    spec = _hybrid(hybrid, SamplerSpec(scheduler="LCMScheduler", timesteps=LCM4))
    conds = Conditions(prompts=PROMPTS)
    traj = trace(hybrid, spec, conds, [0, 1])
    assert traj.timesteps == LCM4 and traj.models == [TEACHER, "student", "student", "student"]
    assert torch.allclose(traj.final, hybrid(spec, conds, [0, 1]), atol=1e-5)  # traced = the stock pipelines' images
    assert torch.allclose(traj.x0[-1], traj.final, atol=1e-5)  # LCM's last step returns its x0
    path = save_x0_grid(traj, tmp_path / "x0.png", scale=2)
    w, h = Image.open(path).size
    side = 16 * 2 + 2  # 16x16 images, scale 2, 2-pixel padding
    assert (w, h) == (4 * side + 2, 2 * side + 2)
    flat = lambda x: x.flatten(1)  # noqa: E731
    d = feature_distances(traj, flat)
    assert len(d) == 4 and d[-1] < 1e-6 and settle_step(d) is not None
    assert settle_step([0.5, 0.2, 0.01, 0.0]) == 3 and settle_step([0.01, 0.2, 0.0]) == 3
    assert settle_step([0.01, 0.3]) is None


def test_eval_cli_hybrid_row_with_x0_grid(sd_folder, tmp_path):
    """`stepdistill eval --run RUN --hybrid-base-steps 1`: a student row and a hybrid row (base + distilled
    calls counted together), each with an x0 grid in the report."""
    from stepdistill.cli import main
    from stepdistill.eval.report import load_report
    from stepdistill.lora import save_diffusers_lora

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "dmd"}, "model": {"pretrained": str(sd_folder)},
                                                     "data": {"name": "digits_sd"}}))
    save_diffusers_lora(_pipe(sd_folder, lora_seed=1).unet, "student", run / "student")
    SamplerSpec(scheduler="LCMScheduler", timesteps=LCM4, guidance_scale=1.0).save(run / "student")
    out = tmp_path / "rep"
    assert main(["eval", "--run", str(run), "--hybrid-base-steps", "1", "--hybrid-base-guidance", "2",
                 "--num-samples", "4", "--batch-size", "4", "--no-speed", "--x0-grids", "3", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    student, hybrid = load_report(out / "report.json").rows
    assert student.nfe == 4 and hybrid.method == "hybrid" and hybrid.nfe == 5  # base step with CFG counts twice
    assert hybrid.x0_models == [TEACHER, "student", "student", "student"] and len(hybrid.x0_distance) == 4
    assert (out / student.x0_grid).exists() and (out / hybrid.x0_grid).exists()
    assert "x0 at every step" in (out / "report.html").read_text()
    # `stepdistill sample --run RUN --hybrid-base-steps 1 --x0-grid`
    from PIL import Image

    samples = tmp_path / "samples"
    assert main(["sample", "--run", str(run), "--hybrid-base-steps", "1", "--labels", "3,7", "--num", "2",
                 "--x0-grid", "--out", str(samples)]) == 0
    assert len(list(samples.glob("0000*.png"))) == 4
    assert Image.open(samples / "x0_grid.png").size == (4 * (16 * 4 + 2) + 2, 2 * (16 * 4 + 2) + 2)


def test_bold_control_lora_trains_and_stacks_with_the_student(sd_folder, tmp_path):
    """The denoising trainer's control LoRA (dilated digits) loads beside a student LoRA; set_adapters stacks
    them: both on differs from either alone, and the control at weight 0 is the student alone."""
    from stepdistill.config import load_config
    from stepdistill.data.digits import load_digits_tensor, dilate_strokes
    from stepdistill.eval.control import control, control_effect, load_control, mean_ink
    from stepdistill.lora import save_diffusers_lora
    from stepdistill.trainers import Trainer, method_class
    from conftest import ROOT

    x, _ = load_digits_tensor(16, "train")
    assert mean_ink(dilate_strokes(x, 1)[:200] / 2 + 0.5).mean() > mean_ink(x[:200] / 2 + 0.5).mean() + 0.1
    cfg = load_config(ROOT / "configs/digits_sd/control_bold_lora.yaml",
                      [f"model.pretrained={sd_folder}", "train.steps=2", "train.batch_size=4", "train.log_with=none",
                       "method.lora.rank=2", "method.lora.alpha=2", "train.num_threads=1"])
    assert cfg.data.dilate == 1 and cfg.method.lora is not None
    Trainer(cfg, method_class("denoising"), tmp_path / "ctrl", show_progress=False).fit()
    lora = tmp_path / "ctrl" / "export"
    assert (lora / "pytorch_lora_weights.safetensors").exists()
    # a stand-in control with visible weights, in the same format, so that stacking is not vacuous
    strong = tmp_path / "strong"
    save_diffusers_lora(_pipe(sd_folder, lora_seed=5).unet, "student", strong)
    student_dir = tmp_path / "student"
    save_diffusers_lora(_pipe(sd_folder, lora_seed=1).unet, "student", student_dir)
    pipe = _pipe(sd_folder)
    pipe.load_lora_weights(student_dir, adapter_name="student")
    sampler = PipelineSampler(pipe, {TEACHER: None, "student": "student"}, main="student")
    load_control(sampler, lora)  # the trained one loads as an adapter ...
    pipe.delete_adapters("control")
    load_control(sampler, strong)  # ... and the stand-in is what we measure
    assert sorted(pipe.unet.peft_config) == ["control", "student"]
    spec = SamplerSpec(scheduler="LCMScheduler", timesteps=LCM4)
    conds = Conditions(prompts=PROMPTS)
    alone = sampler(spec, conds, [0, 1])
    with control(sampler, 0.0):
        assert torch.allclose(sampler(spec, conds, [0, 1]), alone, atol=1e-6)
    with control(sampler, 1.0):
        both = sampler(spec, conds, [0, 1])
        assert pipe.get_active_adapters() == ["student", "control"]
    assert (both - alone).abs().max() > 1e-3
    assert torch.allclose(sampler(spec, conds, [0, 1]), alone, atol=1e-6)  # restored
    eff = control_effect("student", sampler, spec, conds, [0, 1])
    assert eff.off == pytest.approx(float(mean_ink(alone).mean()), abs=1e-6)
    assert eff.on == pytest.approx(float(mean_ink(both).mean()), abs=1e-6)
