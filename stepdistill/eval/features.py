"""Feature extractors for FID / precision-recall / diversity: one interface, images in, features out.

A :class:`FeatureExtractor` is an ``nn.Module`` taking float images in [0, 1] ``(B, C, H, W)`` and
returning ``(B, D)``; it carries ``num_features`` (what torchmetrics' FID asks of a custom ``feature=``)
and ``name`` (the key of cached reference statistics). It resizes inputs itself, so the same module
serves torchmetrics (in memory) and clean-fid (folders, through :class:`CleanFIDAdapter`).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import UsageError


class FeatureExtractor(nn.Module):
    num_features: int
    name: str


def weights_digest(module: nn.Module) -> str:
    """Short hash of a module's weights (so a rebuilt network never reuses stale cached statistics)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:10]


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features of a digit classifier (``classifier.features(x)``; ``classifier(x)`` gives logits)
    on images scaled to [-1, 1]; the classifier averages channels and resizes to its resolution itself
    (see ``stepdistill.classifier.DigitClassifier``)."""

    def __init__(self, classifier: nn.Module, name: str = "digits-classifier"):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.num_features)
        self.name = f"{name}-{weights_digest(classifier)}"

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.classifier.parameters(), None)
        return (images.float().clamp(0, 1) * 2 - 1).to(p.device if p is not None else "cpu")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self._input(images)).float()

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._input(images)).float()


INCEPTION_FILE = "inception-2015-12-05.pt"  # the TorchScript Inception-v3 clean-fid downloads (FID's standard net)
INCEPTION_URL = f"https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/{INCEPTION_FILE}"
INCEPTION_ENV = "STEPDISTILL_INCEPTION"


def _how_to_pass() -> str:
    return (f"fetch {INCEPTION_URL} on a connected machine and pass --inception FILE or set "
            f"{INCEPTION_ENV}=FILE")


def inception_file(path: str | Path | None = None) -> Path:
    """clean-fid's Inception weights: ``path`` (``--inception``), else ``$STEPDISTILL_INCEPTION``, else the copy
    clean-fid keeps in /tmp (downloaded there on first use by a connected machine). A folder stands for
    ``FOLDER/inception-2015-12-05.pt``."""
    given, origin = (path, "--inception") if path else (os.environ.get(INCEPTION_ENV), f"${INCEPTION_ENV}")
    if given:
        p = Path(given).expanduser()
        p = p / INCEPTION_FILE if p.is_dir() else p
        if not p.is_file():
            raise UsageError(f"{origin} {given}: no such file; FID needs clean-fid's Inception weights "
                             f"{INCEPTION_FILE}: {_how_to_pass()}")
        return p
    from cleanfid.downloads_helper import check_download_inception

    try:
        return Path(check_download_inception("./" if platform.system() == "Windows" else "/tmp"))
    except Exception as e:  # noqa: BLE001 -- offline: URLError / OSError / HTTPError
        raise UsageError(f"FID needs clean-fid's Inception weights {INCEPTION_FILE}, which are not here and "
                         f"cannot be downloaded ({type(e).__name__}): {_how_to_pass()}") from None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:10]


class InceptionFeatures(FeatureExtractor):
    """clean-fid's Inception-v3 pool3 features (2048-d) with its "clean" (PIL bicubic) resize to 299x299. The
    weights are clean-fid's TorchScript file (:func:`inception_file`); the name carries its hash, so cached
    reference statistics never come from other weights."""

    num_features = 2048

    def __init__(self, device="cpu", weights: str | Path | None = None):
        super().__init__()
        from cleanfid.resize import build_resizer

        self.weights = inception_file(weights)
        try:
            self.model = torch.jit.load(str(self.weights), map_location=torch.device(device)).eval()
            self.model.layers  # clean-fid's "clean" mode runs the net's ``layers`` (see forward)
        except (RuntimeError, ValueError, OSError, AttributeError) as e:
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise UsageError(f"{self.weights} is not clean-fid's TorchScript Inception {INCEPTION_FILE} ({first}); "
                             f"{_how_to_pass()}") from None
        self.name = f"inception-v3-clean-{file_digest(self.weights)}"
        self.resize = build_resizer("clean")
        self.device = torch.device(device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        arr = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        batch = np.stack([self.resize(a) for a in arr]).transpose(0, 3, 1, 2)  # clean resize, (B, 3, 299, 299)
        batch = torch.from_numpy(batch).float().to(self.device)  # [0, 255]
        # clean-fid's InceptionV3W.forward without resize_inside: scale to [-1, 1], run the layers, (B, 2048)
        return self.model.layers.forward((batch - 128) / 128).view(len(batch), 2048).float()


class PassThrough(FeatureExtractor):
    """Identity: the "images" already are ``(B, D)`` features (tests, precomputed embeddings)."""

    def __init__(self, num_features: int, name: str = "identity"):
        super().__init__()
        self.num_features, self.name = num_features, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


class Recorder(nn.Module):
    """Wraps an extractor and keeps every output, so one forward pass feeds torchmetrics' FID (which only
    keeps running sums) and the metrics that need the features themselves (precision / recall, diversity)."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_features
        self.outputs: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f = self.extractor(images)
        self.outputs.append(f.detach().cpu())
        return f

    def features(self) -> torch.Tensor:
        return torch.cat(self.outputs) if self.outputs else torch.zeros(0, self.num_features)


class CleanFIDAdapter(nn.Module):
    """clean-fid hands a feature model float batches in [0, 255] (B, 3, H, W); ours take [0, 1]."""

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.extractor(batch.float() / 255.0)


def extract(extractor: FeatureExtractor, batches: Iterable[torch.Tensor], total: int | None = None,
            desc: str = "features", progress: bool = True) -> torch.Tensor:
    """Features of image batches with a progress bar; (N, D) on CPU."""
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for b in batches:
            with torch.no_grad():
                out.append(extractor(b).detach().cpu())
            bar.update(len(b))
    return torch.cat(out)
