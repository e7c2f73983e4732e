"""Speed: milliseconds per image and images per second after warm-up, at a stated batch size, and peak
memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak resident set size, sampled).

The figure is the median over timed batches, so a batch slowed by a burst of background load does not move it;
the spread (slowest minus fastest batch, ms per image) says how noisy the machine was."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class Speed:
    batch_size: int
    ms_per_image: float  # median over the timed batches
    images_per_s: float  # from the median
    peak_mem_mb: float | None
    mem_kind: str  # "cuda_max_allocated" | "cpu_peak_rss"
    ms_spread: float = 0.0  # slowest minus fastest timed batch, ms per image
    batches: int = 1


def _rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SpeedMeter:
    """Times generation batches: the first ``warmup`` batches are warm-up; later full batches (``batch_size``
    images) are timed. Peak memory covers the whole generation. Use as a context manager around the batches."""

    def __init__(self, device, batch_size: int, warmup: int = 1):
        self.device, self.batch_size, self.warmup = torch.device(device), batch_size, warmup
        self.cuda = self.device.type == "cuda"
        self.times: list[tuple[int, float]] = []
        self._peak: float | None = None
        self._stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss_mb()
            self._thread = threading.Thread(target=self._sample_rss, daemon=True)
            self._thread.start()
        return self

    def _sample_rss(self):
        while not self._stop.wait(0.01):
            rss = _rss_mb()
            if rss is not None:
                self._peak = max(self._peak or 0.0, rss)

    def __exit__(self, *exc):
        if not self.cuda:
            self._stop.set()
            self._thread.join()
        return False

    def time(self, fn, n: int):
        """Run ``fn()`` (which makes ``n`` images) and record its wall time."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.times.append((n, time.perf_counter() - t0))
        return out

    def peak_memory(self) -> tuple[float | None, str]:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20, "cuda_max_allocated"
        return (None if self._peak is None else float(self._peak)), "cpu_peak_rss"

    def result(self) -> Speed | None:
        ms = sorted(1000 * t / n for n, t in self.times[self.warmup:] if n == self.batch_size)
        if not ms:
            return None
        mid = len(ms) // 2
        median = ms[mid] if len(ms) % 2 else (ms[mid - 1] + ms[mid]) / 2
        peak, kind = self.peak_memory()
        return Speed(self.batch_size, median, 1000 / median, peak, kind, ms[-1] - ms[0], len(ms))


@contextlib.contextmanager
def count_calls(*nets: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the rows the networks are evaluated on (``[rows]``): NFE per image = rows / images; a batched
    classifier-free-guidance call on 2B rows counts as 2 evaluations per image. Several networks (a hybrid's
    base and distilled model) add up; a network passed twice counts once."""
    rows = [0]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("x"))
        rows[0] += int(x.shape[0]) if isinstance(x, torch.Tensor) and x.ndim > 0 else 1

    unique = list({id(n): n for n in nets}.values())
    handles = [n.register_forward_pre_hook(hook, with_kwargs=True) for n in unique]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()
