"""Student artifacts: ``RUN/student/`` holds a Diffusers-format LoRA (``pytorch_lora_weights.safetensors``)
or a full network, plus ``sampling.json``, the recipe a stock pipeline needs to sample it:

    {"scheduler": "LCMScheduler", "scheduler_kwargs": {...}, "num_inference_steps": 1,
     "timesteps": [999], "guidance_scale": 1.0, "eta": null, "format": "lora", "base": "asset:digits-sd", ...}

Every trainer exports through :func:`export_student`; ``stepdistill sample`` and ``stepdistill eval``
read the recipe with :func:`load_recipe`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .recipe import SamplingRecipe

__all__ = ["SamplingRecipe", "export_student", "load_recipe", "save_recipe"]


def save_recipe(recipe: SamplingRecipe, out_dir: Path) -> Path:
    return recipe.save(Path(out_dir))


def load_recipe(student_dir: Path) -> SamplingRecipe:
    return SamplingRecipe.load(Path(student_dir))


def export_student(bundle, net: nn.Module, out_dir: Path, recipe: SamplingRecipe, adapter: str | None = None,
                   prediction_type: str | None = None, alternatives: dict[str, SamplingRecipe] | None = None
                   ) -> None:
    """Write the student network (LoRA adapter ``adapter`` of ``net``, or ``net`` whole) and its recipe;
    ``alternatives`` (file name -> recipe) are other ways to sample the same student, written beside it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .lora import save_diffusers_lora, save_peft_lora
    from .models import save_network

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pred = prediction_type or recipe.prediction_type
    if adapter is not None:
        if bundle.kind in ("sd", "sdxl"):
            pipeline_cls = StableDiffusionXLPipeline if bundle.kind == "sdxl" else StableDiffusionPipeline
            save_diffusers_lora(net, adapter, out_dir, pipeline_cls=pipeline_cls)
            fmt = "lora"
        else:
            save_peft_lora(net, adapter, out_dir)
            fmt = "peft_lora"
    elif bundle.kind in ("sd", "sdxl"):
        net.save_pretrained(out_dir / "unet")
        fmt = "unet"
    else:
        save_network(bundle, net, out_dir, pred)
        fmt = "mlp" if bundle.kind == "mlp" else "pipeline"
    update = {"format": fmt, "prediction_type": pred, "base": bundle.source}
    save_recipe(recipe.model_copy(update=update), out_dir)
    for file_name, alt in (alternatives or {}).items():
        if file_name == "sampling.json" or not file_name.endswith(".json"):
            raise ValueError(f"alternative recipe file {file_name!r} must be a .json name other than sampling.json")
        alt.model_copy(update=update).save(out_dir / file_name)
