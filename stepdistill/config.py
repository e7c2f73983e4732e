"""Typed run configuration: pydantic schema, YAML loading, ``key=value`` dotted overrides, and errors that
name the offending key (with the closest valid one) or field and expected type.

A config file has four sections: ``method`` (which trainer, and its own options; ``name`` picks the method
in :mod:`stepdistill.registry`, whose ``config`` class, kept beside the trainer, is the section's schema),
``model`` (teacher / network), ``data`` and ``train`` (the loop: steps, batch, optimiser, precision,
checkpoints). Every run directory gets ``config.yaml``, the resolved config.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator,
                      model_validator)

from .errors import UsageError
from .userfiles import read_text


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---- train loop ----------------------------------------------------------------------------------
class OptimConfig(Strict):
    """AdamW (Loshchilov & Hutter) with linear warmup to a constant learning rate."""

    model_config = ConfigDict(allow_inf_nan=False)  # a learning rate of inf validates, then diverges at step 0

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max gradient norm; null disables clipping")

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas


class EMAConfig(Strict):
    decay: float | None = Field(None, ge=0, lt=1, description="EMA decay; null disables EMA")
    networks: list[str] | None = Field(None, description="networks to average; null: the method's exported one")
    warmup: bool = Field(False, description="Diffusers EMAModel decay warmup (1 - (1+s)/(10+s))")


class DistributedConfig(Strict):
    """How several processes (``accelerate launch`` / ``torchrun``) share a run; one process ignores it.
    ``stepdistill/training/distributed.py`` describes both strategies."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="auto: fsdp when accelerate's config selects FSDP (accelerate launch --use_fsdp), else "
                            "ddp. ddp: every process holds every network, gradients are averaged in buckets during "
                            "backward. fsdp: FSDP2 shards full networks (weights, gradients, AdamW and EMA states) "
                            "and the frozen teacher; LoRA networks need ddp")
    bucket_mb: float = Field(25.0, gt=0, description="ddp: gradient all-reduce bucket size in MiB (DDP's default)")


