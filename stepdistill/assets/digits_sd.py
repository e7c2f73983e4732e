"""Build recipe of the ``digits-sd`` asset: a tiny text-to-image Stable Diffusion on the digits, opened by a
stock ``StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)``.

Three pretrain configs run in order, as SD was made: the autoencoder (``configs/digits_sd/vae.yaml``), the
CLIP text encoder and tokenizer (``clip_text.yaml``), then the UNet over both, frozen (``unet.yaml``); the
UNet run's export is the pipeline folder. Measured: prompt accuracy of DDIM-50 samples (the shipped digit
classifier must find the prompted digit), parameters and bytes per component.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .build import Builder

GUIDANCE = 3.0  # classifier-free guidance of the recorded accuracy and the benchmark's default
SAMPLE_SEED = 1234
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def build(b: Builder) -> dict:
    vae_cfg, text_cfg, unet_cfg = b.spec.configs
    vae = b.pretrain(vae_cfg)
    text = b.pretrain(text_cfg)
    unet = b.pretrain(unet_cfg, [f"model.components.vae={vae}", f"model.components.text_encoder={text}",
                                 f"model.components.tokenizer={text}"])
    b.install(unet)
    # ship the tokenizer as SD1.5's own folder does (vocab.json + merges.txt + tokenizer_config.json): the
    # fast tokenizer is rebuilt from them on load, and the verbose tokenizer.json would add 0.6 MB
    (b.out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    return measure(b.out, b.asset("digits-classifier"))


def measure(folder: Path, classifier_folder: Path, guidance: float = GUIDANCE, per_digit: int = 50) -> dict:
    """asset.json metrics of a digits-sd folder: prompt accuracy at DDIM-50 (and without guidance), sizes."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..classifier import load_classifier

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    clf = load_classifier(classifier_folder)
    folder = Path(folder)
    return {
        "guidance_scale": guidance,
        "prediction_type": pipe.scheduler.config.prediction_type,
        f"ddim50_guidance{guidance:g}": prompt_accuracy(pipe, clf, per_digit=per_digit, guidance=guidance),
        "ddim50_guidance1": prompt_accuracy(pipe, clf, per_digit=per_digit // 5, guidance=1.0),
        "num_parameters": {c: sum(p.numel() for p in getattr(pipe, c).parameters())
                           for c in ("unet", "vae", "text_encoder")},
        "vocab_size": len(pipe.tokenizer), "max_length": pipe.tokenizer.model_max_length,
        "latent_shape": [pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size],
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
        "component_bytes": {c: sum(f.stat().st_size for f in (folder / c).rglob("*") if f.is_file())
                            for c in COMPONENTS if (folder / c).is_dir()},
    }


@torch.no_grad()
def prompt_accuracy(pipe, classifier, per_digit: int = 50, steps: int = 50, guidance: float = GUIDANCE,
                    seed: int = SAMPLE_SEED, templates=None) -> dict:
    """Share of text-to-image samples the classifier assigns to the digit their prompt names. Sample i asks
    for digit i mod 10 with template (i div 10) mod T (every template used) and has its own seed."""
    from ..data.prompts import TEMPLATES, digit_prompt
    from ..pipelines import seeded_generators

    templates = list(templates or TEMPLATES)
    n = 10 * per_digit
    labels = torch.arange(n) % 10
    prompts = [digit_prompt(int(y), templates[(i // 10) % len(templates)]) for i, y in enumerate(labels.tolist())]
    gens = seeded_generators(seed, n)
    t0 = time.time()
    images = torch.cat([pipe(prompts[i:i + 250], num_inference_steps=steps, guidance_scale=guidance,
                             generator=gens[i:i + 250], output_type="pt").images for i in range(0, n, 250)])
    seconds = time.time() - t0
    hit = (classifier.predict(images * 2 - 1).cpu() == labels).double()
    per = hit.view(per_digit, 10).mean(0)
    per_template = [round(float(hit[torch.arange(n) // 10 % len(templates) == k].mean()), 4)
                    for k in range(len(templates))]
    return {"accuracy": round(float(hit.mean()), 4), "worst_digit": int(per.argmin()),
            "worst_digit_accuracy": round(float(per.min()), 4), "per_template": per_template, "samples": n,
            "steps": steps, "guidance": guidance, "seed": seed, "seconds": round(seconds, 1)}
