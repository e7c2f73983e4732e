"""Trainers: the shared loop (``base``) and one module per method."""

from __future__ import annotations

from .base import Context, Method, Phase, Trainer


# method.name -> "module:Class"; one line per method (imported lazily)
METHODS: dict[str, str] = {
    "denoising": "stepdistill.trainers.denoising:DenoisingMethod",
    "dmd": "stepdistill.trainers.dmd:DMDMethod",
    "tscd": "stepdistill.trainers.tscd:TSCDMethod",
    "classifier": "stepdistill.trainers.classifier:ClassifierMethod",
    "vae": "stepdistill.trainers.vae:VAEMethod",
    "clip_text": "stepdistill.trainers.clip_text:ClipTextMethod",
    "open_clip": "stepdistill.trainers.openclip:OpenClipMethod",
}


def method_class(name: str) -> type[Method]:
    """The Method class registered for a config's ``method.name``."""
    import importlib

    module, _, cls = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Context", "Method", "Phase", "Trainer", "method_class"]
