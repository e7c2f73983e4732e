"""Pretrains the digit classifier (``stepdistill/classifier.py``) on the shared loop: cross-entropy on
augmented digits of the train split. Its held-out accuracy is measured when the asset is built."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from ...classifier import augment, build_classifier, save_classifier
from ...config import MethodConfig, Strict
from ...data import build_data
from ...errors import UsageError
from ...training import Method, Phase


class AugmentConfig(Strict):
    """Mild random affine jitter and pixel noise (classifier.augment)."""

    max_shift: float = Field(1.5, ge=0, description="pixels")
    max_rotate: float = Field(10.0, ge=0, description="degrees")
    max_scale: float = Field(0.1, ge=0, lt=1, description="relative")
    noise_std: float = Field(0.1, ge=0)


class ClassifierConfig(MethodConfig):
    """The digit classifier (stepdistill/classifier.py): cross-entropy on augmented train digits; ``model.arch``
    holds DigitClassifier kwargs."""

    name: Literal["classifier"] = "classifier"
    augment: AugmentConfig = AugmentConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    loss_weights: dict[str, float] = Field(default_factory=lambda: {"ce": 1.0})


class ClassifierMethod(Method):
    name = "classifier"
    kind = "pretrain"
    config = ClassifierConfig
    export_network = "classifier"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        if cfg.data.name != "digits":
            raise UsageError(f"method.name=classifier trains on data.name=digits, not {cfg.data.name!r}")
        if cfg.model.pretrained is not None:
            raise UsageError("method.name=classifier builds its network from model.arch; unset model.pretrained")
        self.data = build_data(cfg.data)
        self.net = build_classifier(cfg.model.arch).to(ctx.device).train()

    def networks(self):
        return {"classifier": self.net}

    def phases(self):
        return [Phase("classifier", ("classifier",))]

    def batch(self, phase):
        s = self.data.sample(self.cfg.train.batch_size, self.ctx.generator)
        a = self.cfg.method.augment
        x = augment(s.x0, self.ctx.generator, a.max_shift, a.max_rotate, a.max_scale, a.noise_std)
        return x.to(self.ctx.device), s.labels.to(self.ctx.device)

    def losses(self, batch, phase):
        x, y = batch
        logits = self.net.logits(x)
        ce = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=self.cfg.method.label_smoothing)
        return {"ce": ce, "log/acc": (logits.argmax(1) == y).float()}

    def export(self, out_dir: Path) -> None:
        save_classifier(self.net, out_dir)
