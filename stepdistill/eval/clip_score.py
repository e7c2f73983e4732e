"""CLIP score through open_clip: 100 * max(cos(image embedding, text embedding), 0) (Hessel et al. 2021,
"CLIPScore", with torchmetrics' scale of 100 instead of 2.5).

The model and its weights are configurable (``model_name`` + ``pretrained``: an open_clip tag such as
``ViT-B-32`` / ``openai``, fetched by open_clip on a connected machine, or local weights: a folder in the
Hugging Face Hub layout, ``open_clip_config.json`` + ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``, or a single weights file of a named architecture). The
default, ``digits-clip``, is the small CLIP the project trains on the digits-sd images and prompts
(``stepdistill assets build digits-clip``): its open_clip config is registered with
``open_clip.add_model_config`` from the asset folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UsageError

DIGITS_CLIP = "digits-clip"
WEIGHTS = "open_clip_model.safetensors"
HUB_CONFIG = "open_clip_config.json"  # open_clip's Hugging Face Hub layout: this config beside one of HUB_WEIGHTS
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_DIR = "."  # tokenizer files sit beside the weights, as open_clip's local-dir: layout expects


def clip_score_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score ``100 * max(cos, 0)`` of matching rows of ``(N, D)`` image / text embeddings."""
    cos = torch.nn.functional.cosine_similarity(image_emb.double(), text_emb.double(), dim=-1)
    return 100 * cos.clamp(min=0)


def resolved_config(arch: dict, folder: Path) -> dict:
    """An open_clip model config with ``text_cfg.hf_tokenizer_name`` made absolute under ``folder`` (open_clip
    opens it with ``AutoTokenizer.from_pretrained``, which would resolve it against the working directory)."""
    text = dict(arch["text_cfg"])
    name = text.get("hf_tokenizer_name")
    if name and not Path(name).is_absolute() and (Path(folder) / name).exists():
        text["hf_tokenizer_name"] = str((Path(folder) / name).resolve())
    return {**arch, "text_cfg": text}


def register(arch: dict, name: str, folder: Path) -> None:
    """``open_clip.add_model_config`` of ``arch`` as ``name`` (paths resolved under ``folder``); registering a
    name again replaces the earlier config."""
    import open_clip

    with tempfile.TemporaryDirectory(prefix="stepdistill-open_clip-") as tmp:  # open_clip reads it at once
        reg = Path(tmp) / f"{name}.json"
        reg.write_text(json.dumps(resolved_config(arch, folder)))
        open_clip.add_model_config(reg)


def register_config(folder: Path, name: str = DIGITS_CLIP) -> None:
    """Register the open_clip model config ``folder/NAME.json`` (as the digits-clip asset and stepdistill's
    open_clip exports ship it)."""
    cfg = Path(folder) / f"{name}.json"
    fix = f"rebuild it with 'stepdistill assets build {name}'" if name == DIGITS_CLIP else "export it again"
    if not cfg.is_file():
        raise UsageError(f"{folder} lacks {cfg.name}; {fix}")
    try:
        arch = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        raise UsageError(f"{cfg} is not valid JSON; {fix}") from None
    register(arch, name, Path(folder))


def hub_weights(folder: Path) -> Path | None:
    """The weights of an open_clip folder in Hugging Face Hub layout (``open_clip_config.json`` beside them)."""
    return next((Path(folder) / w for w in HUB_WEIGHTS if (Path(folder) / w).is_file()), None)


