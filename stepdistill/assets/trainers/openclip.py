"""A small CLIP (Radford et al. 2021) built with open_clip's own model classes, trained contrastively on
digit images and their prompts: the ``digits-clip`` asset behind the offline CLIP score.

The open_clip model config (``model.arch``) is registered with ``open_clip.add_model_config`` under
``method.model_name``; its text tower reads CLIP's BPE cut to ``method.num_merges`` merges (an HF
``CLIPTokenizer`` from :mod:`stepdistill.tokenizer`, which open_clip opens through ``hf_tokenizer_name``),
so the token embedding stays small. Same-digit pairs in a batch are all positives
(:func:`losses.contrastive` with labels). Export: an open_clip folder (``NAME.json`` config, tokenizer files,
``open_clip_model.safetensors``, ``open_clip_config.json`` for ``local-dir:`` loading); the asset
recipe (``stepdistill.eval.digits_clip``) measures it.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ... import losses as L
from ...config import MethodConfig
from ...data import build_data
from ...errors import UsageError
from ...eval.clip_score import TOKENIZER_DIR, WEIGHTS, quiet_open_clip, register
from ...training import Method, Phase
from .classifier import AugmentConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipConfig(MethodConfig):
    """A small open_clip CLIP (Radford et al. 2021) on digit images and prompts: the ``digits-clip`` asset that
    gives CLIP scores offline. ``model.arch`` is the open_clip model config (embed_dim, vision_cfg, text_cfg),
    registered with ``open_clip.add_model_config`` as ``model_name``."""

    name: Literal["open_clip"] = "open_clip"
    model_name: str = Field("digits-clip", description="name the model config is registered under in open_clip")
    num_merges: int = Field(8192, ge=1, description="first M merges of CLIP's BPE (HF tokenizer, vocabulary "
                                                    "512 + M + 2); open_clip's text tower is sized to it")
    augment: AugmentConfig | None = Field(AugmentConfig(), description="image jitter (classifier.augment); null: none")
    loss_weights: dict[str, float] = Field(default_factory=lambda: {"contrastive": 1.0})


class OpenClipMethod(Method):
    name = "open_clip"
    kind = "pretrain"
    config = OpenClipConfig
    export_network = "clip"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        import open_clip

        from ...tokenizer import build_clip_tokenizer

        mc, arch = cfg.method, dict(cfg.model.arch or {})
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(arch):
            raise UsageError("model.arch for open_clip is an open_clip model config: embed_dim, vision_cfg, text_cfg")
        if getattr(cfg.data, "empty_prompt_prob", 0.0) > 0:
            raise UsageError("open_clip pairs each image with its own prompt; set data.empty_prompt_prob=0")
        self.data = build_data(cfg.data)  # no bundle: x0 are images in [-1, 1]
        self._tmp = Path(tempfile.mkdtemp(prefix="stepdistill-open_clip-"))
        ctx_len = int(arch["text_cfg"].get("context_length", 16))
        self.hf_tokenizer = build_clip_tokenizer(mc.num_merges, ctx_len, folder=self._tmp / TOKENIZER_DIR)
        arch["text_cfg"] = {**arch["text_cfg"], "vocab_size": len(self.hf_tokenizer), "context_length": ctx_len,
                            "hf_tokenizer_name": TOKENIZER_DIR}
        self.arch = arch
        register(arch, mc.model_name, self._tmp)
        with quiet_open_clip():  # a fresh model: no pretrained weights, on purpose
            self.clip = open_clip.create_model(mc.model_name, device=ctx.device).train()
        self.tokenizer = open_clip.get_tokenizer(mc.model_name)
        self.mean = torch.tensor(OPENAI_MEAN, device=ctx.device)[None, :, None, None]
        self.std = torch.tensor(OPENAI_STD, device=ctx.device)[None, :, None, None]

    def networks(self):
        return {"clip": self.clip}

    def phases(self):
        return [Phase("clip", ("clip",))]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> open_clip input (RGB, OpenAI mean / std, as ``CLIPScorer``)."""
        x = (images / 2 + 0.5).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def batch(self, phase):
        from ...classifier import augment

        s = self.data.sample(self.cfg.train.batch_size, self.ctx.generator)
        x = s.x0
        aug = self.cfg.method.augment
        if aug is not None:
            x = augment(x, self.ctx.generator, **aug.model_dump())
        dev = self.ctx.device
        return self.normalize(x.to(dev)), self.tokenizer(list(s.prompts)).to(dev), s.labels.to(dev)

    def losses(self, batch, phase):
        images, ids, labels = batch
        img, txt, scale = self.clip(images, ids)[:3]  # normalised features, exp(logit_scale)
        logits = scale * img @ txt.T  # (B images, B texts)
        match = (labels[logits.argmax(dim=1)] == labels).float()
        return {"contrastive": L.contrastive(logits, labels), "log/match": match}

    def after_phase(self, phase, step):
        with torch.no_grad():  # CLIP clamps the temperature at 100
            self.clip.logit_scale.clamp_(0, math.log(100))

    def export(self, out_dir: Path) -> None:
        from safetensors.torch import save_file

        from ...tokenizer import save_tokenizer

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = self.cfg.method.model_name
        (out_dir / f"{name}.json").write_text(json.dumps(self.arch, indent=2))
        pre = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
        (out_dir / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": self.arch, "preprocess_cfg": pre}, indent=2))
        save_tokenizer(self.hf_tokenizer, out_dir / TOKENIZER_DIR)
        state = {k: v.detach().cpu().contiguous() for k, v in self.clip.state_dict().items()}
        save_file(state, out_dir / WEIGHTS)
