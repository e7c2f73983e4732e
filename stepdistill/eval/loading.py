"""Teachers and students as :class:`~stepdistill.eval.samplers.Sampler`s.

- :func:`load_teacher` -- ``toy2d`` (the exact mixture teacher), a shipped asset (``digits`` ->
  ``digits-teacher``, ``digits-sd``) or a local Diffusers folder (``UNet2DModel`` pipeline or Stable
  Diffusion pipeline, opened with the stock ``from_pretrained``).
- :func:`load_student` -- a training run's deliverable: ``RUN/student/`` holds a Diffusers LoRA
  (``pytorch_lora_weights.safetensors``) or a full model, plus ``sampling.json`` (a :class:`SamplerSpec`);
  ``RUN/config.yaml`` names the teacher it was distilled from. Other tools (``stepdistill sample``,
  benchmarks) can reuse it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UsageError
from .samplers import DenoiserSampler, HybridSampler, PipelineSampler, Sampler, SamplerSpec, parse_scheduler

SHIPPED = {"digits": "digits-teacher", "digits-sd": "digits-sd"}
BENCHMARK_OF_DATA = {"toy2d": "toy2d", "digits": "digits", "digits_sd": "digits-sd", "prompts": "generic"}
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class Loaded:
    """A sampler with what the report needs to know about it."""

    sampler: Sampler
    benchmark: str  # toy2d | digits | digits-sd | generic
    source: str  # what was loaded (asset name, folder, run directory)
    spec: SamplerSpec | None = None  # a student's recipe
    method: str = "teacher"
    data_cfg: object | None = None
    info: dict = field(default_factory=dict)


def load_teacher(source: str, device="cpu", data_cfg=None, benchmark: str | None = None) -> Loaded:
    """``toy2d``, ``digits``, ``digits-sd`` or a local Diffusers folder."""
    from ..config import ModelConfig, Toy2DData
    from ..models import load_bundle

    if source == "toy2d":
        data_cfg = data_cfg or Toy2DData()
        bundle = load_bundle(ModelConfig(pretrained="toy2d"), data_cfg, device)
        sampler = DenoiserSampler(bundle.teacher, bundle.scheduler_config, bundle.sample_shape, bundle.conditioner,
                                  output="points", device=device)
        return Loaded(sampler, "toy2d", "toy2d (exact mixture)", data_cfg=data_cfg)
    if source in SHIPPED:
        from .. import assets

        path = assets.path(SHIPPED[source])
        loaded = _from_folder(path, device)
        loaded.benchmark, loaded.source = source, f"asset:{SHIPPED[source]}"
        loaded.info = _asset_info(path)
        return loaded
    path = Path(source).expanduser()
    if not path.is_dir():
        raise UsageError(f"--model {source!r} is neither toy2d, digits, digits-sd nor a Diffusers folder")
    loaded = _from_folder(path, device)
    loaded.benchmark = benchmark or "generic"
    return loaded


def _asset_info(path: Path) -> dict:
    for name in ("info.json", "asset.json", "stepdistill.json"):
        f = path / name
        if f.exists():
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError:
                return {}
    return {}


def _from_folder(path: Path, device) -> Loaded:
    from ..config import ModelConfig
    from ..models import detect_kind, load_bundle

    kind = detect_kind(path)
    if kind in ("sd", "sdxl"):
        return Loaded(PipelineSampler(_open_pipeline(path, kind, device)), "generic", str(path))
    bundle = load_bundle(ModelConfig(pretrained=str(path)), None, device)
    return Loaded(_bundle_sampler(bundle, bundle.teacher, device), "generic", str(path))


def _open_pipeline(path: Path, kind: str, device):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(path)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot open the pipeline at {path}: {str(e).splitlines()[0]}") from None
    return pipe.to(device)


def _bundle_sampler(bundle, denoiser, device) -> DenoiserSampler:
    out = "points" if bundle.kind == "mlp" else "images"
    decode = bundle.decode if bundle.vae is not None else None
    return DenoiserSampler(denoiser, bundle.scheduler_config, bundle.sample_shape, bundle.conditioner,
                           decode=decode, output=out, device=device)


# ---- students -----------------------------------------------------------------------------------------
def _run_config(run_dir: Path):
    """The run's model and data sections (validated), and its method name (any method, even one this
    checkout does not know)."""
    from pydantic import TypeAdapter, ValidationError

    from ..config import DataConfig, ModelConfig

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise UsageError(f"{run_dir} is not a training run (no config.yaml)")
    try:
        raw = yaml.safe_load(cfg_file.read_text()) or {}
        model = ModelConfig.model_validate(raw.get("model") or {})
        data = TypeAdapter(DataConfig).validate_python(raw.get("data") or {})
    except (yaml.YAMLError, ValidationError) as e:
        raise UsageError(f"{cfg_file}: cannot read its model/data sections ({str(e).splitlines()[0]})") from None
    return model, data, str((raw.get("method") or {}).get("name", "student"))


def load_student(run_dir: str | Path, device="cpu", recipe: str = "sampling.json") -> Loaded:
    """The student of a training run as a sampler, with its recipe (``RUN/student/sampling.json``, or another
    recipe file the trainer wrote beside it, e.g. TSCD's ``sampling_ddim_trailing.json``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory not found: {run_dir}")
    model_cfg, data_cfg, method = _run_config(run_dir)
    student = run_dir / "student"
    if not student.is_dir() or not any(student.iterdir()):
        raise UsageError(f"{run_dir} has no student ({student} is missing); finish training first (stepdistill "
                         f"train writes it at the end or with --max-steps)")
    spec = SamplerSpec.load(student / recipe)
    lora = (student / LORA_FILE).exists()
    full = (student / "model_index.json").exists() or (student / "unet").is_dir() or (student / "config.json").exists()
    if not (lora or full):
        raise UsageError(f"{student} holds neither {LORA_FILE} nor a full model; re-export the run")
    from ..models import load_bundle

    benchmark = BENCHMARK_OF_DATA.get(data_cfg.name, "generic")
    if model_cfg.pretrained not in (None, "toy2d"):
        from ..models import detect_kind, resolve_source

        base = resolve_source(model_cfg.pretrained)
        kind = detect_kind(base) if model_cfg.kind == "auto" else model_cfg.kind
        if kind in ("sd", "sdxl"):
            pipe = _open_pipeline(base, kind, device)
            if lora:
                pipe.load_lora_weights(str(student))
            else:
                pipe.unet = _full_unet(student, type(pipe.unet)).to(device)
            pred = (spec.model_extra or {}).get("prediction_type")
            if pred:  # the scheduler reads the student's output in the student's parameterisation
                pipe.scheduler = type(pipe.scheduler).from_config({**pipe.scheduler.config, "prediction_type": pred})
            return Loaded(PipelineSampler(pipe), benchmark, str(run_dir), spec, method, data_cfg)
    bundle = load_bundle(model_cfg, data_cfg, device)
    recipe_pred = (spec.model_extra or {}).get("prediction_type")  # written by export.export_student
    if lora:
        from ..lora import load_peft_lora

        net = bundle.new_network(trainable=False)
        load_peft_lora(net, student)
        denoiser = bundle.denoiser(net.to(device).eval(), prediction_type=recipe_pred)
    else:
        net, pred = _full_network(student, bundle)
        denoiser = bundle.denoiser(net.to(device).eval(), prediction_type=pred or recipe_pred)
    return Loaded(_bundle_sampler(bundle, denoiser, device), benchmark, str(run_dir), spec, method, data_cfg)


def load_hybrid(run_dir: str | Path, device="cpu", base_steps: int = 1, mode: str = "replace",
                base_guidance: float | None = None, recipe: str = "sampling.json",
                base_scheduler: str | None = None) -> Loaded:
    """A run's student behind its teacher for the first ``base_steps`` steps (``pipelines.hybrid``): two stock
    pipelines for Stable Diffusion students (teacher, teacher + LoRA), two Denoisers otherwise.
    ``base_scheduler``: 'recipe' / None (the student recipe's scheduler, the paper's setting), 'ode'
    (deterministic DDIM / Euler steps on the same timesteps) or ``NAME[:key=value,...]``."""
    student = load_student(run_dir, device, recipe=recipe)
    model_cfg, data_cfg, _ = _run_config(Path(run_dir))
    if isinstance(student.sampler, PipelineSampler):
        from ..models import detect_kind, resolve_source

        path = resolve_source(model_cfg.pretrained)
        kind = detect_kind(path) if model_cfg.kind == "auto" else model_cfg.kind
        base: Sampler = PipelineSampler(_open_pipeline(path, kind, device))
    else:
        from ..models import load_bundle

        bundle = load_bundle(model_cfg, data_cfg, device)
        base = _bundle_sampler(bundle, bundle.teacher, device)
    name, kwargs = parse_scheduler(base_scheduler) if base_scheduler not in (None, "recipe") else (None, None)
    sampler = HybridSampler(base, student.sampler, base_steps, mode, base_guidance, name, kwargs)
    return Loaded(sampler, student.benchmark, student.source, student.spec, "hybrid", data_cfg)


def _full_unet(student: Path, cls):
    sub = "unet" if (student / "unet").is_dir() else None
    return cls.from_pretrained(student, subfolder=sub).eval()


def _full_network(student: Path, bundle):
    """A full student network of the bundle's family, and its prediction type."""
    if bundle.kind == "mlp":
        from ..models import load_mlp

        return load_mlp(student)
    from diffusers import UNet2DModel

    net = _full_unet(student, UNet2DModel)
    sched = student / "scheduler" / "scheduler_config.json"
    pred = json.loads(sched.read_text()).get("prediction_type") if sched.exists() else None
    return net, pred
