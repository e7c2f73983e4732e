"""The shipped digits teacher: a stock UNet2DModel folder, loadable as a model bundle via 'asset:', whose
small seeded DDIM sample the shipped classifier reads as the asked-for digits."""

import torch

from stepdistill import assets
from stepdistill.classifier import load_classifier
from stepdistill.config import ModelConfig, validate
from stepdistill.models import load_bundle
from stepdistill.pipelines import seeded_generators


def test_teacher_loads_with_stock_diffusers():
    from diffusers import DDIMScheduler, UNet2DModel

    folder = assets.path("digits-teacher")
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 16 and unet.config.in_channels == 1
    sched = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction" and sched.config.num_train_timesteps == 1000
    metrics = assets.read_manifest(folder)["metrics"]
    assert metrics["ddim50_guidance1"]["accuracy"] >= 0.97


def test_teacher_bundle_from_asset_samples_the_right_digits():
    from diffusers import DDIMScheduler

    from stepdistill.pipelines import sample

    bundle = load_bundle(ModelConfig(pretrained="asset:digits-teacher"))
    assert bundle.kind == "unet2d" and bundle.sample_shape == (1, 16, 16) and bundle.prediction_type == "v_prediction"
    assert validate({"method": {"name": "denoising"}, "model": {"pretrained": "asset:digits-teacher"},
                     "data": {"name": "digits"}}).model.pretrained == "asset:digits-teacher"
    labels = torch.arange(10).repeat(2)
    cond = bundle.conditioner.encode(labels)
    scheduler = DDIMScheduler.from_config(bundle.scheduler_config)
    x = sample(bundle.teacher, scheduler, (20, *bundle.sample_shape), cond, num_inference_steps=10,
               generator=seeded_generators(0, 20))
    hit = (load_classifier().predict(x) == labels).float().mean()
    assert hit >= 0.9, f"teacher sample accuracy {hit:.2f}"
