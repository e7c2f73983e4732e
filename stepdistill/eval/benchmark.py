"""What a sample is scored against: the conditions to draw, the feature space and its reference set, and
the scorers (digit classifier, CLIP, toy metrics) of each embedded benchmark (DESIGN.md, "Embedded
benchmarks") and of user models (Inception + a reference folder, any open_clip model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import UsageError
from ..userfiles import read_lines
from .features import ClassifierFeatures, FeatureExtractor
from .reference import Reference, reference
from ..pipelines.samplers import Conditions

REFERENCE_SPLIT = "train"  # FID / precision / recall reference: the digits the teachers learned (1,500)


@dataclass
class Benchmark:
    name: str  # toy2d | digits | digits-sd | generic
    output: str = "images"  # images | points
    extractor: FeatureExtractor | None = None
    reference: Reference | None = None
    classifier: ClassifierFeatures | None = None  # condition accuracy (needs labels)
    clip: object | None = None  # CLIPScorer (needs prompts)
    mixture: object | None = None  # toy2d MixtureSpec
    make_conditions: Callable[[int], Conditions] = field(default=lambda n: Conditions())
    default_guidance: float | None = None
    notes: dict = field(default_factory=dict)

    def conditions(self, n: int) -> Conditions:
        return self.make_conditions(n)

    def settings(self) -> dict:
        return {"benchmark": self.name,
                "feature_extractor": None if self.extractor is None else self.extractor.name,
                "reference": None if self.reference is None else
                f"{self.reference.name} ({len(self.reference.features)} images)",
                "clip_model": None if self.clip is None else self.clip.name, **self.notes}


# ---- conditions -------------------------------------------------------------------------------------
def digit_conditions(n: int, templates=None) -> Conditions:
    """Sample i asks for digit i mod 10 (so a 10-column grid shows one digit per column); with
    ``templates`` its prompt uses template (i div 10) mod T, else the canonical prompt of the digit."""
    from ..data.prompts import TEMPLATES, digit_prompt

    labels = torch.arange(n) % 10
    ts = list(templates) if templates else [TEMPLATES[0]]
    prompts = [digit_prompt(int(y), ts[(i // 10) % len(ts)]) for i, y in enumerate(labels.tolist())]
    return Conditions(labels, prompts)


def class_conditions(num_classes: int) -> Callable[[int], Conditions]:
    return lambda n: Conditions(torch.arange(n) % num_classes, None)


def prompt_conditions(prompts: list[str]) -> Callable[[int], Conditions]:
    return lambda n: Conditions(None, [prompts[i % len(prompts)] for i in range(n)])


def read_prompts(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"prompt file not found: {p}")
    prompts = read_lines(p, "prompt file")
    if not prompts:
        raise UsageError(f"prompt file {p} has no prompts")
    return prompts


# ---- benchmarks ---------------------------------------------------------------------------------------
def toy2d_benchmark(data_cfg) -> Benchmark:
    """The exact mixture: sliced W2, modes covered, on-mode share (``data.toy2d.toy_metrics``)."""
    from ..data.toy2d import MixtureSpec

    spec = MixtureSpec.from_config(data_cfg)
    make = class_conditions(spec.num_modes) if data_cfg.conditional else (lambda n: Conditions())
    return Benchmark("toy2d", output="points", mixture=spec, make_conditions=make)


def _digit_batches(split: str, batch: int = 500):
    from ..data.digits import load_digits_tensor

    images, _ = load_digits_tensor(16, split)
    x = images / 2 + 0.5  # [-1, 1] -> [0, 1]
    return (lambda: iter(x.split(batch))), len(x)


def digits_benchmark(text_to_image: bool = False, classifier=None, clip="auto", device="cpu",
                     cache_root: Path | None = None, progress: bool = True) -> Benchmark:
    """digits / digits-sd: FID, precision / recall and diversity in the shipped classifier's features against
    the training digits, condition accuracy by that classifier, CLIP score with digits-clip."""
    from ..data.prompts import TEMPLATES

    if classifier is None:
        from ..classifier import load_classifier

        classifier = load_classifier(device=device)
    extractor = ClassifierFeatures(classifier)
    batches, total = _digit_batches(REFERENCE_SPLIT)
    ref = reference(f"digits-{REFERENCE_SPLIT}", extractor, batches, total, cache_root, progress)
    notes = {}
    if clip == "auto":
        clip, notes = _digits_clip(device)
    name = "digits-sd" if text_to_image else "digits"
    make = (lambda n: digit_conditions(n, TEMPLATES)) if text_to_image else (lambda n: digit_conditions(n))
    return Benchmark(name, extractor=extractor, reference=ref, classifier=extractor, clip=clip,
                     make_conditions=make, notes=notes)


def _digits_clip(device):
    from .clip_score import CLIPScorer

    try:
        return CLIPScorer(device=device), {}
    except UsageError as e:
        return None, {"clip_note": f"CLIP score skipped: {e}"}


def generic_benchmark(ref_folder: str | None = None, prompts: list[str] | None = None, num_classes: int | None = None,
                      clip_model: str | None = None, clip_pretrained: str | None = None, device="cpu",
                      cache_root: Path | None = None, progress: bool = True, extractor=None,
                      inception: str | Path | None = None) -> Benchmark:
    """User models: Inception FID / precision / recall against ``ref_folder`` (clean-fid; ``inception``: its
    weights file, see ``features.inception_file``), CLIP score with ``clip_model`` / ``clip_pretrained``;
    prompts cycle through ``prompts``, class ids through ``num_classes``."""
    from .clip_score import CLIPScorer
    from .features import InceptionFeatures

    ref, notes = None, {}
    if ref_folder is not None:
        extractor = extractor or InceptionFeatures(device, inception)
        if isinstance(extractor, InceptionFeatures):
            notes["inception_weights"] = str(extractor.weights)
        ref = folder_reference(ref_folder, extractor, device, cache_root, progress)
    clip = CLIPScorer(clip_model, clip_pretrained, device) if clip_model or clip_pretrained else None
    if prompts:
        make = prompt_conditions(prompts)
    elif num_classes:
        make = class_conditions(num_classes)
    else:
        make = lambda n: Conditions()  # noqa: E731
    return Benchmark("generic", extractor=extractor if ref is not None else None, reference=ref, clip=clip,
                     make_conditions=make, notes=notes)


def missing_metrics(bench: Benchmark, folder: bool = False, labelled: bool = False) -> dict[str, str]:
    """Per image metric ``bench`` cannot compute: why, and the flag that enables it. ``folder``: an image folder
    is scored (it has no prompts; ``labelled``: its images sit in subfolders 0..9)."""
    if bench.output == "points":
        return {}  # toy2d has its own metrics, all computed
    out = {}
    if bench.reference is None:
        out.update(dict.fromkeys(("fid", "precision", "recall"), "no reference images; pass --ref FOLDER"))
    if bench.extractor is None:
        out["diversity"] = "no feature space (Inception features come with the reference); pass --ref FOLDER"
    if bench.clip is None:
        if folder:
            out["clip_score"] = ("an image folder has no prompts; evaluate the model instead (--model with "
                                 "--prompts FILE and --clip-model NAME)")
        elif bench.conditions(1).prompts is None:
            out["clip_score"] = "no prompts; pass --prompts FILE (text-to-image models) and --clip-model NAME"
        elif "clip_note" in bench.notes:
            out["clip_score"] = "the digits-clip asset did not load; pass --clip-model NAME --clip-pretrained FILE"
        else:
            out["clip_score"] = "no CLIP model; pass --clip-model NAME (and --clip-pretrained TAG|FILE|FOLDER)"
    if bench.classifier is None:
        out["condition_accuracy"] = ("no classifier of the conditions; pass --benchmark digits or digits-sd "
                                     "(digit models)")
    elif folder and not labelled:
        out["condition_accuracy"] = "no labels; put the images in subfolders 0..9 named by their digit"
    return out


def folder_reference(folder, extractor, device="cpu", cache_root=None, progress=True) -> Reference:
    """Reference features of an image folder (clean-fid's loader), cached by folder path and file list."""
    import hashlib

    from .images import folder_features, list_images

    files = list_images(folder)
    key = hashlib.sha256("\n".join(f"{f}:{f.stat().st_size}" for f in files).encode()).hexdigest()[:10]
    name = f"folder-{Path(folder).name}-{key}"
    return reference(name, extractor, None, len(files), cache_root, progress,
                     build=lambda: folder_features(files, extractor, device, progress, desc=f"reference {name}"))
