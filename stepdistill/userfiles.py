"""Reading the files a user hands over (configs, prompt lists, recipes, weights): every way such a file can be
unreadable (missing, a folder, not UTF-8, truncated or corrupt safetensors) is one :class:`UsageError` line
naming the file. Also: :func:`inside`, a relative name that must stay inside its folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import UsageError


def read_text(path: str | Path, what: str = "text file") -> str:
    """The UTF-8 text of ``path``; ``what`` says what the file should be (for the error line)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not a UTF-8 {what} (byte {e.start} cannot be decoded)") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def read_lines(path: str | Path, what: str = "text file") -> list[str]:
    """The stripped non-empty lines of a UTF-8 text file."""
    return [line.strip() for line in read_text(path, what).splitlines() if line.strip()]


def read_json(path: str | Path, what: str = "JSON file"):
    """The parsed JSON of ``path``."""
    import json

    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not a valid {what} ({e.msg}, line {e.lineno})") from None


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable safetensors file (missing, truncated, bad header), or None. Reads the header
    only; safetensors checks that it covers the whole file, so a truncated file fails here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def check_safetensors(path: str | Path, fix: str = "write it again") -> None:
    """UsageError naming ``path`` when it is not a readable safetensors file (``fix``: what to do about it)."""
    problem = safetensors_problem(path)
    if problem is not None:
        raise UsageError(f"{path} is not a readable safetensors file ({problem}); {fix}")


def load_safetensors(path: str | Path, fix: str = "write it again") -> dict:
    """``safetensors.torch.load_file`` with one UsageError line for a missing, truncated or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); {fix}") from None


def inside(folder: str | Path, name: str, what: str = "file") -> Path:
    """``folder / name`` for a relative ``name`` that stays inside ``folder`` (no absolute paths, no ``..``
    leading out of it, no links out of it)."""
    folder = Path(folder)
    target = folder / name
    if Path(name).is_absolute() or not target.resolve().is_relative_to(folder.resolve()):
        raise UsageError(f"{what} {name!r} lies outside {folder}; give a name inside that folder")
    return target


def sha256(file: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (asset manifests, checkpoint state)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
