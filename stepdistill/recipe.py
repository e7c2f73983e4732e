"""The sampling recipe (``RUN/student/sampling.json``): how a stock Diffusers pipeline samples a student.

    {"scheduler": "LCMScheduler", "scheduler_kwargs": {}, "num_inference_steps": 1, "timesteps": [999],
     "guidance_scale": 1.0, "eta": null, "format": "lora", "base": "asset:digits-sd", ...}

Trainers write it (``export.export_student``); ``stepdistill sample`` and ``stepdistill eval`` read it, and
the evaluator uses the same class for teacher configurations (DDIM at N steps ...). Extra keys a trainer
adds are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UsageError

RECIPE_FILE = "sampling.json"


class SamplingRecipe(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    scheduler: str = Field("DDIMScheduler", description="stock Diffusers scheduler class name")
    scheduler_kwargs: dict[str, Any] = Field(default_factory=dict, description="on top of the base model's "
                                                                               "scheduler config")
    num_inference_steps: int | None = Field(None, ge=1)
    timesteps: list[int] | None = None
    guidance_scale: float | None = Field(None, description="null or <= 1: no classifier-free guidance")
    eta: float | None = None
    format: str | None = Field(None, description="lora | peft_lora | unet | pipeline | mlp (students)")
    base: str | None = Field(None, description="the teacher the student was distilled from (model.pretrained)")
    prediction_type: str | None = None
    method: str | None = None

    @model_validator(mode="after")
    def _has_steps(self):
        if self.num_inference_steps is None and not self.timesteps:
            raise ValueError("set num_inference_steps or timesteps")
        return self

    @property
    def steps(self) -> int:
        return len(self.timesteps) if self.timesteps else int(self.num_inference_steps)

    def label(self) -> str:
        name = self.scheduler.removesuffix("Scheduler")
        w = "" if self.guidance_scale in (None, 1.0) else f" w={self.guidance_scale:g}"
        return f"{name}-{self.steps}{w}"

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a stock pipeline call."""
        kw: dict[str, Any] = {"guidance_scale": 1.0 if self.guidance_scale is None else self.guidance_scale}
        if self.timesteps:
            kw["timesteps"] = list(self.timesteps)
        else:
            kw["num_inference_steps"] = self.num_inference_steps
        if self.eta is not None:
            kw["eta"] = self.eta
        return kw

    @classmethod
    def load(cls, path: str | Path) -> "SamplingRecipe":
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILE
        if not path.is_file():
            raise UsageError(f"sampling recipe not found: {path} (run 'stepdistill train' to completion first)")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        except ValidationError as e:
            err = e.errors()[0]
            raise UsageError(f"{path}: {'.'.join(map(str, err['loc'])) or 'recipe'}: {err['msg']}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / RECIPE_FILE
        path.write_text(json.dumps(self.model_dump(mode="json", exclude_none=False), indent=2) + "\n")
        return path
