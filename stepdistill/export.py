"""Student artifacts: ``RUN/student/`` holds a Diffusers-format LoRA (``pytorch_lora_weights.safetensors``)
or a full network, plus ``sampling.json``, the recipe a stock pipeline needs to sample it:

    {"scheduler": "LCMScheduler", "scheduler_kwargs": {...}, "num_inference_steps": 1,
     "timesteps": [999], "guidance_scale": 1.0, "eta": null, "format": "lora", "base": "asset:digits-sd", ...}

Every trainer exports through :func:`export_student`; ``stepdistill sample`` and ``stepdistill eval``
read the recipe with :func:`load_recipe`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .errors import UsageError

RECIPE_FILE = "sampling.json"


class SamplingRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    scheduler: str = Field(..., description="stock Diffusers scheduler class name")
    scheduler_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to from_config on top of "
                                                                               "the base model's scheduler config")
    num_inference_steps: int = Field(..., ge=1)
    timesteps: list[int] | None = None
    guidance_scale: float = Field(1.0, description="<= 1 disables classifier-free guidance (Diffusers' rule)")
    eta: float | None = None
    format: Literal["lora", "peft_lora", "unet", "pipeline", "mlp"] = "lora"
    base: str | None = Field(None, description="the teacher the student was distilled from (model.pretrained)")
    prediction_type: str = "epsilon"
    method: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a stock pipeline call."""
        kw: dict[str, Any] = {"guidance_scale": self.guidance_scale}
        if self.timesteps is not None:
            kw["timesteps"] = list(self.timesteps)
        else:
            kw["num_inference_steps"] = self.num_inference_steps
        if self.eta is not None:
            kw["eta"] = self.eta
        return kw


def save_recipe(recipe: SamplingRecipe, out_dir: Path) -> Path:
    path = Path(out_dir) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(recipe.model_dump_json(indent=2))
    return path


def load_recipe(student_dir: Path) -> SamplingRecipe:
    path = Path(student_dir) / RECIPE_FILE
    if not path.exists():
        raise UsageError(f"{path} not found: {student_dir} is not a student folder (run 'stepdistill train' "
                         f"to completion first)")
    try:
        return SamplingRecipe.model_validate(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a valid sampling recipe: {str(e).splitlines()[0]}") from None


def export_student(bundle, net: nn.Module, out_dir: Path, recipe: SamplingRecipe, adapter: str | None = None,
                   prediction_type: str | None = None) -> None:
    """Write the student network (LoRA adapter ``adapter`` of ``net``, or ``net`` whole) and its recipe."""
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
    save_recipe(recipe.model_copy(update={"format": fmt, "prediction_type": pred, "base": bundle.source}), out_dir)
