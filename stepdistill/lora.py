"""LoRA through peft: named adapters on one frozen base, switching them per call, and Diffusers-format
export / import (``pytorch_lora_weights.safetensors`` that a stock pipeline's ``load_lora_weights`` takes).

Export: ``get_peft_model_state_dict`` for the named adapter, saved through the pipeline class's
``save_lora_weights`` with ``unet_lora_adapter_metadata`` so that ``lora_alpha`` survives the round trip.
The keys stay in peft form (``...to_q.lora_A.weight``): with diffusers 0.42 the older advice of passing
them through ``convert_state_dict_to_diffusers`` (``lora.down``/``lora.up``) makes ``load_lora_weights``
silently skip every attention projection (measured: 45 of 77 layers loaded), while peft keys load all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .errors import UsageError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
MLP_TARGETS = ["fc_in", "fc1", "fc2", "emb", "fc_out"]


def _tuner_layers(net: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in net.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(net: nn.Module) -> list[str]:
    names: set[str] = set()
    for layer in _tuner_layers(net):
        names.update(getattr(layer, "lora_A", {}).keys())
    return sorted(names)


def add_lora(net: nn.Module, name: str, rank: int, alpha: float | None = None,
             target_modules: Sequence[str] | None = None, init: bool | str = True) -> None:
    """Add a named LoRA adapter (peft) to ``net``; Diffusers models use their own ``add_adapter``.

    ``init=False`` gives random, non-zero B matrices (tests: a zero-init adapter is a no-op and would
    make a round trip pass vacuously)."""
    from peft import LoraConfig, inject_adapter_in_model

    from diffusers.models.modeling_utils import ModelMixin

    is_diffusers = isinstance(net, ModelMixin)
    if target_modules is None:
        target_modules = UNET_TARGETS if is_diffusers else MLP_TARGETS
    names = [n for n, _ in net.named_modules()]
    targets = [t for t in target_modules if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise UsageError(f"LoRA targets {list(target_modules)} match no module of {type(net).__name__}; "
                         f"set lora.target_modules to names of its Linear/Conv layers")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        init_lora_weights=init)
    before = {id(p): p.requires_grad for p in net.parameters()}
    with several_adapters():
        if hasattr(net, "add_adapter"):  # Diffusers' PeftAdapterMixin (UNet2DModel has none: peft injects directly)
            net.add_adapter(config, adapter_name=name)  # (also makes it the only active adapter)
        else:
            inject_adapter_in_model(config, net, adapter_name=name)
    # the new adapter is trainable; everything else keeps its flag (add_adapter freezes earlier adapters)
    for p in net.parameters():
        p.requires_grad_(before.get(id(p), True))


@contextlib.contextmanager
def several_adapters() -> Iterator[None]:
    """Around adding a named adapter to a network that has others: several adapters on one base is the point here
    (student, fake score, experts), so peft's "Already found a `peft_config` attribute in the model. This will lead
    to having multiple adapters" warning is dropped; every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        yield


def lora_parameters(net: nn.Module, name: str) -> list[nn.Parameter]:
    """Parameters of one named adapter."""
    params = [p for n, p in net.named_parameters() if f".{name}." in n and "lora_" in n]
    if not params:
        raise UsageError(f"network has no LoRA adapter named {name!r} (has: {adapter_names(net)})")
    return params


@contextlib.contextmanager
def active_adapter(net: nn.Module, name: str | None, all_off: bool = False) -> Iterator[None]:
    """Run ``net`` with exactly one adapter active (``name``), or with all adapters off (``all_off``).

    Leaves every ``requires_grad`` flag as it was (peft's ``set_adapter`` would change them) and
    restores the previous selection afterwards. ``name=None`` and ``all_off=False`` is a no-op.
    """
    if name is None and not all_off:
        yield
        return
    layers = _tuner_layers(net)
    if not layers:
        if all_off:
            yield
            return
        raise RuntimeError(f"adapter {name!r} requested but the network has no LoRA layers")
    wanted = [(l, list(l.active_adapters) if all_off else [name], all_off) for l in layers]
    with _selection(wanted):
        yield


def checkpoint_keeping_adapters(module: nn.Module, *args):
    """Gradient checkpointing (non-reentrant) that recomputes ``module`` with the adapter selection it ran with.
    Views of one shared base switch adapters per call (:func:`active_adapter`) and switch back before the
    backward pass, so Diffusers' default checkpointing would recompute with another adapter (or none) and
    either fail or silently give the wrong gradients. Pass to ``enable_gradient_checkpointing``."""
    from torch.utils.checkpoint import checkpoint

    layers = _tuner_layers(module) if isinstance(module, nn.Module) else []
    recorded = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer in layers]
    flags = [(p, p.requires_grad) for p in module.parameters()] if isinstance(module, nn.Module) else []
    return checkpoint(module.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _selection(recorded, flags)))


