"""Score sampler configurations on a benchmark: one report row per configuration.

For each configuration, samples are drawn in batches with per-sample seeds (``seed + i``); every batch
streams into torchmetrics' FID (its feature module records the features for precision / recall and
diversity), the classifier and CLIP. Speed is timed afterwards by :func:`interleaved_speed`: rounds of one batch
per configuration in turn, so load on a busy machine falls on every row alike, and the median over rounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .benchmark import Benchmark
from .diversity import diversity
from .features import Recorder
from .fid import fid_metric
from .precision_recall import precision_recall
from ..pipelines.plan import SamplingRecipe
from ..pipelines.samplers import Sampler, seeds_for
from .speed import SpeedMeter, count_calls

GRID_SAMPLES = 100


@dataclass
class Entry:
    """One sampler configuration (one report row)."""

    name: str
    method: str  # teacher | the training method of a student
    sampler: Sampler
    spec: SamplingRecipe
    model: str  # what was loaded


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "row"


def empty_row(name: str, method: str, model: str | None = None) -> dict:
    from .report import ROW_FIELDS

    row = {k: None for k in ROW_FIELDS}
    row.update(name=name, method=method, model=model)
    return row


def evaluate_entry(bench: Benchmark, entry: Entry, out_dir: Path, num_samples: int = 1000, seed: int = 0,
                   batch_size: int = 100, device="cpu", progress: bool = True, x0_samples: int = 0) -> dict:
    """Generate ``num_samples`` samples with ``entry`` and score them; returns the report row (NFE and peak
    memory, no speed: see :func:`interleaved_speed`). With ``x0_samples``, the first that many are also traced: x0
    at every step (grid, distances, settle step)."""
    from tqdm.auto import tqdm

    conds = bench.conditions(num_samples)
    rec = Recorder(bench.extractor) if bench.extractor is not None else None
    fid = fid_metric(rec, bench.reference.stats) if rec is not None and bench.reference is not None else None
    correct, clip_scores, points, grid = [], [], [], []
    meter, nfe = SpeedMeter(device, batch_size), None
    with meter, tqdm(total=num_samples, desc=entry.name, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, num_samples, batch_size):
            stop = min(start + batch_size, num_samples)
            c, seeds = conds.slice(start, stop), seeds_for(seed, start, stop)
            with count_calls(*entry.sampler.nets) as rows:
                x = meter.time(lambda: entry.sampler(entry.spec, c, seeds), len(seeds))
            nfe = nfe if nfe is not None else rows[0] / len(seeds)
            if entry.sampler.output == "points":
                points.append(x)
            else:
                _score_batch(bench, x, c, fid, rec, correct, clip_scores)
                if sum(len(g) for g in grid) < GRID_SAMPLES:
                    grid.append(x[:GRID_SAMPLES - sum(len(g) for g in grid)])
            bar.update(len(seeds))
    row = empty_row(entry.name, entry.method, entry.model)
    row.update(scheduler=entry.spec.scheduler, steps=entry.spec.steps, guidance_scale=entry.spec.guidance_scale,
               eta=entry.spec.eta, nfe=nfe, num_samples=num_samples, batch_size=batch_size,
               peak_mem_mb=meter.peak_memory()[0])
    if points:
        row.update(_toy_metrics(bench, torch.cat(points), seed))
        from .images import save_scatter

        row["grid"] = str(save_scatter(torch.cat(points)[:2000], out_dir / "grids" / f"{slug(entry.name)}.png",
                                       bench.mixture.means, entry.name).relative_to(out_dir))
        return row
    row.update(_image_metrics(bench, conds, fid, rec, correct, clip_scores))
    if entry.spec.router is not None and rec is not None:
        row["part_rows"] = _part_rows(bench, entry, conds, rec.features(), correct, clip_scores)
    if grid:
        row["grid"] = _save_grid(torch.cat(grid), out_dir, entry.name)
    if x0_samples > 0:
        row.update(_x0_trajectory(bench, entry, out_dir, conds.slice(0, x0_samples), seeds_for(seed, 0, x0_samples)))
    return row


def interleaved_speed(bench: Benchmark, entries: list[Entry], batch_size: int = 100, repeats: int = 5,
                      seed: int = 0, device="cpu", progress: bool = True) -> list[dict]:
    """Per entry: median ms per image over ``repeats`` rounds, each round timing one batch of every entry in turn
    (after one warm-up round), with the spread over rounds and images/s from the median. Interleaving makes a
    burst of background load fall on all rows of a round instead of on one row, and the median drops the round
    it hit, so speed ratios between rows hold on a busy machine."""
    from tqdm.auto import tqdm

    conds = bench.conditions(batch_size)
    seeds = seeds_for(seed, 0, batch_size)
    meters = [SpeedMeter(device, batch_size) for _ in entries]
    with tqdm(total=(repeats + 1) * len(entries), desc="speed", unit="batch", disable=not progress,
              dynamic_ncols=True) as bar:
        for _ in range(repeats + 1):
            for e, m in zip(entries, meters):
                with torch.no_grad():
                    m.time(lambda: e.sampler(e.spec, conds, seeds), batch_size)
                bar.update(1)
    out = []
    for m in meters:
        sp = m.result()
        out.append({"ms_per_image": sp.ms_per_image, "ms_spread": sp.ms_spread, "images_per_s": sp.images_per_s,
                    "speed_batches": sp.batches})
    return out


def _x0_trajectory(bench, entry, out_dir, conds, seeds) -> dict:
    """x0 grid, per-step feature distance to the final image and settle step of a few samples."""
    from .trajectory import feature_distances, save_x0_grid, settle_step, trace, traceable

    if not traceable(entry.sampler, entry.spec):
        return {}
    traj = trace(entry.sampler, entry.spec, conds, seeds)
    path = save_x0_grid(traj, out_dir / "x0" / f"{slug(entry.name)}.png")
    out = {"x0_grid": str(path.relative_to(out_dir)), "x0_timesteps": traj.timesteps, "x0_models": traj.models}
    if bench.extractor is not None:
        out["x0_distance"] = feature_distances(traj, bench.extractor)
        out["settle_step"] = settle_step(out["x0_distance"])
    return out


def _score_batch(bench, x, c, fid, rec, correct, clip_scores) -> None:
    if fid is not None:
        fid.update(x, real=False)  # the Recorder keeps the features
    elif rec is not None:
        rec(x)
    if bench.classifier is not None and c.labels is not None:
        correct.append(bench.classifier.logits(x).argmax(1).cpu() == c.labels)
    if bench.clip is not None and c.prompts is not None:
        clip_scores.append(bench.clip.score(x, c.prompts))


def _image_metrics(bench, conds, fid, rec, correct, clip_scores) -> dict:
    out = {}
    feats = rec.features() if rec is not None else None
    if fid is not None and len(feats) >= 2:
        out["fid"] = max(float(fid.compute()), 0.0)
    if bench.reference is not None and feats is not None and len(feats) > 3:
        out["precision"], out["recall"] = precision_recall(bench.reference.features, feats)
    if correct:
        out["condition_accuracy"] = float(torch.cat(correct).double().mean())
    if clip_scores:
        out["clip_score"] = float(torch.cat(clip_scores).mean())
    if feats is not None and len(feats):
        out["diversity"] = diversity(feats, conds.groups())
    return out


def _part_rows(bench, entry, conds, feats, correct, clip_scores) -> list[dict]:
    """One row per route of a routed student: the same samples' scores restricted to the conditions it owns. The
    reference of a part is the reference images the benchmark's classifier assigns to the part's classes."""
    from .fid import fid_from_features

    router = entry.spec.router
    emb = entry.sampler.prompt_embeddings(conds.prompts) if router.by == "prompt_embedding" else None
    route = router.route(labels=conds.labels, embeddings=emb)
    ref_labels = None
    if bench.reference is not None and bench.classifier is not None and conds.labels is not None:
        with torch.no_grad():
            ref_labels = bench.classifier.classifier.head(bench.reference.features.to(
                next(bench.classifier.parameters()).device)).argmax(1).cpu()
    ok = torch.cat(correct) if correct else None
    clip = torch.cat(clip_scores) if clip_scores else None
    rows = []
    for r, part in enumerate(router.routes):
        idx = (route == r).nonzero().squeeze(1)
        if len(idx) < 2:
            continue
        net = part.segments[0].network or "student"
        row = empty_row(f"{entry.name} · {net}", entry.method, entry.model)
        row.update(part=net, num_samples=len(idx), nfe=None, steps=entry.spec.steps)
        mine = feats[idx]
        if ref_labels is not None:
            classes = torch.tensor(sorted(set(conds.labels[idx].tolist())))
            ref = bench.reference.features[torch.isin(ref_labels, classes)]
            if len(ref) >= 2:
                row["fid"] = fid_from_features(ref, mine)
        if ok is not None:
            row["condition_accuracy"] = float(ok[idx].double().mean())
        if clip is not None:
            row["clip_score"] = float(clip[idx].mean())
        groups = conds.groups()
        row["diversity"] = diversity(mine, None if groups is None else [groups[i] for i in idx.tolist()])
        rows.append(row)
    return rows


def _toy_metrics(bench, pts: torch.Tensor, seed: int) -> dict:
    from ..data.toy2d import toy_metrics

    m = toy_metrics(pts, bench.mixture, seed=seed)
    real, _ = bench.mixture.sample(len(pts), torch.Generator().manual_seed(20_000 + seed))
    precision, recall = precision_recall(real, pts)
    return {"sw2": m["sw2"], "modes_covered": m["modes_covered"], "num_modes": m["num_modes"],
            "on_mode": m["on_mode"], "precision": precision, "recall": recall}


def _save_grid(images: torch.Tensor, out_dir: Path, name: str) -> str:
    from .images import save_grid

    side = images.shape[-1]
    scale = max(1, 64 // side)
    return str(save_grid(images, out_dir / "grids" / f"{slug(name)}.png", nrow=10, scale=scale).relative_to(out_dir))


# ---- image folders ----------------------------------------------------------------------------------
def evaluate_folder(bench: Benchmark, folder: str | Path, out_dir: Path, device="cpu", progress: bool = True) -> dict:
    """Score a folder of images (no sampling: no NFE or speed)."""
    from .images import folder_features, folder_labels, list_images, load_images

    folder = Path(folder).expanduser()
    files = list_images(folder)
    labels = folder_labels(files, folder)
    row = empty_row(folder.name, "images", str(folder))
    row["num_samples"] = len(files)
    feats = None
    if bench.extractor is not None:
        feats = folder_features(files, bench.extractor, device, progress, desc=f"features {folder.name}")
    if feats is not None and bench.reference is not None and len(feats) >= 2:
        from .fid import fid_from_stats, FIDStats

        row["fid"] = fid_from_stats(FIDStats.from_features(feats), bench.reference.stats)
        if len(feats) > 3:
            row["precision"], row["recall"] = precision_recall(bench.reference.features, feats)
    if labels is not None and bench.classifier is not None:
        logits = folder_features(files, _Logits(bench.classifier), device, progress, desc="classifier")
        row["condition_accuracy"] = float((logits.argmax(1) == labels).double().mean())
    if feats is not None:
        row["diversity"] = diversity(feats, None if labels is None else labels.tolist())
    row["grid"] = _save_grid(load_images(files[:GRID_SAMPLES]), out_dir, folder.name)
    return row


class _Logits(torch.nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images):
        return self.classifier.logits(images)