class TrainConfig(Strict):
    steps: int = Field(1000, ge=1, description="total optimisation steps (the LR schedule uses this)")
    batch_size: int = Field(64, ge=1, description="per-process batch size")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    precision_per_network: dict[str, Literal["fp32", "bf16", "fp16"]] = Field(
        default_factory=dict, description="per-network precision of its forward passes, e.g. {fake_score: fp32} "
                                          "(fp32: outside autocast); a key is a network or a group of them")
    attention: Literal["auto", "sdpa", "xformers"] = "auto"
    gradient_checkpointing: bool = False
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    optim: OptimConfig = OptimConfig()
    optim_per_network: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-network overrides of `optim`, e.g. {fake_score: {lr: 2e-4}}")
    ema: EMAConfig = EMAConfig()
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    log_with: Literal["auto", "none", "tensorboard"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads (null: torch's default)")
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _optim_overrides(self):
        """Each ``optim_per_network`` entry is checked here (keys and values); its network name is checked
        against the method's networks when the trainer builds them."""
        for name, extra in self.optim_per_network.items():
            if not isinstance(extra, dict):
                raise ValueError(f"optim_per_network.{name} must be a mapping of optim keys, e.g. {{lr: 2e-4}}")
            unknown = sorted(set(extra) - set(OptimConfig.model_fields))
            if unknown:
                raise ValueError(f"optim_per_network.{name}: unknown key(s) {unknown}; valid keys: "
                                 f"{', '.join(OptimConfig.model_fields)}")
            try:
                OptimConfig(**{**self.optim.model_dump(), **extra})
            except ValidationError as e:
                raise ValueError(f"optim_per_network.{name}: {_first_error(e)}") from None
        return self

    def precision_for(self, network: str, group: str | None = None) -> str | None:
        """The network's ``precision_per_network`` entry, else its group's; None: ``precision`` applies."""
        table = self.precision_per_network
        return table.get(network, table.get(group) if group else None)

    def optim_for(self, network: str, group: str | None = None) -> OptimConfig:
        """``optim`` with the overrides of the network's group (e.g. ``fake_score`` for every phase's fake score)
        and then of the network itself."""
        extra = {**(self.optim_per_network.get(group, {}) if group else {}), **self.optim_per_network.get(network, {})}
        try:
            return OptimConfig(**{**self.optim.model_dump(), **extra})
        except ValidationError as e:
            raise UsageError(f"train.optim_per_network.{network}: {_first_error(e)}") from None


# ---- model ---------------------------------------------------------------------------------------
class ModelConfig(Strict):
    pretrained: str | None = Field(
        None, description="teacher: 'asset:NAME' (shipped), a local Diffusers folder (pipeline or model), "
                          "or 'toy2d' (exact mixture teacher)")
    arch: dict[str, Any] | None = Field(None, description="network kwargs when training from scratch")
    kind: Literal["auto", "mlp", "unet2d", "sd", "sdxl"] = "auto"
    scheduler: dict[str, Any] = Field(default_factory=dict, description="scheduler config (from scratch)")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = Field(
        None, description="null: the teacher scheduler's")
    init: str | None = Field(None, description="network to initialise students from ('asset:toy2d-mlp', a "
                                                "folder); null: the teacher network")
    components: dict[str, str] = Field(
        default_factory=dict, description="kind sd with arch (a fresh UNet): folders of its vae, text_encoder and "
                                          "tokenizer (the component's folder, or one holding it as a subfolder)")

    @model_validator(mode="after")
    def _one_source(self):
        if self.pretrained is None and self.arch is None:
            raise ValueError("set model.pretrained (a teacher to load) or model.arch (a network to build)")
        return self


class LoRAConfig(Strict):
    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, description="null: equal to rank")
    target_modules: list[str] | None = Field(None, description="null: the family's default layers")


# ---- data ----------------------------------------------------------------------------------------
class Toy2DData(Strict):
    name: Literal["toy2d"] = "toy2d"
    num_modes: int = Field(8, ge=1)
    radius: float = Field(2.0, gt=0)
    std: float = Field(0.1, gt=0)
    means: list[tuple[float, float]] | None = Field(None, description="explicit means (override the ring)")
    stds: list[float] | None = None
    weights: list[float] | None = None
    conditional: bool = Field(False, description="condition on the mode index")


class DigitsData(Strict):
    name: Literal["digits"] = "digits"
    resolution: int = Field(16, ge=8)
    split: Literal["train", "heldout", "all"] = "train"


class DigitsSDData(Strict):
    name: Literal["digits_sd"] = "digits_sd"
    resolution: int = Field(16, ge=8)
    split: Literal["train", "heldout", "all"] = "train"
    empty_prompt_prob: float = Field(0.1, ge=0, le=1, description="share of empty prompts (CFG dropout)")
    templates: list[str] | None = Field(None, description="prompt templates with {word} / {num}")
    channels: int = Field(3, ge=1, description="image channels (gray replicated, RGB like SD) when no VAE "
                                               "encodes them")
    dilate: int = Field(0, ge=0, description="stroke dilation radius in pixels (a (2r+1)^2 max filter): bold "
                                             "digits, the data of a 'bold strokes' control LoRA; 0: none")


class PromptsData(Strict):
    name: Literal["prompts"] = "prompts"
    file: str = Field(..., description="text file with one prompt per line")


class ImagesData(Strict):
    """A local image folder (layouts, preprocessing and the latent cache: ``stepdistill/data/images.py``)."""

    name: Literal["images"] = "images"
    folder: str = Field(..., description="imagefolder (metadata.jsonl), images with .txt captions, or class "
                                         "subfolders")
    caption_column: str = Field("text", description="metadata.jsonl column holding a caption or a list of them")
    resolution: int | None = Field(None, ge=8, description="square side in pixels; null: the model's own")
    crop: Literal["center", "random"] = Field("center", description="random crops are not cached: each draw is "
                                                                    "encoded by the VAE")
    hflip: float = Field(0.0, ge=0, le=1, description="probability of a horizontal flip (the cache keeps mirror "
                                                      "images)")
    empty_prompt_prob: float = Field(0.0, ge=0, le=1, description="share of empty prompts (caption dropout for "
                                                                  "CFG, e.g. 0.1 to train a teacher)")
    cache_dir: str | None = Field(None, description="latent cache root; null: $STEPDISTILL_CACHE/latents or "
                                                    "~/.cache/stepdistill/latents")


DataConfig = Annotated[Union[Toy2DData, DigitsData, DigitsSDData, PromptsData, ImagesData],
                       Field(discriminator="name")]


# ---- methods: the shared base and the pieces several methods use ------------------------------------------
class MethodConfig(Strict):
    """Base of every method's config section (the class is ``Method.config``, beside its trainer). ``name``
    picks the method; ``loss_weights`` holds one weight per loss key, and a key the user leaves out keeps the
    class's default, so the resolved config shows every weight."""

    name: str
    loss_weights: dict[str, float] = Field(default_factory=dict)

    @field_validator("loss_weights")
    @classmethod
    def _over_defaults(cls, weights: dict[str, float]) -> dict[str, float]:
        return {**cls.model_fields["loss_weights"].get_default(call_default_factory=True), **weights}


class StudentNetConfig(Strict):
    """How a trained network starts from the teacher: a full copy (``lora: null``) or a LoRA on a frozen base."""

    lora: LoRAConfig | None = None


class GANConfig(Strict):
    """DMD2's diffusion GAN: a head on the fake score's mid-block features, real data noised at random t."""

    hidden: int = Field(64, ge=4, description="width of the classification head")


class RegressionConfig(Strict):
    """DMD1's regression term: L2 between G(z) and the teacher's deterministic sampler output for the same z
    (pairs generated once, cached in the run directory)."""

    num_pairs: int = Field(1000, ge=1)
    teacher_steps: int = Field(50, ge=1, description="DDIM steps of the teacher for the pairs")
    batch_size: int | None = Field(None, ge=1, description="pairs per student step (null: train.batch_size)")


def method_schema(name: str) -> type[MethodConfig]:
    """The config class of method ``name`` (registry lookup; UsageError naming the closest method)."""
    from .registry import config_class

    return config_class(name)


class RunConfig(Strict):
    method: SerializeAsAny[MethodConfig]
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()

    @field_validator("method", mode="before")
    @classmethod
    def _method_schema(cls, value: Any) -> Any:
        if isinstance(value, MethodConfig):
            return value
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError("missing 'name' (which method to use)")
        return method_schema(value["name"]).model_validate(value)


# ---- loading, overrides and errors ---------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), schema=RunConfig):
    """Read YAML, apply ``a.b.c=value`` overrides (values parsed as YAML), validate; UsageError on any mistake."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(read_text(path, "YAML config")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, schema, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise UsageError(f"override {item!r} is not key=value (e.g. train.steps=100)")
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise UsageError(f"override key {key!r} is malformed")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = parsed


def validate(raw: dict, schema=RunConfig, source: str = "config"):
    _check_keys(raw, schema, ())
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise UsageError(f"{source}: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_tag(p))
    msg = err["msg"]
    if err["type"] == "missing":
        return f"missing required key {loc!r}"
    if err["type"] == "union_tag_invalid":
        return f"{loc}: {msg}"
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
    return f"{loc}: {msg[0].lower() + msg[1:]}{got_s}" if loc else f"{msg}{got_s}"


def _is_tag(p) -> bool:
    return isinstance(p, str) and p in _ALL_TAGS


def _union_members(annotation) -> list[type[BaseModel]]:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, getattr(__import__("types"), "UnionType", Union)) else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _check_keys(raw: Any, model: type[BaseModel], loc: tuple[str, ...]) -> None:
    """Reject unknown keys before pydantic does, naming the closest valid key."""
    if not isinstance(raw, dict):
        return
    fields = model.model_fields
    for key, value in raw.items():
        if key not in fields:
            where = ".".join(loc + (str(key),))
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(loc + (close[0],))!r}?" if close else \
                f"; valid keys here: {', '.join(fields)}"
            raise UsageError(f"unknown config key {where!r}{hint}")
        members = _union_members(fields[key].annotation)
        tagged = fields[key].discriminator is not None or any(
            getattr(m, "discriminator", None) for m in fields[key].metadata)
        if members == [MethodConfig] and isinstance(value, dict):  # the schema comes from the registry
            if "name" not in value:
                raise UsageError(f"{'.'.join(loc + (key,))}: missing 'name' (which {key} to use)")
            try:
                schema = method_schema(value["name"])
            except UsageError as e:
                raise UsageError(f"{'.'.join(loc + (key, 'name'))}: {e}") from None
            _check_keys(value, schema, loc + (key,))
        elif len(members) == 1 and not tagged:
            _check_keys(value, members[0], loc + (key,))
        elif members and isinstance(value, dict):
            if "name" not in value:
                raise UsageError(f"{'.'.join(loc + (key,))}: missing 'name' (which {key} to use)")
            match = [m for m in members if value["name"] in typing.get_args(m.model_fields["name"].annotation)]
            if match:
                _check_keys(value, match[0], loc + (key,))
            else:
                names = [typing.get_args(m.model_fields["name"].annotation)[0] for m in members]
                raise UsageError(f"{'.'.join(loc + (key, 'name'))}: unknown {key} {value['name']!r}; "
                                 f"choose one of {', '.join(names)}")


def _collect_tags() -> set[str]:
    tags = set()
    for model in (RunConfig,):
        for f in model.model_fields.values():
            for m in _union_members(f.annotation):
                if "name" in m.model_fields:
                    tags.update(typing.get_args(m.model_fields["name"].annotation))
    return tags


_ALL_TAGS = _collect_tags()


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
