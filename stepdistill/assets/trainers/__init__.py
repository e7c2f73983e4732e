"""Pretrain methods that only build shipped assets (``stepdistill assets build``): the digit classifier,
the digits-sd VAE and CLIP text encoder, the open_clip CLIP behind the offline CLIP score. They run on the
shared loop (:mod:`stepdistill.training`) and resolve by ``method.name`` through the table below, which
:mod:`stepdistill.registry` reads but does not list to users."""

from __future__ import annotations

# method.name -> "module:Class"; one line per method (imported lazily)
METHODS: dict[str, str] = {
    "classifier": "stepdistill.assets.trainers.classifier:ClassifierMethod",
    "vae": "stepdistill.assets.trainers.vae:VAEMethod",
    "clip_text": "stepdistill.assets.trainers.clip_text:ClipTextMethod",
    "open_clip": "stepdistill.assets.trainers.openclip:OpenClipMethod",
}
