"""Model families behind one :class:`ModelBundle`: the teacher Denoiser, the network students start from,
the schedule, how conditions become network kwargs (the :class:`Conditioner`), and the VAE if latent.

Families: ``mlp`` (toy2d; the exact mixture teacher), ``unet2d`` (pixel ``UNet2DModel`` with class labels),
``sd`` (``UNet2DConditionModel`` + CLIP text encoder + VAE, SD1.5-shaped) and ``sdxl`` (two text
encoders and SDXL's added conditions). Everything family-specific lives here and in the conditioners.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conditioners import ClassConditioner, Conditioner, NoConditioner, TextConditioner
from .denoisers import MLP, Denoiser
from .errors import UsageError
from .schedules import NoiseSchedule

DEFAULT_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                     "beta_end": 0.012, "prediction_type": "epsilon", "clip_sample": False,
                     "set_alpha_to_one": False, "steps_offset": 1}


# ---- the bundle --------------------------------------------------------------------------------------
@dataclass
class ModelBundle:
    kind: str  # mlp | unet2d | sd | sdxl
    teacher: Denoiser  # frozen
    init_net: nn.Module  # the network students / fake scores start from (frozen copy source)
    schedule: NoiseSchedule
    scheduler_config: dict
    sample_shape: tuple[int, ...]  # per-sample shape of x (latent shape for sd)
    conditioner: Conditioner
    vae: nn.Module | None = None
    vae_scaling: float = 1.0
    components: dict[str, Any] = field(default_factory=dict)  # tokenizer(s), text encoder(s) ...
    source: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.teacher.prediction_type

    def new_network(self, trainable: bool = True) -> nn.Module:
        """A fresh copy of the init network (full fine-tune)."""
        net = copy.deepcopy(self.init_net)
        net.requires_grad_(trainable)
        return net

    def denoiser(self, net: nn.Module, adapter: str | None = None, prediction_type: str | None = None) -> Denoiser:
        return Denoiser(net, self.schedule, prediction_type or self.init_prediction_type, adapter)

    @property
    def init_prediction_type(self) -> str:
        return self.extras.get("init_prediction_type", self.prediction_type)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1] (VAE decode for latent models)."""
        if self.vae is None:
            return x
        return self.vae.decode(x.to(next(self.vae.parameters()).dtype) / self.vae_scaling).sample.float()


def resolve_source(source: str) -> Path:
    """'asset:NAME' -> the shipped asset folder; anything else is a local path that must exist."""
    if source.startswith("asset:"):
        from . import assets

        return assets.path(source[len("asset:"):])
    p = Path(source).expanduser()
    if not p.exists():
        raise UsageError(f"model folder not found: {p} (model.pretrained)")
    return p


def detect_kind(path: Path) -> str:
    index = path / "model_index.json"
    if index.exists():
        name = json.loads(index.read_text()).get("_class_name", "")
        if "XL" in name:
            return "sdxl"
        if "StableDiffusion" in name:
            return "sd"
        if (path / "unet" / "config.json").exists():
            return "unet2d"
    cfg = path / "config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("_class_name") == "UNet2DModel":
        return "unet2d"
    raise UsageError(f"{path} is not a Diffusers pipeline or UNet2DModel folder (no model_index.json / config.json)")


def family(model_cfg) -> tuple[Path, str]:
    """The teacher folder of ``model.pretrained`` and its family (``model.kind``, or detected from the folder)."""
    path = resolve_source(model_cfg.pretrained)
    return path, (detect_kind(path) if model_cfg.kind == "auto" else model_cfg.kind)


def load_bundle(model_cfg, data_cfg=None, device: torch.device | str = "cpu") -> ModelBundle:
    """Build the ModelBundle a config describes (teacher frozen, on ``device``)."""
    src = model_cfg.pretrained
    if src == "toy2d":
        return _toy2d_bundle(model_cfg, data_cfg, device)
    if src is None:
        return _scratch_bundle(model_cfg, data_cfg, device)
    if torch.device(device).type == "meta":
        return meta_bundle(model_cfg)
    path, kind = family(model_cfg)
    if kind == "unet2d":
        bundle = _unet2d_bundle(path, model_cfg, device)
    elif kind in ("sd", "sdxl"):
        bundle = _sd_bundle(path, kind, model_cfg, device)
    else:
        raise UsageError(f"model.kind={kind} cannot load {path}")
    bundle.source = src
    return bundle


