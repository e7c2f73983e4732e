"""Conditioners: how raw conditions (class ids and/or prompts) become a :class:`Cond` of network keyword arguments
for each model family -- ``class_labels`` for pixel UNets and toy MLPs, CLIP text encodings (+ SDXL's added
conditions) for Stable Diffusion. Family differences live here, never inside losses or samplers."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .denoisers import Cond


class Conditioner:
    """Turns raw conditions (class ids and/or prompts) into a :class:`Cond` for the family's network."""

    conditional: bool = True

    def encode(self, labels: torch.Tensor | None = None, prompts: Sequence[str] | None = None) -> Cond:
        raise NotImplementedError


class NoConditioner(Conditioner):
    conditional = False

    def encode(self, labels=None, prompts=None) -> Cond:
        return Cond({}, None, labels)


class ConfigOnlyConditioner(Conditioner):
    """The conditioner of a text-to-image network built from its config alone (``models.meta_bundle``, dry runs):
    without text-encoder weights there are no prompt encodings."""

    def encode(self, labels=None, prompts=None) -> Cond:
        from .errors import UsageError

        raise UsageError("prompts cannot be encoded by a model built from its config alone (no weights were read)")


class ClassConditioner(Conditioner):
    """``class_labels`` kwarg; id ``num_classes`` is the unconditional (null) class for CFG."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.num_classes, self.device = num_classes, device

    def encode(self, labels=None, prompts=None) -> Cond:
        if labels is None:
            raise ValueError("class-conditional model needs labels")
        labels = labels.to(self.device)
        null = torch.full_like(labels, self.num_classes)
        return Cond({"class_labels": labels}, {"class_labels": null}, labels)


class TextConditioner(Conditioner):
    """CLIP text encoder(s) -> ``encoder_hidden_states`` (+ SDXL ``added_cond_kwargs``). The unconditional branch
    is what the stock pipeline uses for ``negative_prompt=None``: the empty prompt's encoding (Stable Diffusion),
    or zeros for the hidden states and pooled embedding when ``force_zeros_for_empty_prompt`` (SDXL's pipeline
    config, true for SDXL base; the added time ids stay the conditional ones). Embeddings are cached per prompt."""

    def __init__(self, tokenizers: list, text_encoders: list, device, sdxl: bool = False,
                 resolution: int | None = None, force_zeros_for_empty_prompt: bool = False):
        self.tokenizers, self.text_encoders, self.device, self.sdxl = tokenizers, text_encoders, device, sdxl
        self.resolution = resolution
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @torch.no_grad()
    def _embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if prompt not in self._cache:
            hidden, pooled = [], None
            for tok, enc in zip(self.tokenizers, self.text_encoders):
                ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(self.device)
                if self.sdxl:  # SDXL: penultimate hidden states, pooled output of the last encoder
                    out = enc(ids, output_hidden_states=True)
                    hidden.append(out.hidden_states[-2])
                    pooled = out[0]
                else:
                    hidden.append(enc(ids)[0])
            self._cache[prompt] = (torch.cat(hidden, dim=-1)[0], None if pooled is None else pooled[0])
        return self._cache[prompt]

    def _kwargs(self, prompts: Sequence[str]) -> dict:
        embs = [self._embed(p) for p in prompts]
        kw: dict[str, Any] = {"encoder_hidden_states": torch.stack([e[0] for e in embs])}
        if self.sdxl:
            r = self.resolution
            time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=kw["encoder_hidden_states"].dtype,
                                    device=self.device).repeat(len(prompts), 1)
            kw["added_cond_kwargs"] = {"text_embeds": torch.stack([e[1] for e in embs]), "time_ids": time_ids}
        return kw

    def pooled(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, D) pooled embedding of the first text encoder (prompt routers)."""
        return pooled_prompt_embedding(self.tokenizers[0], self.text_encoders[0], prompts)

    def encode(self, labels=None, prompts=None) -> Cond:
        if prompts is None:
            raise ValueError("text-conditional model needs prompts")
        prompts = list(prompts)
        return Cond(self._kwargs(prompts), self._null_kwargs(len(prompts)), labels)

    def _null_kwargs(self, n: int) -> dict:
        """The unconditional branch of n samples (see the class docstring)."""
        kw = self._kwargs([""] * n)
        if self.force_zeros_for_empty_prompt:
            kw["encoder_hidden_states"] = torch.zeros_like(kw["encoder_hidden_states"])
            if "added_cond_kwargs" in kw:
                added = kw["added_cond_kwargs"]
                kw["added_cond_kwargs"] = {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}
        return kw



@torch.no_grad()
def pooled_prompt_embedding(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """(B, D) CLIP pooled text embedding (the end-of-text token's final hidden state) of each prompt: what a
    prompt router partitions. The same call for a stock pipeline's first tokenizer / text encoder and for a
    :class:`TextConditioner`'s."""
    device = next(text_encoder.parameters()).device
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    out = text_encoder(ids)
    pooled = getattr(out, "pooler_output", None)
    return (pooled if pooled is not None else out[0]).float().cpu()
