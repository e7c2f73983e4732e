"""The latent cache of image folders: each image is encoded once by the teacher's VAE (scaled posterior mean and
std, as Stable Diffusion training samples the posterior on every draw) into safetensors shards, reused by every
later run with the same key.

Key: the VAE's identity (a hash of its config, its scaling factor and a fingerprint of its weights), the
resolution, the crop (center), whether mirror images are kept, and the file list with each file's size and
modification time. Any change gives a new key, hence a new folder ``ROOT/<key hash>/``: a second resolution or
an edited image is encoded afresh, and the folder of the old key stays until deleted. Captions are not part of the
key (they are read from the folder on every run). The folder's own location is not either, so a moved dataset
keeps its cache.

Shard ``s`` holds images ``s * SHARD_SIZE ..`` of the file list: ``mean``, ``std`` (and ``mean_flip``,
``std_flip``: the mirrored center crop) as float16 (N, C, h, w), ``index`` (their positions in the file list), and
in its metadata the key hash (images missing from ``index`` could not be decoded). A shard is written to a
temporary name and renamed into place, so a stopped build leaves whole shards only; the next run encodes only the
shards that are missing (or unreadable). Processes building the same cache at once only duplicate work. Draws read
their rows from the memory-mapped shards, so the cache need not fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

SHARD_SIZE = 256  # images per shard
ENCODE_BATCH = 16  # images per VAE call while building


def default_root() -> Path:
    """``$STEPDISTILL_CACHE/latents`` or ``~/.cache/stepdistill/latents``."""
    return Path(os.environ.get("STEPDISTILL_CACHE") or Path.home() / ".cache" / "stepdistill") / "latents"


def vae_identity(vae, scaling: float) -> str:
    """A hash of the VAE's config, scaling factor and weights (every tensor's name, shape and up to 4,096 evenly
    spaced values: cheap for large VAEs, and any retraining or fine-tuning changes it)."""
    h = hashlib.sha256(json.dumps({"config": dict(vae.config), "scaling": scaling}, sort_keys=True,
                                  default=str).encode())
    for name, t in vae.state_dict().items():
        flat = t.detach().flatten()
        flat = flat[::max(1, flat.numel() // 4096)].float().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """Encoded images of one key under ``ROOT/<key hash>/``: ``build`` completes it, ``read`` serves draws."""

    def __init__(self, root: Path, key: dict, files: Sequence[Path], vae, scaling: float):
        self.key, self.files = key, list(files)
        self.vae, self.scaling, self.flip = vae, scaling, bool(key["flip"])
        self.hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.folder = root / self.hash[:24]
        self.where: dict[int, tuple[Path, int]] = {}  # file position -> (shard, row)
        self.encoded = 0  # images this process encoded

    @classmethod
    def open(cls, root: Path, vae, scaling: float, files: Sequence[Path], names: Sequence[str], resolution: int,
             flip: bool) -> "LatentCache":
        stats = [f.stat() for f in files]
        key = {"vae": vae_identity(vae, scaling), "resolution": resolution, "crop": "center", "flip": flip,
               "files": [[n, s.st_size, s.st_mtime_ns] for n, s in zip(names, stats)]}
        return cls(root, key, files, vae, scaling)

    @property
    def positions(self) -> list[int]:
        """File positions that are encoded (the readable images), in order."""
        return sorted(self.where)

    def shard_path(self, s: int) -> Path:
        return self.folder / f"shard-{s:05d}.safetensors"

    def build(self, load: Callable[[Path], torch.Tensor | None], progress: bool = True) -> None:
        """Encode the shards that are missing, then index every shard. ``load(path)``: the image (C, R, R) in
        [-1, 1] (center crop), or None when it cannot be decoded."""
        from tqdm.auto import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.folder / "key.json", lambda p: p.write_text(json.dumps(self.key, indent=1)))
        shards = range((len(self.files) + SHARD_SIZE - 1) // SHARD_SIZE)
        todo = [s for s in shards if not self._index(s)]
        if todo:
            missing = sum(min(len(self.files), (s + 1) * SHARD_SIZE) - s * SHARD_SIZE for s in todo)
            print(f"stepdistill: encoding {missing} images into the latent cache {self.folder}", file=sys.stderr)
            with tqdm(total=missing, desc="latent cache", leave=False, disable=None if progress else True) as bar:
                for s in todo:
                    self._encode_shard(s, load, bar)
                    if not self._index(s):
                        raise OSError(f"latent cache shard {self.shard_path(s)} cannot be read back")

    def _index(self, s: int) -> bool:
        """Record the rows of shard ``s``; False when it is missing, unreadable or of another key."""
        from safetensors import SafetensorError, safe_open

        path = self.shard_path(s)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                index = f.get_tensor("index").tolist()
                keys = set(f.keys())
        except (SafetensorError, OSError):
            return False
        need = {"mean", "std", "index"} | ({"mean_flip", "std_flip"} if self.flip else set())
        if meta.get("key") != self.hash or not need <= keys:
            return False
        self.where.update({p: (path, row) for row, p in enumerate(index)})
        return True

    def _encode_shard(self, s: int, load, bar) -> None:
        from safetensors.torch import save_file

        from .digits import encode_posterior

        out: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "mean_flip": [], "std_flip": []}
        index = []
        positions = list(range(s * SHARD_SIZE, min(len(self.files), (s + 1) * SHARD_SIZE)))
        for i in range(0, len(positions), ENCODE_BATCH):
            images = []
            for p in positions[i:i + ENCODE_BATCH]:
                x = load(self.files[p])
                if x is not None:
                    index.append(p)
                    images.append(x)
                bar.update(1)
            if not images:
                continue
            x = torch.stack(images)  # (b, C, R, R)
            for suffix, batch in [("", x)] + ([("_flip", x.flip(-1))] if self.flip else []):
                mean, std = encode_posterior(self.vae, batch, self.scaling, chunk=ENCODE_BATCH)  # (b, C_lat, r, r)
                out["mean" + suffix].append(mean.half())
                out["std" + suffix].append(std.half())
            self.encoded += len(images)
        tensors = {k: torch.cat(v).contiguous() for k, v in out.items() if v}
        if not index:  # nothing readable in this shard: empty tensors record that it is done
            tensors = {k: torch.zeros(0, dtype=torch.float16) for k in out if self.flip or "flip" not in k}
        tensors["index"] = torch.tensor(index, dtype=torch.int64)
        _write_atomic(self.shard_path(s), lambda p: save_file(tensors, str(p), metadata={"key": self.hash}))

    def read(self, positions: Sequence[int], flip: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled posterior mean and std (n, C_lat, r, r) in float32 of the images at ``positions`` (mirrored where
        ``flip``)."""
        from safetensors import safe_open

        means, stds = [None] * len(positions), [None] * len(positions)
        by_shard: dict[Path, list[int]] = {}
        for j, p in enumerate(positions):
            by_shard.setdefault(self.where[p][0], []).append(j)
        for path, js in by_shard.items():
            with safe_open(str(path), "pt") as f:
                for j in js:
                    row, suffix = self.where[positions[j]][1], "_flip" if flip[j] else ""
                    means[j] = f.get_slice("mean" + suffix)[row:row + 1]
                    stds[j] = f.get_slice("std" + suffix)[row:row + 1]
        return torch.cat(means).float(), torch.cat(stds).float()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a temporary name beside ``path``, then rename into place (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