def _schedule_from(config: dict) -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(config)


def _toy2d_bundle(model_cfg, data_cfg, device) -> ModelBundle:
    from .data.toy2d import GaussianMixtureX0, MixtureSpec

    if data_cfg is None or data_cfg.name != "toy2d":
        raise UsageError("model.pretrained=toy2d needs a toy2d data section (the mixture is the teacher)")
    sched_cfg = {**DEFAULT_SCHEDULER, **model_cfg.scheduler}
    schedule = _schedule_from(sched_cfg)
    spec = MixtureSpec.from_config(data_cfg)
    teacher = Denoiser(GaussianMixtureX0(spec, schedule), schedule, "sample").to(device)
    num_classes = spec.num_modes if data_cfg.conditional else None
    extras: dict[str, Any] = {"spec": spec}
    if model_cfg.init is not None:
        init_net, pred = load_mlp(resolve_source(model_cfg.init))
        extras["init_prediction_type"] = pred
    else:
        arch = dict(model_cfg.arch or {})
        arch.setdefault("num_classes", num_classes)
        init_net = MLP(**arch)
        extras["init_prediction_type"] = model_cfg.prediction_type or sched_cfg["prediction_type"]
    init_net.requires_grad_(False)
    cond = ClassConditioner(spec.num_modes, device) if data_cfg.conditional else NoConditioner()
    return ModelBundle("mlp", teacher, init_net.to(device), schedule, sched_cfg, (2,), cond, extras=extras,
                       source="toy2d")


def _scratch_bundle(model_cfg, data_cfg, device) -> ModelBundle:
    """A network built from ``model.arch`` (pretraining); it is both teacher and init network."""
    sched_cfg = {**DEFAULT_SCHEDULER, **model_cfg.scheduler}
    if model_cfg.prediction_type:
        sched_cfg["prediction_type"] = model_cfg.prediction_type
    schedule = _schedule_from(sched_cfg)
    kind = model_cfg.kind
    arch = dict(model_cfg.arch or {})
    if kind in ("auto", "mlp"):
        net = MLP(**arch)
        shape = (net.config["dim"],)
        num_classes = net.config["num_classes"]
        cond = ClassConditioner(num_classes, device) if num_classes else NoConditioner()
        kind = "mlp"
    elif kind == "unet2d":
        from diffusers import UNet2DModel

        net = UNet2DModel(**arch)
        shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
        n = net.config.num_class_embeds
        cond = ClassConditioner(n - 1, device) if n else NoConditioner()
    elif kind == "sd":
        return _sd_scratch_bundle(model_cfg, sched_cfg, schedule, device)
    else:
        raise UsageError(f"model.arch with model.kind={kind} is not supported; use mlp, unet2d or sd, or load "
                         f"a pipeline folder with model.pretrained")
    pred = sched_cfg["prediction_type"]
    net.to(device)
    return ModelBundle(kind, Denoiser(net, schedule, pred), net, schedule, sched_cfg, shape, cond)


