"""The training machinery every method runs on: the :class:`Method` API (``method.py``), the one loop
(:class:`Trainer`, ``loop.py``) and checkpoint files (``checkpoint.py``). Methods live elsewhere:
distillation in :mod:`stepdistill.trainers`, asset pretraining in :mod:`stepdistill.assets.trainers`;
:mod:`stepdistill.registry` finds them by ``method.name``."""

from __future__ import annotations

from .checkpoint import latest_checkpoint
from .loop import Trainer
from .method import Context, Method, Phase
from .stages import StageLog

__all__ = ["Context", "Method", "Phase", "StageLog", "Trainer", "latest_checkpoint"]
