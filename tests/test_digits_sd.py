"""digits-sd: CLIP's BPE tokenizer built offline, the digit prompts, DigitsSDSource, the vae / clip_text
pretrain methods chained into a UNet pretraining whose export a stock StableDiffusionPipeline opens
(tiny models built in code), and the shipped asset itself."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stepdistill.config import DigitsSDData, validate
from stepdistill.data.digits import DigitsSDSource
from stepdistill.data.prompts import DIGIT_WORDS, TEMPLATES, check_templates, digit_prompt, prompt_to_digit
from stepdistill.errors import UsageError
from stepdistill.tokenizer import build_clip_tokenizer, clip_bpe
from stepdistill.trainers import Trainer, method_class


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a shared, loaded CPU two OpenMP threads per
    process made these tests up to 100x slower (measured: 10 DDIM-20 samples, 103 s vs 1 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer(8192, 16)


def test_tokenizer_round_trips_prompts(tokenizer):
    for d in range(10):
        for t in TEMPLATES:
            p = digit_prompt(d, t)
            ids = tokenizer(p, padding="max_length", max_length=16).input_ids
            assert ids[0] == tokenizer.bos_token_id and len(ids) == 16
            assert tokenizer.decode(ids, skip_special_tokens=True) == p
    assert tokenizer("").input_ids == [tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == len(tokenizer) - 1


def test_tokenizer_keeps_digit_words_whole_with_clips_ids(tokenizer):
    full, _ = clip_bpe()  # CLIP's whole vocabulary: a kept token has the same id in both
    for w in DIGIT_WORDS + ("the", "number", "photo", "of", "a"):
        toks = tokenizer.tokenize(w)
        assert toks == [w + "</w>"]
        assert tokenizer.convert_tokens_to_ids(toks)[0] == full[w + "</w>"]
    assert tokenizer.tokenize("handwritten") == ["hand", "written</w>"]


def test_tokenizer_folder_has_slow_files(tmp_path):
    from transformers import CLIPTokenizer

    build_clip_tokenizer(64, 8, folder=tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in tmp_path.iterdir()}
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == 512 + 64 + 2
    assert len((tmp_path / "merges.txt").read_text().strip().splitlines()) == 1 + 64
    assert CLIPTokenizer.from_pretrained(tmp_path).model_max_length == 8


def test_prompt_to_digit_inverts_every_template():
    for t in TEMPLATES:
        assert [prompt_to_digit(digit_prompt(d, t)) for d in range(10)] == list(range(10))
    assert prompt_to_digit("") is None
    assert prompt_to_digit("a 3 and a seven") is None
    with pytest.raises(UsageError, match="template"):
        check_templates(["a digit"])


def test_digits_sd_source_latents_prompts_and_empty_share():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16).eval()
    bundle = SimpleNamespace(vae=vae, vae_scaling=0.5)
    src = DigitsSDSource(DigitsSDData(empty_prompt_prob=0.2, split="heldout"), bundle)
    s = src.sample(2000, torch.Generator().manual_seed(0))
    assert s.x0.shape == (2000, 4, 8, 8) and s.labels.shape == (2000,)
    empty = sum(p == "" for p in s.prompts) / 2000
    assert 0.17 < empty < 0.23
    named = [(prompt_to_digit(p), int(y)) for p, y in zip(s.prompts, s.labels) if p]
    assert all(d == y for d, y in named)
    again = src.sample(2000, torch.Generator().manual_seed(0))
    assert torch.equal(s.x0, again.x0) and s.prompts == again.prompts  # randomness only from the generator
    cond = src.conditions(500, torch.Generator().manual_seed(1))
    assert cond.x0 is None and all(prompt_to_digit(p) == int(y) for p, y in zip(cond.prompts, cond.labels))


def test_digits_sd_source_without_vae_gives_rgb_images():
    s = DigitsSDSource(DigitsSDData(channels=3), None).sample(4, torch.Generator().manual_seed(0))
    assert s.x0.shape == (4, 3, 16, 16) and float(s.x0.min()) >= -1 and float(s.x0.max()) <= 1
    assert torch.equal(s.x0[:, 0], s.x0[:, 2])


TRAIN = {"steps": 2, "batch_size": 16, "log_with": "none", "checkpoint_every": 100, "log_every": 1}


def _fit(raw: dict, run_dir: Path) -> Path:
    cfg = validate(raw)
    return Trainer(cfg, method_class(cfg.method.name), run_dir, show_progress=False).fit()


def test_vae_clip_text_unet_chain_loads_in_stock_pipeline(tmp_path):
    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, TCDScheduler

    vae = _fit({"method": {"name": "vae"},
                "model": {"arch": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16],
                                       down_block_types=["DownEncoderBlock2D"] * 2,
                                       up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
                                       norm_num_groups=4, sample_size=16)},
                "data": {"name": "digits_sd", "empty_prompt_prob": 0.0, "split": "heldout"}, "train": TRAIN},
               tmp_path / "vae")
    scale = json.loads((vae / "vae" / "config.json").read_text())["scaling_factor"]
    assert scale > 0 and scale != 0.18215
    clip = _fit({"method": {"name": "clip_text", "num_merges": 8192, "max_length": 12},
                 "model": {"arch": {"projection_dim": 16,
                                    "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2),
                                    "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, patch_size=8)}},
                 "data": {"name": "digits_sd", "empty_prompt_prob": 0.0, "split": "heldout"}, "train": TRAIN},
                tmp_path / "clip")
    assert {"text_encoder", "tokenizer", "clip"} <= {p.name for p in clip.iterdir()}
    unet_arch = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4, norm_num_groups=8,
                     cross_attention_dim=16)
    out = _fit({"method": {"name": "denoising", "cond_dropout": 0.0},
                "model": {"kind": "sd", "arch": unet_arch,
                          "components": {"vae": str(vae), "text_encoder": str(clip), "tokenizer": str(clip)}},
                "data": {"name": "digits_sd", "split": "heldout"}, "train": TRAIN}, tmp_path / "unet")
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "tokenizer" / "merges.txt").exists()
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.tokenizer.model_max_length == 12 and pipe.vae.config.scaling_factor == scale
    pipe.set_progress_bar_config(disable=True)
    for sched in (DDIMScheduler, LCMScheduler, TCDScheduler):
        pipe.scheduler = sched.from_config(pipe.scheduler.config)
        img = pipe(["the number 3", "seven"], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()


def test_sd_from_arch_needs_components():
    from stepdistill.models import load_bundle

    cfg = validate({"method": {"name": "denoising"}, "model": {"kind": "sd", "arch": {"sample_size": 8}},
                    "data": {"name": "digits_sd"}})
    with pytest.raises(UsageError, match="model.components.vae"):
        load_bundle(cfg.model, cfg.data)


def test_clip_text_rejects_empty_prompts():
    cfg = validate({"method": {"name": "clip_text"}, "model": {"arch": {}},
                    "data": {"name": "digits_sd", "empty_prompt_prob": 0.1}})
    with pytest.raises(UsageError, match="empty_prompt_prob"):
        Trainer(cfg, method_class("clip_text"), None, show_progress=False).fit()


# ---- the shipped asset ------------------------------------------------------------------------------
def test_shipped_digits_sd_opens_offline_in_stock_pipeline_and_draws_the_prompted_digits():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from stepdistill import assets
    from stepdistill.classifier import load_classifier

    folder = assets.path("digits-sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.unet.config.sample_size == 8
    assert (folder / "tokenizer" / "vocab.json").exists() and (folder / "tokenizer" / "merges.txt").exists()
    metrics = assets.read_manifest(folder)["metrics"]
    guidance = metrics["guidance_scale"]
    assert metrics[f"ddim50_guidance{guidance:g}"]["accuracy"] >= 0.9
    prompts = [digit_prompt(d, TEMPLATES[d % len(TEMPLATES)]) for d in range(10)]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=guidance, output_type="pt",
                  generator=[torch.Generator().manual_seed(i) for i in range(10)]).images  # (10, 3, 16, 16) in [0, 1]
    hit = (load_classifier().predict(images * 2 - 1) == torch.arange(10)).float().mean()
    assert hit >= 0.9, f"digits-sd sample accuracy {hit:.2f}"


def test_shipped_digits_sd_loads_as_a_model_bundle():
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_bundle

    bundle = load_bundle(ModelConfig(pretrained="asset:digits-sd"))
    assert bundle.kind == "sd" and bundle.sample_shape == (4, 8, 8) and bundle.prediction_type == "epsilon"
    cond = bundle.conditioner.encode(prompts=["the number 3", ""])
    assert cond.kwargs["encoder_hidden_states"].shape == (2, 16, 64)