@contextlib.contextmanager
def _selection(recorded, flags=()) -> Iterator[None]:
    """Put tuner layers back into a recorded (active adapters, disabled) selection, keeping requires_grad flags, or
    setting the recorded ``flags`` (parameter, requires_grad) of a forward pass: a network that ran frozen (the
    fake score in DMD2's generator term) must be recomputed frozen, or the recomputation saves other tensors."""
    current = [(layer, list(layer.active_adapters), layer.disable_adapters) for layer, _, _ in recorded]
    grads = [(p, p.requires_grad) for layer, _, _ in recorded for p in layer.parameters()]
    grads += [(p, p.requires_grad) for p, _ in flags]
    try:
        for layer, names, disabled in recorded:
            layer.set_adapter(names)
            layer.enable_adapters(not disabled)
        for p, flag in [*grads, *flags]:
            p.requires_grad_(flag)
        yield
    finally:
        for layer, names, disabled in current:
            layer.set_adapter(names)
            layer.enable_adapters(not disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


# ---- export / import -----------------------------------------------------------------------------
class _DropRecords(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextlib.contextmanager
def unet_lora_loading() -> Iterator[None]:
    """Around a stock pipeline's ``load_lora_weights(..., adapter_name=NAME)`` of a UNet-only LoRA (every LoRA
    stepdistill exports), one of several adapters: drops Diffusers' "No LoRA keys associated to
    CLIPTextModel(WithProjection) found with the prefix='text_encoder(_2)'" warning, which such a file always
    triggers, and peft's multiple-adapters warning (:func:`several_adapters`). Everything else, a UNet without LoRA
    keys included, still logs."""
    logger = logging.getLogger("diffusers.loaders.lora_base")
    drop = _DropRecords(r"^No LoRA keys associated to CLIPTextModel(WithProjection)? found with the "
                        r"prefix='text_encoder(_2)?'")
    logger.addFilter(drop)
    try:
        with several_adapters():
            yield
    finally:
        logger.removeFilter(drop)


def adapter_state_dict(net: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """peft state dict of one adapter, keys without the adapter name (as peft saves them)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=name).items()}


def adapter_metadata(net: nn.Module, name: str) -> dict:
    cfg = net.peft_config[name] if hasattr(net, "peft_config") else None
    if cfg is None:
        raise UsageError(f"no LoRA config for adapter {name!r}")
    d = cfg.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def save_diffusers_lora(unet: nn.Module, name: str, out_dir: Path, pipeline_cls=None) -> Path:
    """Write ``out_dir/pytorch_lora_weights.safetensors`` in the format ``load_lora_weights`` expects."""
    from diffusers import StableDiffusionPipeline

    pipeline_cls = pipeline_cls or StableDiffusionPipeline
    pipeline_cls.save_lora_weights(out_dir, unet_lora_layers=adapter_state_dict(unet, name),
                                   unet_lora_adapter_metadata=adapter_metadata(unet, name))
    return Path(out_dir) / LORA_WEIGHT_NAME


def save_peft_lora(net: nn.Module, name: str, out_dir: Path) -> Path:
    """For networks without a Diffusers LoRA loader (UNet2DModel, MLP): peft keys + the LoraConfig."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = adapter_metadata(net, name)
    save_file(adapter_state_dict(net, name), out_dir / LORA_WEIGHT_NAME,
              metadata={"lora_config": json.dumps(meta, default=str)})
    return out_dir / LORA_WEIGHT_NAME


def load_peft_lora(net: nn.Module, path: Path, name: str = "default") -> None:
    """Inverse of :func:`save_peft_lora`; a LoRA that does not match the network is a UsageError."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    from .userfiles import check_safetensors

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.exists():
        raise UsageError(f"LoRA file not found: {path}")
    check_safetensors(path, fix="export the LoRA again")
    with safe_open(str(path), "pt") as f:
        try:
            meta = json.loads((f.metadata() or {}).get("lora_config", "{}"))
        except json.JSONDecodeError:
            meta = {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if not meta:
        raise UsageError(f"{path} carries no lora_config metadata; it was not written by stepdistill")
    cfg = LoraConfig(r=meta["r"], lora_alpha=meta["lora_alpha"], target_modules=meta["target_modules"])
    hint = "; use a LoRA trained for this base model"
    add_lora(net, name, cfg.r, cfg.lora_alpha, list(cfg.target_modules))
    try:
        result = set_peft_model_state_dict(net, sd, adapter_name=name)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), "shape mismatch")
        raise UsageError(f"LoRA {path} does not match the model ({detail[:160]}){hint}") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UsageError(f"LoRA {path} does not match the model ({len(unexpected)} unexpected keys, e.g. "
                         f"{unexpected[0]}){hint}")
