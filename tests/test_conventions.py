"""Real-scale conventions: the unconditional branch of the stock pipelines, per-network precision (DMD2's fp32 fake
score), the DM loss's timestep range, and no third-party warnings a user cannot act on."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from stepdistill.config import ModelConfig, load_config
from stepdistill.errors import UsageError
from stepdistill.trainers import Trainer, method_class

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "", "a red boat"]  # the tiny tokenizer is character-level, 16 tokens long


# ---- the unconditional branch ------------------------------------------------------------------------------------
@pytest.mark.parametrize("zeros", [True, False], ids=["force_zeros", "empty_prompt"])
def test_sdxl_unconditional_branch_is_the_stock_pipelines(tmp_path, zeros):
    """SDXL's unconditional branch is what StableDiffusionXLPipeline.encode_prompt gives for negative_prompt=None:
    zeros (hidden states and pooled) under its force_zeros_for_empty_prompt config, the empty prompt's encoding
    without it; the added time ids are the conditional ones in both."""
    from diffusers import StableDiffusionXLPipeline

    from stepdistill.models import bundle_from_pipeline, load_bundle
    from stepdistill.testing import tiny_sd_pipeline

    path = tiny_sd_pipeline(tmp_path / "sdxl", sdxl=True)
    index = json.loads((path / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True  # what the stock pipeline saves (SDXL base too)
    if not zeros:
        (path / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    assert pipe.config.force_zeros_for_empty_prompt is zeros
    res = pipe.default_sample_size * pipe.vae_scale_factor
    time_ids = pipe._get_add_time_ids((res, res), (0, 0), (res, res), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    # the conditioner encodes (and caches) prompt by prompt: compare with the stock encoding of each prompt alone
    # (a batch changes the pooled projection's last bits on CPU)
    stock = [pipe.encode_prompt([p], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                negative_prompt=None) for p in PROMPTS]
    pos, neg, pos_pooled, neg_pooled = (torch.cat(parts) for parts in zip(*stock))
    assert bool(neg.abs().max() == 0) is zeros and bool(neg_pooled.abs().max() == 0) is zeros

    for bundle in (load_bundle(ModelConfig(pretrained=str(path))), bundle_from_pipeline(pipe)):
        cond = bundle.conditioner.encode(prompts=PROMPTS)
        assert torch.equal(cond.kwargs["encoder_hidden_states"], pos)
        assert torch.equal(cond.kwargs["added_cond_kwargs"]["text_embeds"], pos_pooled)
        assert torch.equal(cond.null["encoder_hidden_states"], neg)
        assert torch.equal(cond.null["added_cond_kwargs"]["text_embeds"], neg_pooled)
        for branch in (cond.kwargs, cond.null):
            assert torch.equal(branch["added_cond_kwargs"]["time_ids"], time_ids.repeat(len(PROMPTS), 1))


def test_sd15_unconditional_branch_is_the_empty_prompt(tmp_path):
    """StableDiffusionPipeline has no force_zeros option: its negative for negative_prompt=None is the "" encoding,
    and so is the conditioner's unconditional branch."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.models import load_bundle
    from stepdistill.testing import tiny_sd_pipeline

    path = tiny_sd_pipeline(tmp_path / "sd15")
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pos, neg = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt=None)
    empty, _ = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(neg, empty.expand_as(neg)) and neg.abs().max() > 0
    cond = load_bundle(ModelConfig(pretrained=str(path))).conditioner.encode(prompts=PROMPTS)
    assert torch.equal(cond.kwargs["encoder_hidden_states"], pos)
    assert torch.equal(cond.null["encoder_hidden_states"], neg)


# ---- precision per network -----------------------------------------------------------------------------------------
def _built(cfg) -> Trainer:
    """A Trainer with its method and networks built (no step)."""
    t = Trainer(cfg, method_class(cfg.method.name), None, show_progress=False)
    t._setup_accelerator()
    t.ctx = t._setup_context()
    t.method = t.method_cls(cfg, t.ctx)
    t._setup_networks()
    return t


def _toy(name: str, *overrides: str):
    return load_config(ROOT / f"configs/toy2d/{name}.yaml", ["method.regression=null", "train.steps=4",
                                                            "train.log_with=none", *overrides])


def test_precision_per_network_names_are_checked_when_the_method_is_built():
    with pytest.raises(UsageError) as e:
        _built(_toy("dmd", "method.gan=null", "train.precision_per_network={fake: fp32}"))
    msg = str(e.value)
    assert "\n" not in msg and "'fake'" in msg and "its networks: fake_score, student" in msg
    with pytest.raises(UsageError, match=r"'gan_head' has no denoiser"):  # a network that runs through no Denoiser
        _built(_toy("dmd", "train.precision_per_network={gan_head: fp32}"))
    with pytest.raises(UsageError, match=r"precision_per_network\.fake_score"):  # values are typed
        _toy("dmd", "train.precision_per_network={fake_score: fp64}")


def test_precision_per_network_group_sets_every_phase_fake_score():
    """Phased DMD names its fake scores fake_score_k; the group key fake_score sets them all, a network's own key
    wins over its group's."""
    t = _built(_toy("phased_dmd", "train.precision_per_network={fake_score: fp32, fake_score_1: bf16}"))
    views = t.method.network_denoisers()
    K = len(t.method.fakes)
    assert K > 2 and set(views) == {f"expert_{k}" for k in range(K)} | {f"fake_score_{k}" for k in range(K)}
    assert [views[f"fake_score_{k}"].precision for k in range(K)] == ["fp32", "bf16"] + ["fp32"] * (K - 2)
    assert all(views[f"expert_{k}"].precision is None for k in range(K))