def local_model(model_name: str | None, pretrained: str) -> tuple[str, str | None, dict | None]:
    """``(model name, pretrained, preprocess config)`` for ``open_clip.create_model`` from local weights: a folder
    with ``NAME.json`` and open_clip_model.safetensors (a stepdistill export), a Hub-layout folder
    (``open_clip_config.json`` and its weights, opened as ``local-dir:``), or a weights file (its architecture:
    ``model_name``, open_clip's own or, when open_clip does not know it, the ``open_clip_config.json`` beside the
    file, whose preprocessing then applies too)."""
    import open_clip

    path = Path(pretrained).expanduser()
    layout = f"{HUB_CONFIG} with {' or '.join(HUB_WEIGHTS)} (Hugging Face Hub layout)"
    if path.is_dir():
        if model_name and (path / f"{model_name}.json").is_file():
            register_config(path, model_name)
            return model_name, str(path / WEIGHTS), None
        if (path / HUB_CONFIG).is_file():
            if hub_weights(path) is None:
                raise UsageError(f"{path} has {HUB_CONFIG} but no weights: expected {' or '.join(HUB_WEIGHTS)}")
            return f"local-dir:{path.resolve()}", None, None
        own = f", or {model_name}.json with {WEIGHTS}" if model_name else ""
        raise UsageError(f"--clip-pretrained {path}: not an open_clip folder; expected {layout}{own}")
    if path.is_file():
        if model_name is None:
            raise UsageError(f"--clip-pretrained {path} is a weights file: name its architecture with --clip-model "
                             f"NAME, or give the folder with {HUB_CONFIG}")
        if open_clip.get_model_config(model_name) is None and (path.parent / HUB_CONFIG).is_file():
            try:
                hub = json.loads((path.parent / HUB_CONFIG).read_text())
                register(hub["model_cfg"], model_name, path.parent)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{path.parent / HUB_CONFIG} has no open_clip model_cfg") from None
            return model_name, str(path), hub.get("preprocess_cfg") or None
        return model_name, str(path), None
    if model_name is None:
        raise UsageError(f"--clip-pretrained {pretrained}: no such file or folder (an open_clip tag needs "
                         f"--clip-model NAME)")
    return model_name, pretrained, None  # an open_clip tag (e.g. openai), fetched by open_clip


@contextlib.contextmanager
def quiet_open_clip():
    """open_clip reports through the root logger (e.g. "No pretrained weights loaded" for a fresh model)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def load_clip(model_name: str | None = DIGITS_CLIP, pretrained: str | None = None, device="cpu"):
    """(model, tokenizer) in eval mode. ``digits-clip`` with ``pretrained=None`` takes the shipped asset;
    ``pretrained``: an open_clip tag or local weights (:func:`local_model`)."""
    import open_clip

    preprocess = None
    if pretrained is None:
        if model_name in (None, DIGITS_CLIP):
            from .. import assets

            folder = assets.path(DIGITS_CLIP)
            register_config(folder)
            model_name, pretrained = DIGITS_CLIP, str(folder / WEIGHTS)
    else:
        model_name, pretrained, preprocess = local_model(model_name, str(pretrained))
    try:
        with quiet_open_clip():
            model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                           require_pretrained=True, force_preprocess_cfg=preprocess)
            tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as e:  # open_clip raises RuntimeError / FileNotFoundError / ValueError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"cannot load CLIP {model_name!r} (pretrained={pretrained!r}): {first}") from None
    return model.eval(), tokenizer


class CLIPScorer:
    """Image and prompt embeddings of one open_clip model; ``score(images, prompts)`` per sample."""

    def __init__(self, model_name: str | None = DIGITS_CLIP, pretrained: str | None = None, device="cpu"):
        self.name = (model_name or DIGITS_CLIP) if pretrained is None else \
            f"{model_name or 'open_clip'}:{Path(str(pretrained)).name}"
        self.device = torch.device(device)
        self.model, self.tokenizer = load_clip(model_name, pretrained, self.device)
        cfg = getattr(self.model.visual, "preprocess_cfg", {})
        size = getattr(self.model.visual, "image_size", 224)
        self.size = size if isinstance(size, int) else size[0]
        self.mean = torch.tensor(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))[None, :, None, None]
        self.std = torch.tensor(cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))[None, :, None, None]
        self._text: dict[str, torch.Tensor] = {}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (B, C, H, W) -> the model's input: RGB, resized (bicubic), normalised."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if (h, w) != (self.size, self.size):
            side = min(h, w)  # centre crop to a square, then resize, as open_clip's transform
            top, left = (h - side) // 2, (w - side) // 2
            x = x[..., top:top + side, left:left + side]
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True,
                                                align_corners=False).clamp(0, 1)
        return ((x - self.mean) / self.std).to(self.device)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in self._text})
        if new:
            emb = self.model.encode_text(self.tokenizer(new).to(self.device)).float()
            for p, e in zip(new, torch.nn.functional.normalize(emb, dim=-1).cpu()):
                self._text[p] = e
        return torch.stack([self._text[p] for p in prompts])

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-sample CLIP score of images (B, C, H, W) in [0, 1] against their prompts."""
        return clip_score_from_embeddings(self.image_embeddings(images), self.text_embeddings(prompts))
