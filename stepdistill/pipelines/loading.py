"""Opening teachers and students as samplers (``pipelines.samplers``).

- :func:`load_student` -- the one loader of a student artifact (``RUN/student/``: its networks and
  ``sampling.json``, ``pipelines.artifact``): Stable Diffusion students on a stock pipeline (each LoRA loaded with
  ``load_lora_weights(..., adapter_name=NAME)``), others as Denoisers over the teacher's network.
- :func:`load_teacher` -- ``toy2d`` (the exact mixture teacher), a shipped asset (``digits`` -> ``digits-teacher``,
  ``digits-sd``) or a local Diffusers folder (``UNet2DModel`` pipeline or Stable Diffusion pipeline).
- :func:`load_run` -- a training run's student with what a report needs (benchmark, method, data).
- :func:`hybrid_recipe` -- a run's plan with its teacher in front (hybrid sampling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from ..errors import UsageError
from ..userfiles import check_safetensors, inside, read_text
from .plan import RECIPE_FILE, TEACHER, SamplingRecipe, plan_hybrid
from .samplers import Conditions, DenoiserSampler, PipelineSampler, Sampler

SHIPPED = {"digits": "digits-teacher", "digits-sd": "digits-sd"}
BENCHMARK_OF_DATA = {"toy2d": "toy2d", "digits": "digits", "digits_sd": "digits-sd", "prompts": "generic"}


@dataclass
class Loaded:
    """A sampler with what a report needs to know about it."""

    sampler: Sampler
    benchmark: str  # toy2d | digits | digits-sd | generic
    source: str  # what was loaded (asset name, folder, run directory)
    spec: SamplingRecipe | None = None  # a student's recipe
    method: str = "teacher"
    data_cfg: object | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Student:
    """A loaded student: ``student(prompts=[...] | labels=tensor, seeds=[...])`` samples its whole plan."""

    sampler: Sampler
    recipe: SamplingRecipe

    def __call__(self, prompts: Sequence[str] | None = None, labels: torch.Tensor | None = None,
                 seeds: Sequence[int] = (0,), recipe: SamplingRecipe | None = None) -> torch.Tensor:
        conds = Conditions(None if labels is None else torch.as_tensor(labels).long(),
                           None if prompts is None else list(prompts))
        return self.sampler(recipe or self.recipe, conds, list(seeds))


# ---- pipelines and bundles --------------------------------------------------------------------------------
def open_pipeline(path: Path, kind: str, device="cpu"):
    """A stock StableDiffusion(XL)Pipeline from a local folder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        if kind == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(path)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot open the pipeline at {path}: {str(e).splitlines()[0]}") from None
    return pipe.to(device)


def bundle_sampler(bundle, networks: dict, device="cpu", main: str = TEACHER) -> DenoiserSampler:
    out = "points" if bundle.kind == "mlp" else "images"
    decode = bundle.decode if bundle.vae is not None else None
    return DenoiserSampler(networks, bundle.scheduler_config, bundle.sample_shape, bundle.conditioner,
                           decode=decode, output=out, device=device, main=main)


def load_teacher(source: str, device="cpu", data_cfg=None, benchmark: str | None = None) -> Loaded:
    """``toy2d``, ``digits``, ``digits-sd`` or a local Diffusers folder."""
    from ..config import ModelConfig, Toy2DData
    from ..models import load_bundle

    if source == "toy2d":
        data_cfg = data_cfg or Toy2DData()
        bundle = load_bundle(ModelConfig(pretrained="toy2d"), data_cfg, device)
        return Loaded(bundle_sampler(bundle, {TEACHER: bundle.teacher}, device), "toy2d", "toy2d (exact mixture)",
                      data_cfg=data_cfg)
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
    loaded.info = _asset_info(path)  # a copy of an asset keeps its recorded values (e.g. its guidance)
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
    from ..models import family, load_bundle

    cfg = ModelConfig(pretrained=str(path))
    _, kind = family(cfg)
    if kind in ("sd", "sdxl"):
        return Loaded(PipelineSampler(open_pipeline(path, kind, device)), "generic", str(path))
    bundle = load_bundle(cfg, None, device)
    return Loaded(bundle_sampler(bundle, {TEACHER: bundle.teacher}, device), "generic", str(path))


# ---- students -----------------------------------------------------------------------------------------
def run_config(run_dir: Path):
    """A run's model and data sections (validated), and its method name (any method, even one this checkout does
    not know)."""
    from pydantic import TypeAdapter, ValidationError

    from ..config import DataConfig, ModelConfig

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise UsageError(f"{run_dir} is not a training run (no config.yaml)")
    try:
        raw = yaml.safe_load(read_text(cfg_file, "YAML config")) or {}
        model = ModelConfig.model_validate(raw.get("model") or {})
        data = TypeAdapter(DataConfig).validate_python(raw.get("data") or {})
    except (yaml.YAMLError, ValidationError) as e:
        raise UsageError(f"{cfg_file}: cannot read its model/data sections ({str(e).splitlines()[0]})") from None
    return model, data, str((raw.get("method") or {}).get("name", "student"))