@pytest.mark.parametrize("fake_fp32", [True, False], ids=["fake_fp32", "recipe_without"])
def test_fake_score_runs_fp32_inside_a_bf16_step(tmp_path, monkeypatch, fake_fp32):
    """The SD1.5 DMD2 recipe (precision_per_network {fake_score: fp32}) under bf16 autocast on CPU: the fake score's
    forward passes return fp32 and the DM gradient gets an fp32 fake x0, while the student and the teacher (the same
    shared base, other adapter selections) run bf16. Without the entry the fake score runs bf16 too."""
    from stepdistill import losses as L
    from stepdistill.lora import _tuner_layers
    from stepdistill.testing import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "base")
    overrides = [f"model.pretrained={base}", "train.steps=2", "train.batch_size=2", "train.precision=bf16",
                 "train.log_with=none", "method.student.lora.rank=4", "method.fake_score.lora.rank=4",
                 "method.student_every=1", f"data.file={ROOT / 'configs/prompts/coco_style.txt'}"]
    cfg = load_config(ROOT / "configs/sd15/dmd2_lora.yaml",
                      overrides + ([] if fake_fp32 else ["train.precision_per_network={}"]))
    assert cfg.train.precision_per_network == ({"fake_score": "fp32"} if fake_fp32 else {})

    seen: dict[str, set] = {}  # active adapter ("off": teacher) -> output dtypes of the shared UNet
    setup = Trainer._setup_networks

    def instrumented(self):
        setup(self)
        layer = _tuner_layers(self.method.fake.module)[0]

        def hook(module, args, out):
            who = "off" if layer.disable_adapters else "+".join(layer.active_adapters)
            seen.setdefault(who, set()).add(out.sample.dtype)

        self.method.fake.module.register_forward_hook(hook)

    grads = []
    dmd_gradient = L.dmd_gradient
    monkeypatch.setattr(Trainer, "_setup_networks", instrumented)
    monkeypatch.setattr(L, "dmd_gradient", lambda x, r, f: grads.append(f.dtype) or dmd_gradient(x, r, f))
    Trainer(cfg, method_class("dmd"), tmp_path / "run", show_progress=False).fit()

    assert seen["fake"] == ({torch.float32} if fake_fp32 else {torch.bfloat16})
    assert seen["student"] == {torch.bfloat16} and seen["off"] == {torch.bfloat16}
    assert grads and (set(grads) == {torch.float32} if fake_fp32 else True)


# ---- the DM loss's timestep range ----------------------------------------------------------------------------------
def test_max_t_one_never_draws_timestep_T():
    from stepdistill.schedules import NoiseSchedule
    from stepdistill.trainers.dmd_terms import noised

    t = _built(_toy("dmd", "method.gan=null", "method.min_t=0.0", "method.max_t=1.0"))
    sch = t.method.bundle.schedule
    T = sch.num_train_timesteps
    assert t.method.t_range == (0, T - 1)
    _, ts, _ = noised(sch, torch.zeros(20000, 2), t.method.t_range, t.ctx)
    assert int(ts.max()) == T - 1 and int(ts.min()) == 0  # the whole range, T excluded
    sch = NoiseSchedule(torch.linspace(0.999, 0.001, 1000))
    assert sch.timestep_range(0.02, 0.9999) == (20, 999) and sch.timestep_range(0.02, 0.98) == (20, 980)
    with pytest.raises(ValueError, match="leaves"):
        noised(sch, torch.zeros(4, 2), (0, 1000), t.ctx)


# ---- third-party noise ---------------------------------------------------------------------------------------------
def test_shared_base_run_and_student_load_are_quiet(tmp_path, recwarn):
    """A shared-base DMD run adds several peft adapters to one UNet on purpose: no peft "multiple adapters" warning.
    Loading its UNet-only LoRA as a second adapter of a pipeline: neither that warning nor Diffusers' "No LoRA keys
    associated to CLIPTextModel" (which the stock load_lora_weights of the same file logs)."""
    from diffusers import StableDiffusionPipeline

    from stepdistill import assets
    from stepdistill.pipelines.loading import load_student

    cfg = load_config(ROOT / "configs/digits_sd/dmd_lora.yaml",
                      ["train.steps=1", "train.batch_size=2", "method.regression=null", "method.student_every=1",
                       "train.log_with=none", "method.student.lora.rank=2", "method.fake_score.lora.rank=2",
                       "train.ema.decay=null"])
    run = tmp_path / "run"
    Trainer(cfg, method_class("dmd"), run, show_progress=False).fit()
    assert not [w for w in recwarn if "peft_config" in str(w.message)]

    class Records(logging.Handler):  # the suite runs with -p no:logging (no caplog)
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    diffusers_logger = logging.getLogger("diffusers")  # Diffusers' loggers do not propagate to the root logger
    stock, ours = Records(), Records()
    pipe = StableDiffusionPipeline.from_pretrained(assets.path("digits-sd"), safety_checker=None)
    try:
        diffusers_logger.addHandler(stock)
        pipe.load_lora_weights(run / "student", adapter_name="first")
        diffusers_logger.removeHandler(stock)
        recwarn.clear()
        diffusers_logger.addHandler(ours)
        load_student(run / "student", pipe=pipe)  # the second adapter of this UNet
    finally:
        diffusers_logger.removeHandler(stock)
        diffusers_logger.removeHandler(ours)
    assert set(pipe.unet.peft_config) == {"first", "student"}
    no_keys = re.compile("No LoRA keys associated to CLIPTextModel")
    assert any(no_keys.search(m) for m in stock.messages)  # the capture sees it where nothing filters it
    assert not any(no_keys.search(m) for m in ours.messages)
    assert not [w for w in recwarn if "peft_config" in str(w.message)]
