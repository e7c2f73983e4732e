"""CLIP's byte-level BPE tokenizer (Radford et al. 2021) built offline from the merges file that open_clip's
wheel ships (``open_clip/bpe_simple_vocab_16e6.txt.gz``), as a stock ``transformers.CLIPTokenizer``.

The vocabulary follows from the merges exactly as in CLIP / open_clip: the 256 byte symbols, the same
with ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (also padding, as in
Stable Diffusion's tokenizer). Keeping only the first M merges gives a valid smaller BPE (open_clip slices
the list the same way) whose token ids equal CLIP's for every kept token.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from .errors import UsageError

CLIP_NUM_MERGES = 49152 - 256 - 2  # merges CLIP uses (open_clip's slice of the file)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def clip_merges_file() -> Path:
    """The BPE merges file inside the installed open_clip package."""
    try:
        import open_clip
    except ImportError:
        raise UsageError("open_clip is not installed; pip install open-clip-torch (it ships CLIP's BPE "
                         "merges)") from None
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise UsageError(f"{path} is missing; reinstall open-clip-torch")
    return path


def clip_bpe(num_merges: int = CLIP_NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, merges) of CLIP's BPE cut to its first ``num_merges`` merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if not 1 <= num_merges <= CLIP_NUM_MERGES:
        raise UsageError(f"num_merges must be in 1..{CLIP_NUM_MERGES} (got {num_merges})")
    lines = gzip.open(clip_merges_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + num_merges]]  # line 0 is the file's header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_bpe_files(vocab: dict[str, int], merges: list[tuple[str, str]], folder: Path) -> None:
    """``vocab.json`` + ``merges.txt`` (the files a slow ``CLIPTokenizer`` reads) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")


def build_clip_tokenizer(num_merges: int = CLIP_NUM_MERGES, max_length: int = 77, folder: Path | None = None):
    """A ``CLIPTokenizer`` over the first ``num_merges`` merges, padding to ``max_length`` with
    ``<|endoftext|>``; also saved (with vocab.json / merges.txt) to ``folder`` when given."""
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe(num_merges)
    with tempfile.TemporaryDirectory() as tmp:
        write_bpe_files(vocab, merges, Path(tmp))
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)
    if folder is not None:
        save_tokenizer(tok, folder)
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    """``tok.save_pretrained`` plus :func:`add_bpe_files`."""
    tok.save_pretrained(folder)
    add_bpe_files(Path(folder))


def add_bpe_files(folder: Path) -> None:
    """Write vocab.json / merges.txt next to a BPE ``tokenizer.json`` (transformers 5 saves only the latter),
    so that the slow CLIPTokenizer of older transformers opens the folder too. No-op for other models."""
    folder = Path(folder)
    if (folder / "vocab.json").exists() or not (folder / "tokenizer.json").exists():
        return
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") != "BPE":
        return
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    write_bpe_files(model["vocab"], merges, folder)