def load_student(student_dir: str | Path, pipe=None, device="cpu", recipe: str = RECIPE_FILE, model_cfg=None,
                 data_cfg=None) -> Student:
    """The student in ``student_dir`` with its plan. Stable Diffusion students load into ``pipe`` (a stock
    pipeline of their base model; opened from the recipe's ``base`` when None): every LoRA network with
    ``load_lora_weights(dir, adapter_name=NAME)``, the teacher being the pipeline with its LoRAs off. Other
    families become Denoisers over the base network (``model_cfg`` / ``data_cfg``: the run's config, read from
    ``student_dir/../config.yaml`` when present). ``recipe``: another recipe file the trainer wrote beside
    ``sampling.json`` (e.g. TSCD's ``sampling_ddim_trailing.json``)."""
    from ..config import ModelConfig

    student_dir = Path(student_dir)
    if not student_dir.is_dir() or not any(student_dir.iterdir()):
        raise UsageError(f"no student at {student_dir}; finish training first (stepdistill train writes it at the "
                         f"end or with --max-steps)")
    spec = SamplingRecipe.load(student_dir / recipe)
    if model_cfg is None and (student_dir.parent / "config.yaml").is_file():
        model_cfg, data_cfg, _ = run_config(student_dir.parent)
    if model_cfg is None:
        if not spec.base:
            raise UsageError(f"{student_dir / recipe} names no base model and there is no run config beside it")
        model_cfg = ModelConfig(pretrained=spec.base)
    table = spec.network_table()
    for name, entry in table.items():
        folder = inside(student_dir, entry.path, f"network {name!r} path")
        if entry.format is None:  # a recipe that does not say: the files do
            entry.format = "lora" if _has_network(folder, "lora") else "full"
        if not folder.is_dir() or not _has_network(folder, entry.format):
            raise UsageError(f"{student_dir} lacks network {name!r} ({entry.format} in {folder}); re-export the run")
        for f in sorted(folder.rglob("*.safetensors")):  # torn or truncated weights: one line, not a traceback
            check_safetensors(f, fix="re-export the run")
    kind = None
    if pipe is None and model_cfg.pretrained not in (None, "toy2d"):
        from ..models import family

        base, kind = family(model_cfg)
        if kind in ("sd", "sdxl"):
            pipe = open_pipeline(base, kind, device)
    if pipe is not None:
        return Student(_pipeline_student(pipe, student_dir, table), spec)
    return Student(_denoiser_student(model_cfg, data_cfg, student_dir, table, device), spec)


def _has_network(folder: Path, fmt: str) -> bool:
    from ..lora import LORA_WEIGHT_NAME

    if fmt in ("lora", "peft_lora"):
        return (folder / LORA_WEIGHT_NAME).exists()
    if fmt == "unet":
        return (folder / "unet").is_dir() or (folder / "config.json").exists()
    return (folder / "model_index.json").exists() or (folder / "config.json").exists() or (folder / "unet").is_dir()


def _pipeline_student(pipe, student_dir: Path, table) -> PipelineSampler:
    from ..lora import unet_lora_loading

    networks: dict[str, Any] = {TEACHER: None}
    for name, entry in table.items():
        folder = student_dir / entry.path
        if entry.format in ("lora", "peft_lora"):
            if name in (getattr(pipe.unet, "peft_config", None) or {}):
                raise UsageError(f"the pipeline already has an adapter named {name!r}; load the student into a "
                                 f"pipeline without it (or delete_adapters({name!r}) first)")
            try:
                with unet_lora_loading():
                    pipe.load_lora_weights(str(folder), adapter_name=name)
            except (ValueError, RuntimeError, KeyError) as e:
                raise UsageError(f"the LoRA in {folder} does not fit the base model ({str(e).splitlines()[0][:160]});"
                                 f" use the base it was trained on") from None
            networks[name] = name
        elif entry.format in ("unet", "pipeline", "full"):
            unet = type(pipe.unet).from_pretrained(folder, subfolder="unet" if (folder / "unet").is_dir() else None)
            networks[name] = (type(pipe)(**{**pipe.components, "unet": unet.to(pipe.device).eval()}), None)
        else:
            raise UsageError(f"network {name!r} has format {entry.format!r}, which a Stable Diffusion pipeline "
                             f"cannot load (lora, unet or pipeline)")
    preds = {name: e.prediction_type for name, e in table.items()}
    return PipelineSampler(pipe, networks, main=next(iter(table)), prediction_types=preds)