def _sd_scratch_bundle(model_cfg, sched_cfg: dict, schedule: NoiseSchedule, device) -> ModelBundle:
    """kind sd from ``model.arch``: a fresh ``UNet2DConditionModel`` over a trained VAE, text encoder and
    tokenizer named in ``model.components`` (how digits-sd's UNet is pretrained, as SD trains its UNet
    over a frozen autoencoder and CLIP text encoder)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def folder(name: str) -> Path:
        if name not in model_cfg.components:
            raise UsageError(f"model.kind=sd with model.arch needs model.components.{name} (a folder)")
        src = model_cfg.components[name]
        p = resolve_source(src) if src.startswith("asset:") else Path(src).expanduser()
        if not p.is_dir():
            raise UsageError(f"model.components.{name}: folder not found: {p}")
        return p / name if (p / name).is_dir() else p

    try:
        vae = AutoencoderKL.from_pretrained(folder("vae")).eval()
        tok = CLIPTokenizer.from_pretrained(folder("tokenizer"))
        enc = CLIPTextModel.from_pretrained(folder("text_encoder")).eval()
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load model.components: {str(e).splitlines()[0]}") from None
    unet = UNet2DConditionModel(**(model_cfg.arch or {}))
    if unet.config.cross_attention_dim != enc.config.hidden_size or \
            unet.config.in_channels != vae.config.latent_channels:
        raise UsageError(f"model.arch must have cross_attention_dim={enc.config.hidden_size} (text encoder) and "
                         f"in_channels={vae.config.latent_channels} (vae latents)")
    for m in (vae, enc):
        m.requires_grad_(False).to(device)
    unet.to(device)
    cond = TextConditioner([tok], [enc], device)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return ModelBundle("sd", Denoiser(unet, schedule, sched_cfg["prediction_type"]), unet, schedule, sched_cfg,
                       shape, cond, vae=vae, vae_scaling=vae.config.scaling_factor,
                       components={"tokenizers": [tok], "text_encoders": [enc]})


def load_mlp(path: Path) -> tuple[MLP, str]:
    """Load a toy MLP folder (``config.json`` + ``model.safetensors``); returns (net, prediction_type)."""
    from .userfiles import load_safetensors, read_json

    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.exists() or not weights.exists():
        raise UsageError(f"{path} is not a toy MLP folder (needs config.json and model.safetensors)")
    cfg = read_json(cfg_file, "toy MLP config")
    pred = cfg.pop("prediction_type", "epsilon") if isinstance(cfg, dict) else None
    state = load_safetensors(weights, fix="export the network again")
    try:
        net = MLP(**cfg)
        net.load_state_dict(state)
    except (TypeError, RuntimeError) as e:
        raise UsageError(f"{path}: config.json and model.safetensors do not make a toy MLP "
                         f"({str(e).splitlines()[0][:160]})") from None
    return net, pred


def save_mlp(net: MLP, path: Path, prediction_type: str) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**net.config, "prediction_type": prediction_type}, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, path / "model.safetensors")


def _unet2d_bundle(path: Path, model_cfg, device) -> ModelBundle:
    from diffusers import UNet2DModel

    sub = "unet" if (path / "unet").exists() else None
    net = UNet2DModel.from_pretrained(path, subfolder=sub).eval()
    sched_file = (path / "scheduler" / "scheduler_config.json") if sub else (path / "scheduler_config.json")
    sched_cfg = json.loads(sched_file.read_text()) if sched_file.exists() else dict(DEFAULT_SCHEDULER)
    if model_cfg.prediction_type:
        sched_cfg["prediction_type"] = model_cfg.prediction_type
    schedule = _schedule_from(sched_cfg)
    net.requires_grad_(False).to(device)
    n = net.config.num_class_embeds
    cond = ClassConditioner(n - 1, device) if n else NoConditioner()
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    return ModelBundle("unet2d", Denoiser(net, schedule, sched_cfg["prediction_type"]), net, schedule, sched_cfg,
                       shape, cond)


def _sd_bundle(path: Path, kind: str, model_cfg, device) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()
        toks = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
        encs = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()]
        if kind == "sdxl":
            toks.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
            encs.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2").eval())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the pipeline at {path}: {str(e).splitlines()[0]}") from None
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    if model_cfg.prediction_type:
        sched_cfg["prediction_type"] = model_cfg.prediction_type
    schedule = _schedule_from(sched_cfg)
    for m in [unet, vae, *encs]:
        m.requires_grad_(False).to(device)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    res = unet.config.sample_size * scale
    cond = TextConditioner(toks, encs, device, sdxl=kind == "sdxl", resolution=res,
                           force_zeros_for_empty_prompt=zeros_for_empty_prompt(path, kind))
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return ModelBundle(kind, Denoiser(unet, schedule, sched_cfg["prediction_type"]), unet, schedule, sched_cfg,
                       shape, cond, vae=vae, vae_scaling=vae.config.scaling_factor,
                       components={"tokenizers": toks, "text_encoders": encs})


def meta_bundle(model_cfg) -> ModelBundle:
    """The bundle of ``model.pretrained`` built on the meta device from configs alone, reading no weights (what
    ``--dry-run`` counts). ``model.pretrained`` is a Diffusers pipeline folder (its text encoders and VAE are built
    too), a UNet folder or a UNet ``config.json``. Prompts cannot be encoded: there are no weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .conditioners import ConfigOnlyConditioner
    from .userfiles import read_json

    path = resolve_source(model_cfg.pretrained)
    unet_file = path if path.is_file() else next(
        (f for f in (path / "unet" / "config.json", path / "config.json") if f.is_file()), None)
    if unet_file is None:
        raise UsageError(f"{path} has neither unet/config.json nor config.json to build the network from")
    config = read_json(unet_file, "UNet config")
    if not isinstance(config, dict):
        raise UsageError(f"{unet_file} is not a UNet config (a JSON object)")
    kind = model_cfg.kind
    if kind == "auto":
        kind = "unet2d" if config.get("_class_name") == "UNet2DModel" else \
            "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
    root = path if path.is_dir() and (path / "unet").is_dir() else None  # a pipeline folder
    sched_file = root / "scheduler" / "scheduler_config.json" if root else None
    sched_cfg = read_json(sched_file, "scheduler config") if sched_file and sched_file.is_file() \
        else dict(DEFAULT_SCHEDULER)
    if model_cfg.prediction_type:
        sched_cfg["prediction_type"] = model_cfg.prediction_type
    schedule = _schedule_from(sched_cfg)
    encoders = []
    with torch.device("meta"):
        unet = (UNet2DModel if kind == "unet2d" else UNet2DConditionModel).from_config(config)
        for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if root is not None and (root / sub / "config.json").is_file():
                encoders.append(cls(CLIPTextConfig.from_json_file(root / sub / "config.json")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")) \
            if root is not None and (root / "vae" / "config.json").is_file() else None
    for m in [unet, *encoders, *([vae] if vae is not None else [])]:
        m.requires_grad_(False)
    n = getattr(unet.config, "num_class_embeds", None)
    cond = (ClassConditioner(n - 1, "meta") if n else NoConditioner()) if kind == "unet2d" else ConfigOnlyConditioner()
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    return ModelBundle(kind, Denoiser(unet, schedule, sched_cfg["prediction_type"]), unet, schedule, sched_cfg, shape,
                       cond, vae=vae, components={"text_encoders": encoders}, source=model_cfg.pretrained)


def zeros_for_empty_prompt(path: Path, kind: str) -> bool:
    """The pipeline's ``force_zeros_for_empty_prompt`` (model_index.json): whether its unconditional branch for
    ``negative_prompt=None`` is zeros. StableDiffusionXLPipeline defaults to true when the folder does not say;
    StableDiffusionPipeline has no such option (the empty prompt's encoding)."""
    index = path / "model_index.json"
    config = json.loads(index.read_text()) if index.exists() else {}
    return bool(config.get("force_zeros_for_empty_prompt", kind == "sdxl"))


def bundle_from_pipeline(pipe) -> ModelBundle:
    """The networks of an opened stock StableDiffusion(XL)Pipeline as a bundle (same modules, shared weights):
    its UNet as a Denoiser with the pipeline's conditioner and VAE (pipelines traced step by step)."""
    sdxl = hasattr(pipe, "text_encoder_2")
    toks = [pipe.tokenizer, pipe.tokenizer_2] if sdxl else [pipe.tokenizer]
    encs = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else [pipe.text_encoder]
    unet, config = pipe.unet, dict(pipe.scheduler.config)
    res = unet.config.sample_size * pipe.vae_scale_factor
    schedule = NoiseSchedule.from_scheduler_config(config)
    pred = config.get("prediction_type", "epsilon")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    cond = TextConditioner(toks, encs, pipe.device, sdxl=sdxl, resolution=res,
                           force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)))
    return ModelBundle("sdxl" if sdxl else "sd", Denoiser(unet, schedule, pred), unet, schedule, config, shape, cond,
                       vae=pipe.vae, vae_scaling=pipe.vae.config.scaling_factor,
                       components={"tokenizers": toks, "text_encoders": encs})
