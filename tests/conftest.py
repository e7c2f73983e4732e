import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's models are tiny: one thread per process is faster than two fighting over 2 cores (the accelerate
# launch test runs two processes), and it keeps timings stable on a loaded machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def root() -> Path:
    return ROOT


def run_cli(*args, cwd=None):
    """Run ``python -m stepdistill ...`` in a subprocess; returns CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "stepdistill", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process Trainer builds its own Accelerator (precision differs between tests)."""
    yield
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    except Exception:  # pragma: no cover - accelerate internals moved
        pass
