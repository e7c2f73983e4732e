"""images: a local image folder as training data (``data.name: images``) -- captioned images for text-to-image
models, class subfolders for class-conditional ones. x0 are latents (posterior draws of the teacher's VAE, from
the latent cache of :mod:`.latent_cache`) for latent models, images in [-1, 1] for pixel models.

Layouts, checked in this order:

1. Hugging Face ``imagefolder``: ``metadata.jsonl`` at the top, one JSON object a line with ``file_name`` (a path
   inside the folder) and a caption column (``data.caption_column``, default ``text``): a string, or a list of
   strings of which each draw picks one.
2. Caption sidecars: images at the top level, each with a ``.txt`` of the same stem holding its caption.
3. Class subfolders: one subfolder per class (images anywhere below it); class ids follow the sorted folder names,
   and the folder name (``_`` read as a space) is the prompt, so text models can train on it too.

Images without a caption are left out (one line on stderr). The folder is read with PIL and ``json`` rather than
the ``datasets`` library: ``datasets`` is not a dependency of this package (pyproject.toml), and these layouts need
only a directory listing, a JSON-lines reader and PIL, which is one. Nothing is fetched over the network.

Preprocessing, as Diffusers' text-to-image training scripts: the shorter side is resized to ``data.resolution``
(bicubic; null: the model's native resolution), then a center or random square crop, a horizontal flip with
probability ``data.hflip``, RGB (gray for one-channel pixel models) scaled to [-1, 1].
``data.empty_prompt_prob`` replaces a drawn prompt by ``""`` (caption dropout for CFG); labels are kept.

Latent models with center crops encode every image once, center crop and (with ``hflip > 0``) its mirror image,
into the latent cache; later runs reuse it (see :mod:`.latent_cache` for the key). Random crops cannot be cached:
``crop: random`` encodes each draw's images through the VAE as it is drawn (slow; for small folders). Images
that cannot be decoded are skipped, counted, and named once on stderr; without a cache they are found by decoding
every image when the source is built.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UsageError
from ..userfiles import inside, read_text
from .base import DataSource, Sample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LAYOUTS = ("expected an imagefolder (images + metadata.jsonl with file_name and a caption column), images with "
           ".txt caption sidecars, or one subfolder of images per class")


@dataclass
class Item:
    path: Path
    name: str  # path relative to the folder (posix), what the cache key and messages name
    captions: list[str]
    label: int | None = None


# ---- the folder -----------------------------------------------------------------------------------
def scan_folder(folder: Path, caption_column: str = "text") -> tuple[list[Item], list[str]]:
    """The folder's items in sorted name order and, for class folders, the class names; one UsageError line for a
    missing or empty folder."""
    if not folder.is_dir():
        raise UsageError(f"image folder not found: {folder} (data.folder); {LAYOUTS}")
    if (folder / "metadata.jsonl").is_file():
        items, classes = _imagefolder(folder, caption_column), []
    elif any(_is_image(p) for p in folder.iterdir()):
        items, classes = _sidecars(folder), []
    else:
        items, classes = _class_folders(folder)
    if not items:
        raise UsageError(f"no captioned images in {folder} (data.folder); {LAYOUTS}")
    return sorted(items, key=lambda it: it.name), classes


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES


def _imagefolder(folder: Path, column: str) -> list[Item]:
    meta = folder / "metadata.jsonl"
    items, uncaptioned = [], []
    for n, line in enumerate(read_text(meta, "metadata.jsonl").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{meta} line {n} is not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise UsageError(f"{meta} line {n} has no file_name (the image's path inside {folder})")
        path = inside(folder, row["file_name"], "metadata.jsonl file_name")
        captions = row.get(column)
        captions = [captions] if isinstance(captions, str) else captions
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise UsageError(f"{meta} line {n}: column {column!r} must be a caption or a list of captions "
                             f"(data.caption_column names the column)")
        captions = [c.strip() for c in captions if c.strip()]
        if path.is_file() and captions:
            items.append(Item(path, path.relative_to(folder).as_posix(), captions))
        elif path.is_file():
            uncaptioned.append(row["file_name"])
    _report(uncaptioned, "images without a caption", folder)
    return items


def _sidecars(folder: Path) -> list[Item]:
    items, uncaptioned = [], []
    for p in sorted(folder.iterdir()):
        if not _is_image(p):
            continue
        txt = p.with_suffix(".txt")
        caption = read_text(txt, "caption file").strip() if txt.is_file() else ""
        if caption:
            items.append(Item(p, p.name, [caption]))
        else:
            uncaptioned.append(p.name)
    _report(uncaptioned, "images without a caption", folder)
    return items


def _class_folders(folder: Path) -> tuple[list[Item], list[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    items = [Item(p, p.relative_to(folder).as_posix(), [name.replace("_", " ")], label)
             for label, name in enumerate(classes) for p in sorted((folder / name).rglob("*")) if _is_image(p)]
    return items, classes


def _report(names: Sequence[str], what: str, folder: Path) -> None:
    if names:
        print(f"stepdistill: skipped {len(names)} {what} in {folder} (first: {names[0]})", file=sys.stderr)


# ---- one image --------------------------------------------------------------------------------------
def load_image(path: Path, resolution: int, mode: str = "RGB", crop: tuple[float, float] | None = None,
               flip: bool = False) -> torch.Tensor | None:
    """(C, R, R) in [-1, 1]: shorter side resized to R, a square crop (``crop``: its offsets as fractions of the
    slack; None: centered), mirrored if ``flip``. None when the file cannot be decoded."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    im = im.resize(size, Image.Resampling.BICUBIC)
    fx, fy = crop if crop is not None else (0.5, 0.5)
    left, top = round((size[0] - resolution) * fx), round((size[1] - resolution) * fy)
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()) / 127.5 - 1.0
    return (x[None] if x.ndim == 2 else x.permute(2, 0, 1)).contiguous()  # (H, W[, C]) -> (C, R, R)


