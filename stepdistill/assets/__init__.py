"""Shipped weights of the embedded benchmarks: ``stepdistill.assets.path(name)`` -> the asset's folder.

Each asset is a folder ``stepdistill/assets/<name>/`` holding its files and ``asset.json``: how it was
made (configs, steps, seed, training minutes), its measured metrics, and every file's size and sha256.
:func:`path` checks sizes on every call and hashes once per process (again when a file changes), so a
missing or corrupt asset fails at once with one line naming the command that rebuilds it. Which configs
build which asset: ``registry.py``; the build itself: ``build.py`` (``stepdistill assets build NAME``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError
from ..userfiles import sha256

ROOT = Path(__file__).resolve().parent  # shipped assets live next to this file
MANIFEST = "asset.json"
BUDGET_BYTES = 25_000_000  # all shipped weights together (25 MB)
_verified: dict[Path, tuple] = {}  # folder -> file signature that hashed clean in this process


def rebuild_command(name: str) -> str:
    return f"stepdistill assets build {name}"


def path(name: str, root: Path | None = None) -> Path:
    """The verified folder of asset ``name``; UsageError (one line, with the rebuild command) when it is
    unknown, missing or corrupt."""
    from .registry import ASSETS

    shipped = root is None
    root = Path(root) if root is not None else ROOT
    folder = root / name
    plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name
    if not plain or (name not in ASSETS and (shipped or not folder.is_dir())):
        raise UsageError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    fix = f"rebuild it with `{rebuild_command(name)}`"
    if not folder.is_dir():
        raise UsageError(f"asset {name!r} is missing ({folder}); {fix}")
    problem = check(folder)
    if problem:
        raise UsageError(f"asset {name!r} is corrupt ({problem}); {fix}")
    return folder


def check(folder: Path) -> str | None:
    """What is wrong with an asset folder (None: nothing): manifest, listed files, sizes, sha256."""
    try:
        manifest = read_manifest(folder)
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {MANIFEST}"
    signature = []
    for rel, meta in sorted(files.items()):
        f = folder / rel
        if Path(rel).is_absolute() or not f.resolve().is_relative_to(Path(folder).resolve()):
            return f"{MANIFEST} lists {rel!r}, a file outside the asset folder"
        if not f.is_file():
            return f"{rel} is missing"
        st = f.stat()
        if st.st_size != meta.get("bytes"):
            return f"{rel} has {st.st_size} bytes, expected {meta.get('bytes')}"
        signature.append((rel, st.st_size, st.st_mtime_ns))
    signature = tuple(signature)
    if _verified.get(folder.resolve()) == signature:
        return None
    for rel, meta in sorted(files.items()):
        if sha256(folder / rel) != meta.get("sha256"):
            return f"{rel} does not match its sha256"
    _verified[folder.resolve()] = signature
    return None


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def file_table(folder: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file in ``folder`` except the manifest."""
    folder = Path(folder)
    return {f.relative_to(folder).as_posix(): {"bytes": f.stat().st_size, "sha256": sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}


def write_manifest(folder: Path, info: dict) -> dict:
    """Write ``asset.json`` = ``info`` + the file table and total size; returns the manifest."""
    files = file_table(folder)
    manifest = {**info, "files": files, "total_bytes": sum(m["bytes"] for m in files.values())}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def shipped_bytes(root: Path | None = None, exclude: str | None = None) -> int:
    """Bytes of every asset folder under ``root`` (by their manifests), optionally leaving one out."""
    root = Path(root) if root is not None else ROOT
    total = 0
    for folder in root.iterdir() if root.is_dir() else []:
        shipped = not folder.name.startswith(".")  # not a build's staging (.NAME.tmp) or swap (.NAME.old) folder
        if shipped and folder.is_dir() and folder.name != exclude and (folder / MANIFEST).is_file():
            try:
                total += int(read_manifest(folder).get("total_bytes", 0))
            except (OSError, ValueError):
                pass
    return total


__all__ = ["BUDGET_BYTES", "MANIFEST", "ROOT", "check", "path", "read_manifest", "rebuild_command"]
