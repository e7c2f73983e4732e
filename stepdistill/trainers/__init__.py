"""Distillation methods, one module each (``dmd``, ``tscd``; ``denoising`` trains teachers and LoRAs), and
what they share (``common.py``, DMD's terms in ``dmd_terms.py``). The loop and the Method API are
:mod:`stepdistill.training`, re-exported here; methods register in :mod:`stepdistill.registry`."""

from __future__ import annotations

from ..registry import method_class
from ..training import Context, Method, Phase, Trainer

__all__ = ["Context", "Method", "Phase", "Trainer", "method_class"]