def _denoiser_student(model_cfg, data_cfg, student_dir: Path, table, device) -> DenoiserSampler:
    from ..lora import load_peft_lora
    from ..models import load_bundle

    bundle = load_bundle(model_cfg, data_cfg, device)
    base = None
    networks = {TEACHER: bundle.teacher}
    for name, entry in table.items():
        folder = student_dir / entry.path
        if entry.format in ("lora", "peft_lora"):
            base = base if base is not None else bundle.new_network(trainable=False).to(device).eval()
            load_peft_lora(base, folder, name)
            networks[name] = bundle.denoiser(base, adapter=name, prediction_type=entry.prediction_type)
        else:
            net, pred = _full_network(folder, bundle)
            networks[name] = bundle.denoiser(net.to(device).eval(), prediction_type=pred or entry.prediction_type)
    return bundle_sampler(bundle, networks, device, main=next(iter(table)))


def _full_network(folder: Path, bundle):
    """A full network of the bundle's family, and its prediction type."""
    if bundle.kind == "mlp":
        from ..models import load_mlp

        return load_mlp(folder)
    from diffusers import UNet2DModel

    net = UNet2DModel.from_pretrained(folder, subfolder="unet" if (folder / "unet").is_dir() else None).eval()
    sched = folder / "scheduler" / "scheduler_config.json"
    pred = json.loads(sched.read_text()).get("prediction_type") if sched.exists() else None
    return net, pred


def load_run(run_dir: str | Path, device="cpu", recipe: str = RECIPE_FILE) -> Loaded:
    """The student of a training run (``RUN/student``) through :func:`load_student`, with its run's benchmark."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory not found: {run_dir}")
    model_cfg, data_cfg, method = run_config(run_dir)
    student = run_dir / "student"
    if not student.is_dir() or not any(student.iterdir()):
        raise UsageError(f"{run_dir} has no student ({student} is missing); finish training first (stepdistill "
                         f"train writes it at the end or with --max-steps)")
    st = load_student(student, device=device, recipe=recipe, model_cfg=model_cfg, data_cfg=data_cfg)
    benchmark = BENCHMARK_OF_DATA.get(data_cfg.name, "generic")
    raw = yaml.safe_load(read_text(run_dir / "config.yaml", "YAML config")) or {}
    method_cfg = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    return Loaded(st.sampler, benchmark, str(run_dir), st.recipe, method, data_cfg,
                  info={"method": method_cfg})  # the run's method section as saved (e.g. its real_guidance)


def hybrid_recipe(sampler: Sampler, recipe: SamplingRecipe, base_steps: int = 1, mode: str = "replace",
                  base_guidance: float | None = None, base_scheduler: str | None = None) -> SamplingRecipe:
    """The student's plan with its teacher for the first ``base_steps`` steps (``plan.plan_hybrid``).
    ``base_scheduler``: 'recipe' / None (the student recipe's scheduler, the paper's setting), 'ode'
    (deterministic DDIM / Euler steps on the same timesteps) or ``NAME[:key=value,...]``."""
    from .handoff import ode_base_scheduler

    timesteps = sampler.timesteps(recipe)
    sched = None
    if base_scheduler == "ode":
        base_ts = timesteps[:base_steps] if mode == "add" else timesteps
        sched = ode_base_scheduler(sampler.scheduler_config(TEACHER), base_ts)
    elif base_scheduler not in (None, "recipe"):
        sched = parse_scheduler(base_scheduler)
    return plan_hybrid(recipe, timesteps, base_steps, mode, sched, base_guidance)


def load_hybrid(run_dir: str | Path, device="cpu", base_steps: int = 1, mode: str = "replace",
                base_guidance: float | None = None, recipe: str = RECIPE_FILE,
                base_scheduler: str | None = None) -> Loaded:
    """A run's student behind its teacher for the first ``base_steps`` steps: the same loaded networks (the
    teacher is the base with the student's adapters off), a two-segment plan."""
    student = load_run(run_dir, device, recipe=recipe)
    spec = hybrid_recipe(student.sampler, student.spec, base_steps, mode, base_guidance, base_scheduler)
    return Loaded(student.sampler, student.benchmark, student.source, spec, "hybrid", student.data_cfg)


def parse_scheduler(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value,key=value`` (values read as YAML), e.g.
    ``DDIMScheduler:timestep_spacing=trailing``."""
    name, _, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"scheduler {text!r}: give NAME or NAME:key=value,key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    return name.strip(), kwargs
