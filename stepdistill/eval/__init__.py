"""Evaluation: FID (torchmetrics / clean-fid), precision / recall, CLIP score (open_clip), condition accuracy,
diversity and speed, and the ``stepdistill eval`` report (JSON + Markdown + HTML with pictures). Sampling and
loading live in ``stepdistill.pipelines``."""

from .clip_score import CLIPScorer, clip_score_from_embeddings
from .diversity import diversity
from .fid import FIDStats, fid_from_features, fid_from_stats, fid_metric, folder_fid
from .precision_recall import precision_recall

__all__ = ["CLIPScorer", "FIDStats", "clip_score_from_embeddings", "diversity", "fid_from_features",
           "fid_from_stats", "fid_metric", "folder_fid", "precision_recall"]
