"""Consecutive stages of one run, by step count: TSCD's segment stages, Phased DMD's phases, a pre-stage before
distillation. :class:`StageLog` says which stage a step is in and records every finished stage (its steps and
wall-clock seconds, across resumes) in a JSON file of the run directory; its state rides in the method's
checkpoint state (``Method.extra_state``)."""

from __future__ import annotations

import json
import os
import time
from bisect import bisect_right
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Sequence


class StageLog:
    """Stages of ``steps[i]`` steps each, run one after another. ``describe(i)`` adds a stage's own fields to
    its record (segments, phase timesteps ...). Call :meth:`step_done` after every training step."""

    def __init__(self, steps: Sequence[int], file: str, run_dir: Path | None, is_main: bool = True,
                 describe: Callable[[int], dict[str, Any]] | None = None):
        if not steps or any(int(s) < 1 for s in steps):
            raise ValueError(f"every stage needs at least one step, got {list(steps)}")
        self.steps = [int(s) for s in steps]
        self.ends = list(accumulate(self.steps))
        self.file, self.run_dir, self.is_main = file, run_dir, is_main
        self.describe = describe or (lambda i: {})
        self.index = 0
        self.finished: list[dict[str, Any]] = []
        self._t0 = time.time()

    @property
    def total(self) -> int:
        return self.ends[-1]

    def start(self, i: int) -> int:
        return self.ends[i - 1] if i > 0 else 0

    def stop(self, i: int) -> int:
        return self.ends[i]

    def stage_at(self, step: int) -> int:
        """The stage training step ``step`` (0-based) belongs to."""
        return min(bisect_right(self.ends, step), len(self.ends) - 1)

    def step_done(self, step: int) -> bool:
        """After training step ``step``: True when it was the current stage's last (the stage is recorded and
        the next one, if any, becomes current)."""
        if step + 1 != self.ends[self.index]:
            return False
        self.finished.append({"stage": self.index, **self.describe(self.index), "steps": self.steps[self.index],
                              "seconds": round(time.time() - self._t0, 1)})
        self._write()
        if self.index + 1 < len(self.ends):
            self.index += 1
            self._t0 = time.time()
        return True

    def _write(self) -> None:
        if self.run_dir is None or not self.is_main:
            return
        path = Path(self.run_dir) / self.file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.finished, indent=2) + "\n")
        os.replace(tmp, path)

    # -- checkpoint state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"stage": self.index, "finished": self.finished, "stage_elapsed": time.time() - self._t0}

    def load_state(self, meta: dict[str, Any]) -> None:
        self.index = int(meta["stage"])
        self.finished = list(meta.get("finished", []))
        self._t0 = time.time() - float(meta.get("stage_elapsed", 0.0))
