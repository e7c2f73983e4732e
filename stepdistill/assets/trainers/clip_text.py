"""A small CLIP (Radford et al. 2021) trained contrastively on (image, prompt) pairs, for its text encoder:
Stable Diffusion conditions on a frozen CLIP text encoder, and this is how digits-sd gets one.

The tokenizer is CLIP's BPE cut to ``method.num_merges`` merges (:mod:`stepdistill.tokenizer`); the model
is a stock ``transformers.CLIPModel`` with a tiny vision tower. Same-digit pairs in a batch all count as
positives (:func:`losses.contrastive` with labels), so the prompts of one digit, whatever their template,
meet at one text embedding. Export: ``text_encoder/`` (``CLIPTextModel``), ``tokenizer/`` and ``clip/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ... import losses as L
from ...config import MethodConfig
from ...data import build_data
from ...errors import UsageError
from ...tokenizer import build_clip_tokenizer, save_tokenizer
from ...training import Method, Phase


class ClipTextConfig(MethodConfig):
    """CLIP-style contrastive pretraining (Radford et al. 2021) of a small text encoder on (image, prompt)
    pairs; ``model.arch`` = {text: CLIPTextConfig kwargs, vision: CLIPVisionConfig kwargs, projection_dim}."""

    name: Literal["clip_text"] = "clip_text"
    num_merges: int = Field(8192, ge=1, description="first M merges of CLIP's BPE (vocabulary 512 + M + 2)")
    max_length: int = Field(16, ge=4, description="tokenizer model_max_length = text max_position_embeddings")
    loss_weights: dict[str, float] = Field(default_factory=lambda: {"contrastive": 1.0})


class ClipTextMethod(Method):
    name = "clip_text"
    kind = "pretrain"
    config = ClipTextConfig
    export_network = "clip"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        from transformers import CLIPConfig, CLIPModel

        mc, arch = cfg.method, dict(cfg.model.arch or {})
        if getattr(cfg.data, "empty_prompt_prob", 0.0) > 0:
            raise UsageError("clip_text pairs each image with its own prompt; set data.empty_prompt_prob=0")
        unknown = set(arch) - {"text", "vision", "projection_dim"}
        if unknown:
            raise UsageError(f"model.arch for clip_text takes text, vision, projection_dim (not {sorted(unknown)})")
        self.data = build_data(cfg.data)  # no bundle: x0 are images in [-1, 1]
        probe = self.data.sample(1, torch.Generator().manual_seed(0))
        if probe.x0 is None or probe.prompts is None:
            raise UsageError("clip_text needs data with images and prompts (e.g. data.name=digits_sd)")
        self.tokenizer = build_clip_tokenizer(mc.num_merges, mc.max_length)
        tok = self.tokenizer
        text = {**arch.get("text", {}), "vocab_size": len(tok), "max_position_embeddings": mc.max_length,
                "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        vision = {"image_size": probe.x0.shape[-1], "num_channels": probe.x0.shape[1], **arch.get("vision", {})}
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch.get("projection_dim", 64))
        self.clip = CLIPModel(config).to(ctx.device).train()
        self._ids: dict[str, torch.Tensor] = {}

    def networks(self):
        return {"clip": self.clip}

    def phases(self):
        return [Phase("clip", ("clip",))]

    def token_ids(self, prompts) -> torch.Tensor:
        """(B, max_length) ids, padded with <|endoftext|> as the pipeline's tokenizer call does."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._ids]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self._ids.update(zip(missing, ids))
        return torch.stack([self._ids[p] for p in prompts])

    def batch(self, phase):
        s = self.data.sample(self.cfg.train.batch_size, self.ctx.generator)
        dev = self.ctx.device
        return self.token_ids(s.prompts).to(dev), s.x0.to(dev), s.labels.to(dev)

    def losses(self, batch, phase):
        ids, images, labels = batch
        logits = self.clip(input_ids=ids, pixel_values=images).logits_per_image  # (B images, B texts)
        match = (labels[logits.argmax(dim=1)] == labels).float()
        return {"contrastive": L.contrastive(logits, labels), "log/match": match}

    def export(self, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        self.clip.save_pretrained(out_dir / "clip")
        self.clip.text_model.save_pretrained(out_dir / "text_encoder")
        save_tokenizer(self.tokenizer, out_dir / "tokenizer")
