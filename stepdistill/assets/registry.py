"""Which pretrain configs build which shipped asset. One :class:`AssetSpec` per asset.

Adding an asset:
1. Write its pretrain config(s) under ``configs/`` (first line: the command that runs it).
2. Write a recipe ``build(b: Builder) -> dict``: call ``b.pretrain(config)`` for each config in order (each
   returns that run's ``export/`` folder; a later config can point at an earlier export through an override,
   e.g. ``b.pretrain("configs/x/unet.yaml", [f"model.components.vae={vae}"])``), put the deliverable into
   ``b.out`` with ``b.install(export, subfolder)`` or by saving there, then measure it and return the
   metrics (they land in ``asset.json``). ``b.asset(name)`` opens another asset of the same root (e.g. the
   classifier that scores samples); list such dependencies in ``requires``.
3. Add a line below. ``stepdistill assets build NAME`` runs it and writes the folder, ``asset.json`` and
   file hashes; all assets together must stay under ``assets.BUDGET_BYTES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class AssetSpec:
    name: str
    description: str
    configs: tuple[str, ...]  # pretrain configs the recipe runs, in order (repository-relative)
    recipe: str | Callable  # "module:function" (or the function) taking a build.Builder, returning metrics
    requires: tuple[str, ...] = ()  # assets that must exist before this one is built


ASSETS: dict[str, AssetSpec] = {s.name: s for s in [
    AssetSpec("toy2d-mlp", "toy2d MLP denoiser (init network for toy students and fake scores)",
              ("configs/toy2d/mlp.yaml",), "stepdistill.assets.recipes:toy2d_mlp"),
    AssetSpec("digits-classifier", "digit classifier: sample accuracy and the FID feature space of digits(-sd)",
              ("configs/digits/classifier.yaml",), "stepdistill.assets.recipes:digits_classifier"),
    AssetSpec("digits-teacher", "class-conditional UNet2DModel teacher for digits (ClassConditionalPipeline)",
              ("configs/digits/teacher.yaml",), "stepdistill.assets.recipes:digits_teacher",
              requires=("digits-classifier",)),
    AssetSpec("digits-clip", "small open_clip CLIP on digits-sd images and prompts: offline CLIP score",
              ("configs/digits/clip.yaml",), "stepdistill.eval.digits_clip:build"),
    AssetSpec("digits-sd", "tiny text-to-image Stable Diffusion on the digits (stock StableDiffusionPipeline)",
              ("configs/digits_sd/vae.yaml", "configs/digits_sd/clip_text.yaml", "configs/digits_sd/unet.yaml"),
              "stepdistill.assets.digits_sd:build", requires=("digits-classifier",)),
]}


def spec(name: str) -> AssetSpec:
    from ..errors import UsageError

    if name not in ASSETS:
        raise UsageError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]
