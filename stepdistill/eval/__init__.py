"""Evaluation: FID (torchmetrics / clean-fid), precision / recall, CLIP score (open_clip), condition accuracy,
diversity and speed, and the ``stepdistill eval`` report (JSON + Markdown + HTML with pictures)."""

from .clip_score import CLIPScorer, clip_score_from_embeddings
from .diversity import diversity
from .fid import FIDStats, fid_from_features, fid_from_stats, fid_metric, folder_fid
from .loading import load_hybrid, load_student, load_teacher
from .precision_recall import precision_recall
from .samplers import Conditions, SamplerSpec

__all__ = ["CLIPScorer", "Conditions", "FIDStats", "SamplerSpec", "clip_score_from_embeddings", "diversity",
           "fid_from_features", "fid_from_stats", "fid_metric", "folder_fid", "load_hybrid", "load_student",
           "load_teacher", "precision_recall"]
