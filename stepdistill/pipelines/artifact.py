"""The student artifact, ``RUN/student/``: its networks and ``sampling.json`` (the plan, ``pipelines.plan``).

One network (``student``) lives in the folder itself, as it always has: a Diffusers-format LoRA
(``pytorch_lora_weights.safetensors``, what a stock pipeline's ``load_lora_weights`` takes), a peft LoRA for
networks without a Diffusers loader (pixel UNets, toy MLPs), a full ``unet/``, a class-conditional pipeline
folder or a toy MLP folder. Several networks (experts, students of a router) each get a subfolder named after
them, in the same formats; ``sampling.json`` lists them under ``networks`` and says which runs when. Every
trainer exports through :func:`export_student`; :func:`~stepdistill.pipelines.loading.load_student` reads it.
Also here: saving a full network of a bundle's family in its deployable format (:func:`save_network`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .plan import NetworkEntry, SamplingRecipe

__all__ = ["export_student", "save_network", "sd_pipeline"]


def export_student(bundle, networks: Mapping[str, Any], out_dir: Path, recipe: SamplingRecipe,
                   alternatives: Mapping[str, SamplingRecipe] | None = None, whole_pipelines: bool = False) -> Path:
    """Write each network (an object with ``module``, ``adapter`` -- a LoRA adapter of ``module``, or None for
    the whole module -- and ``denoiser.prediction_type``) and the recipe; ``alternatives`` (file name -> recipe)
    are other ways to sample the same networks, written beside it. A whole Stable Diffusion UNet is written as
    ``unet/``, or with ``whole_pipelines`` (a new base model, e.g. a pretrained teacher) as a full pipeline."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    single = list(networks) == ["student"]
    table: dict[str, NetworkEntry] = {}
    for name, net in networks.items():
        rel = "." if single else name
        pred = net.denoiser.prediction_type
        fmt = _save(bundle, net.module, net.adapter, out_dir / rel, pred, whole_pipelines)
        table[name] = NetworkEntry(format=fmt, path=rel, prediction_type=pred)
    main = table[next(iter(table))]
    update = {"networks": table, "format": main.format, "prediction_type": main.prediction_type,
              "base": bundle.source}
    path = recipe.model_copy(update=update).save(out_dir)
    for file_name, alt in (alternatives or {}).items():
        if file_name == path.name or not file_name.endswith(".json"):
            raise ValueError(f"alternative recipe file {file_name!r} must be a .json name other than {path.name}")
        alt.model_copy(update=update).save(out_dir / file_name)
    return out_dir


def _save(bundle, module: nn.Module, adapter: str | None, out_dir: Path, prediction_type: str,
          whole_pipelines: bool) -> str:
    """Write one network; returns its format name."""
    from ..lora import save_diffusers_lora, save_peft_lora

    out_dir.mkdir(parents=True, exist_ok=True)
    if adapter is not None:
        if bundle.kind in ("sd", "sdxl"):
            from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

            pipeline_cls = StableDiffusionXLPipeline if bundle.kind == "sdxl" else StableDiffusionPipeline
            save_diffusers_lora(module, adapter, out_dir, pipeline_cls=pipeline_cls)
            return "lora"
        save_peft_lora(module, adapter, out_dir)
        return "peft_lora"
    if bundle.kind in ("sd", "sdxl") and not whole_pipelines:
        module.save_pretrained(out_dir / "unet")
        return "unet"
    save_network(bundle, module, out_dir, prediction_type)
    return "mlp" if bundle.kind == "mlp" else "pipeline"


def save_network(bundle, net: nn.Module, out_dir: Path, prediction_type: str | None = None) -> None:
    """Write ``net`` (a full network of the bundle's family) as a loadable folder: toy MLP folder,
    a UNet2DModel pipeline folder (``unet/`` + ``scheduler/``), or a full Stable Diffusion pipeline."""
    from diffusers import DDIMScheduler

    from ..models import save_mlp

    out_dir = Path(out_dir)
    pred = prediction_type or bundle.init_prediction_type
    if bundle.kind == "mlp":
        save_mlp(net, out_dir, pred)
        return
    scheduler = DDIMScheduler.from_config({**bundle.scheduler_config, "prediction_type": pred})
    if bundle.kind == "unet2d":
        from .class_conditional import ClassConditionalPipeline

        ClassConditionalPipeline(unet=net, scheduler=scheduler).save_pretrained(out_dir)
        return
    sd_pipeline(bundle, unet=net, scheduler=scheduler).save_pretrained(out_dir)
    from ..tokenizer import add_bpe_files

    for sub in ("tokenizer", "tokenizer_2"):
        if (out_dir / sub).is_dir():
            add_bpe_files(out_dir / sub)  # vocab.json / merges.txt for the slow CLIPTokenizer too


def sd_pipeline(bundle, unet: nn.Module | None = None, scheduler=None):
    """A stock StableDiffusion(XL)Pipeline over the bundle's components."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = scheduler or DDIMScheduler.from_config(bundle.scheduler_config)
    toks, encs = bundle.components["tokenizers"], bundle.components["text_encoders"]
    unet = unet if unet is not None else bundle.init_net
    if bundle.kind == "sdxl":
        return StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=encs[0], text_encoder_2=encs[1],
                                         tokenizer=toks[0], tokenizer_2=toks[1], unet=unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=bundle.vae, text_encoder=encs[0], tokenizer=toks[0], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
