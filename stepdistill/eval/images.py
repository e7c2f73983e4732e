"""Image folders (``stepdistill eval --images``) and sample grids.

A folder is checked before any work: no images, a corrupt image or mixed sizes is a one-line
UsageError. Features are extracted through clean-fid's own folder loader (``get_files_features``, with
``num_workers=0``); images in subfolders named ``0``..``9`` carry that digit as their condition.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import UsageError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def list_images(folder: str | Path, check: bool = True) -> list[Path]:
    """Sorted image files under ``folder`` (recursive); with ``check``, every file must open and all must
    share one size."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise UsageError(f"no images in {folder} (looked for {', '.join(sorted(EXTENSIONS))})")
    if not check:
        return files
    sizes: dict[tuple[int, int], list[Path]] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                sizes.setdefault(im.size, []).append(f)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            raise UsageError(f"corrupt or unreadable image: {f}") from None
    if len(sizes) > 1:
        (s1, f1), (s2, f2) = sorted(sizes.items(), key=lambda kv: -len(kv[1]))[:2]
        raise UsageError(f"mixed image sizes in {folder}: {s1[0]}x{s1[1]} ({len(f1)} files) and {s2[0]}x{s2[1]} "
                         f"(e.g. {f2[0].name}); resize them to one size")
    return files


def folder_labels(files: Sequence[Path], root: Path) -> torch.Tensor | None:
    """Digit labels from subfolders ``0``..``9`` (every file must be in one), else None."""
    parts = [f.relative_to(root).parts for f in files]
    if all(len(p) >= 2 and p[0].isdigit() for p in parts):
        return torch.tensor([int(p[0]) for p in parts])
    return None


def load_images(files: Sequence[Path]) -> torch.Tensor:
    """Images as float (N, 3, H, W) in [0, 1]."""
    from PIL import Image

    arrs = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0


def folder_features(files: Sequence[Path], module: torch.nn.Module, device="cpu", progress: bool = True,
                    desc: str = "features", batch_size: int = 128) -> torch.Tensor:
    """Outputs of ``module`` (images in [0, 1] -> (B, D)) over image files, through clean-fid's loader."""
    from cleanfid.fid import get_files_features

    from .features import CleanFIDAdapter

    feats = get_files_features([str(f) for f in files], model=CleanFIDAdapter(module), num_workers=0,
                               batch_size=batch_size, device=torch.device(device), mode="clean",
                               custom_fn_resize=lambda img: img, description=desc, verbose=progress)
    return torch.from_numpy(np.asarray(feats)).float()


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10, scale: int = 1) -> Path:
    """A PNG grid of float images in [0, 1] (B, C, H, W), ``nrow`` per row, upscaled by ``scale``
    (nearest) so small digits stay readable."""
    import torchvision

    x = images.float().clamp(0, 1)
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(x, str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path


def save_scatter(points: torch.Tensor, path: Path, means=None, title: str = "") -> Path:
    """A scatter plot of 2-D samples (toy2d), with the mixture's modes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=100)
    p = points.cpu().numpy()
    ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5)
    if means is not None:
        m = np.asarray(means)
        ax.scatter(m[:, 0], m[:, 1], marker="x", c="red", s=30)
    ax.set_aspect("equal")
    lim = max(3.0, float(np.abs(p).max()) * 1.05) if len(p) else 3.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