# ---- the source ---------------------------------------------------------------------------------------
class ImageFolderSource(DataSource):
    """Images of a local folder with their captions / class labels (layouts and preprocessing: module docstring)."""

    def __init__(self, cfg, bundle=None):
        self.folder = Path(cfg.folder).expanduser()
        items, self.classes = scan_folder(self.folder, cfg.caption_column)
        self.crop, self.hflip, self.empty_prompt_prob = cfg.crop, cfg.hflip, cfg.empty_prompt_prob
        self.vae = getattr(bundle, "vae", None)
        self.scaling = getattr(bundle, "vae_scaling", 1.0)
        self.resolution = cfg.resolution or native_resolution(bundle)
        channels = self.vae.config.in_channels if self.vae is not None else \
            (bundle.sample_shape[0] if bundle is not None else 3)
        if channels not in (1, 3):
            raise UsageError(f"the model takes {channels}-channel images; an image folder gives RGB or gray")
        self.mode = "RGB" if channels == 3 else "L"
        self._check_classes(bundle)
        self.cache = None
        readable = self._readable(items, cfg.cache_dir)
        kept = set(readable)
        _report([it.name for i, it in enumerate(items) if i not in kept], "unreadable images", self.folder)
        self.items = [items[i] for i in readable]
        self.positions = readable  # each item's position in the cache's file list
        if not self.items:
            raise UsageError(f"no readable images in {self.folder} (data.folder); {LAYOUTS}")
        self.labels = torch.tensor([-1 if it.label is None else it.label for it in self.items])

    def _readable(self, items: list[Item], cache_dir: str | None) -> list[int]:
        """Positions of the items that decode: found while the latent cache is completed (latent models, center
        crops), else by decoding every image once."""
        if self.vae is None or self.crop != "center":
            return [i for i, it in enumerate(items) if load_image(it.path, 8, self.mode) is not None]
        from .latent_cache import LatentCache, default_root

        root = Path(cache_dir).expanduser() if cache_dir else default_root()
        self.cache = LatentCache.open(root, self.vae, self.scaling, [it.path for it in items],
                                      [it.name for it in items], self.resolution, flip=self.hflip > 0)
        self.cache.build(lambda path: load_image(path, self.resolution, self.mode))
        return self.cache.positions

    def _check_classes(self, bundle) -> None:
        from ..conditioners import ClassConditioner

        cond = getattr(bundle, "conditioner", None)
        if isinstance(cond, ClassConditioner) and not (0 < len(self.classes) <= cond.num_classes):
            raise UsageError(f"the model is class-conditional ({cond.num_classes} classes): give {self.folder} one "
                             f"subfolder of images per class (found {len(self.classes)} class folders)")

    def __len__(self) -> int:
        return len(self.items)

    # -- draws ------------------------------------------------------------------------------------------
    def sample(self, n, generator):
        idx = torch.randint(0, len(self.items), (n,), generator=generator)
        flip = (torch.rand(n, generator=generator) < self.hflip).tolist()
        if self.cache is not None:
            mean, std = self.cache.read([self.positions[i] for i in idx.tolist()], flip)
            x0 = mean + std * torch.randn(mean.shape, generator=generator)
        else:
            x0 = self._images(idx.tolist(), flip, generator)
            if self.vae is not None:
                from .digits import encode_posterior

                mean, std = encode_posterior(self.vae, x0, self.scaling)
                x0 = mean + std * torch.randn(mean.shape, generator=generator)
        prompts = self._prompts(idx, generator)
        empty = (torch.rand(n, generator=generator) < self.empty_prompt_prob).tolist()
        return Sample(x0, self.labels[idx], ["" if e else p for p, e in zip(prompts, empty)])

    def _images(self, idx: list[int], flip: list[bool], generator) -> torch.Tensor:
        """Decoded images (n, C, R, R); random crops take their offsets from ``generator``. An image that stopped
        decoding since the scan is replaced by the next one that decodes."""
        offsets = torch.rand(len(idx), 2, generator=generator).tolist() if self.crop == "random" else [None] * len(idx)
        out = []
        for i, f, off in zip(idx, flip, offsets):
            for k in range(len(self.items)):
                x = load_image(self.items[(i + k) % len(self.items)].path, self.resolution, self.mode, off, f)
                if x is not None:
                    break
            if x is None:
                raise UsageError(f"no image in {self.folder} can be decoded any more")
            out.append(x)
        return torch.stack(out)

    def _prompts(self, idx: torch.Tensor, generator) -> list[str]:
        """One caption per item (a uniform pick where an image has several)."""
        pick = torch.randint(0, 1 << 30, (len(idx),), generator=generator).tolist()
        return [self.items[i].captions[p % len(self.items[i].captions)] for i, p in zip(idx.tolist(), pick)]

    def conditions(self, n, generator):
        """Captions / labels of images drawn uniformly, never empty (the null branch comes from the conditioner)."""
        idx = torch.randint(0, len(self.items), (n,), generator=generator)
        return Sample(None, self.labels[idx], self._prompts(idx, generator))

    def condition_set(self):
        if self.classes:
            return Sample(None, torch.arange(len(self.classes)), [c.replace("_", " ") for c in self.classes])
        prompts = list(dict.fromkeys(c for it in self.items for c in it.captions))
        return Sample(None, torch.full((len(prompts),), -1), prompts)


def native_resolution(bundle) -> int:
    """The image side the model was built for: its sample size (times the VAE's downsampling for latent models)."""
    if bundle is None:
        raise UsageError("data.resolution is needed when no model sets it (e.g. data.resolution=512)")
    side = bundle.sample_shape[-1]
    vae = getattr(bundle, "vae", None)
    return side * 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else side
