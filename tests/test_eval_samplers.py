"""Samplers and loaders of stepdistill.pipelines: per-sample seeds (batch-invariant images), counted NFE, recipes
and students."""

import json

import pytest
import torch
import yaml

from stepdistill.errors import UsageError
from stepdistill.eval.speed import count_calls
from stepdistill.pipelines import load_teacher
from stepdistill.pipelines.loading import load_run as load_student
from stepdistill.pipelines.plan import SamplingRecipe as SamplerSpec
from stepdistill.pipelines.samplers import Conditions


def _draw(loaded, spec, conds, seeds, batch):
    out = [loaded.sampler(spec, conds.slice(i, i + batch), seeds[i:i + batch]) for i in range(0, len(seeds), batch)]
    return torch.cat(out)


def test_toy2d_teacher_is_batch_invariant_and_counts_nfe():
    teacher = load_teacher("toy2d")
    spec = SamplerSpec(scheduler="DDIMScheduler", num_inference_steps=4, eta=1.0)  # stochastic steps too
    seeds = list(range(6))
    whole = _draw(teacher, spec, Conditions(), seeds, 6)
    assert torch.equal(whole, _draw(teacher, spec, Conditions(), seeds, 2))
    with count_calls(teacher.sampler.net) as rows:
        teacher.sampler(spec, Conditions(), seeds)
    assert rows[0] / 6 == 4


def _tiny_unet2d(folder):
    from diffusers import DDIMScheduler, UNet2DModel

    from stepdistill.pipelines.class_conditional import ClassConditionalPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=11)
    sched = DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False)
    ClassConditionalPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder


def test_class_conditional_folder_cfg_doubles_nfe_and_is_batch_invariant(tmp_path):
    teacher = load_teacher(str(_tiny_unet2d(tmp_path / "unet")))
    conds = Conditions(torch.arange(4) % 10, None)
    spec = SamplerSpec(num_inference_steps=3, guidance_scale=2.0)
    with count_calls(teacher.sampler.net) as rows:
        a = teacher.sampler(spec, conds, [0, 1, 2, 3])
    assert rows[0] / 4 == 6 and a.shape == (4, 1, 8, 8) and 0 <= a.min() and a.max() <= 1
    assert torch.allclose(a, _draw(teacher, spec, conds, [0, 1, 2, 3], 1), atol=1e-5)


def test_sampler_spec_file_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        SamplerSpec.load(tmp_path / "sampling.json")
    (tmp_path / "sampling.json").write_text("{nope")
    with pytest.raises(UsageError, match="not valid JSON"):
        SamplerSpec.load(tmp_path / "sampling.json")
    (tmp_path / "sampling.json").write_text(json.dumps({"scheduler": "LCMScheduler"}))
    with pytest.raises(UsageError, match="num_inference_steps or timesteps"):
        SamplerSpec.load(tmp_path / "sampling.json")
    spec = SamplerSpec(scheduler="LCMScheduler", timesteps=[999, 499], guidance_scale=None, adapter="x")
    spec.save(tmp_path / "sampling.json")
    back = SamplerSpec.load(tmp_path / "sampling.json")
    assert back.steps == 2 and back.model_extra == {"adapter": "x"} and back.label() == "LCM-2"
    (tmp_path / "sampling.json").write_text(json.dumps({"segments": [{"network": "a", "timesteps": [999, 999]}]}))
    with pytest.raises(UsageError, match="strictly decreasing"):
        SamplerSpec.load(tmp_path / "sampling.json")


def toy_run(tmp_path, student: bool = True):
    """A hand-made toy2d run: config.yaml (a method this checkout need not know), a full MLP student and
    an LCM 2-step recipe."""
    from stepdistill.denoisers import MLP
    from stepdistill.models import save_mlp

    run = tmp_path / "toy-run"
    run.mkdir()
    cfg = {"method": {"name": "dmd"}, "model": {"pretrained": "toy2d", "init": None},
           "data": {"name": "toy2d"}, "train": {"steps": 10}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if student:
        torch.manual_seed(0)
        save_mlp(MLP(dim=2, hidden=16, depth=1), run / "student", "epsilon")
        SamplerSpec(scheduler="LCMScheduler", timesteps=[999, 499], num_inference_steps=None).save(
            run / "student" / "sampling.json")
    return run


def test_load_student_of_a_hand_made_run(tmp_path):
    st = load_student(toy_run(tmp_path))
    assert st.method == "dmd" and st.benchmark == "toy2d" and st.spec.steps == 2
    with count_calls(st.sampler.net) as rows:
        x = st.sampler(st.spec, Conditions(), [0, 1, 2])
    assert x.shape == (3, 2) and rows[0] == 6
    assert torch.equal(x[1:], st.sampler(st.spec, Conditions(), [1, 2]))


def test_run_without_student_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="has no student"):
        load_student(toy_run(tmp_path, student=False))
    with pytest.raises(UsageError, match="not found"):
        load_student(tmp_path / "nowhere")


def test_sd_lora_student_loads_into_the_stock_pipeline(tmp_path):
    """A Diffusers LoRA student over a tiny SD pipeline: load_lora_weights changes the images."""
    from stepdistill.lora import add_lora, save_diffusers_lora
    from stepdistill.testing import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path / "sd")
    run = tmp_path / "sd-run"
    (run / "student").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": {"name": "dmd"}, "model": {"pretrained": str(base)},
                                                     "data": {"name": "digits_sd"}}))
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    torch.manual_seed(1)
    add_lora(unet, "default", rank=4, init=False)
    save_diffusers_lora(unet, "default", run / "student")
    spec = SamplerSpec(scheduler="LCMScheduler", timesteps=[999, 499], guidance_scale=None)
    spec.save(run / "student" / "sampling.json")
    st = load_student(run)
    teacher = load_teacher(str(base))
    conds = Conditions(torch.tensor([3, 7]), ["a handwritten digit three", "the number 7"])
    x = st.sampler(st.spec, conds, [0, 1])
    y = teacher.sampler(st.spec, conds, [0, 1])
    assert x.shape == (2, 3, 16, 16) and st.benchmark == "digits-sd"
    assert (x - y).abs().max() > 1e-3
    assert torch.allclose(x[1:], st.sampler(st.spec, conds.slice(1, 2), [1]), atol=1e-5)
