"""SIGINT and SIGTERM (Ctrl-C, a cluster's preemption) as a clean stop. The command line :func:`install` s the
handlers first thing. Outside training a signal ends the process at once with one line (exit code 128 +
signal: 130 / 143), after the cleanups registered with :func:`on_stop` (the run lock); nothing is raised into
whatever code is running, so no half-done import or library state can turn it into a traceback. Inside
:func:`deferred` (the training loop) it only records the signal: the loop finishes the current optimiser step,
writes a checkpoint and raises :class:`Interrupted` itself. A second signal exits at once, without a
checkpoint. ``os`` and ``signal`` only: it is imported before anything else."""

import os
import signal

NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

_received: int | None = None  # the first signal received (None: none)
_deferred = 0  # > 0 inside deferred()
_cleanups: list = []  # callables run before a signal ends the process


class Interrupted(BaseException):
    """A stop signal ended training after a checkpoint. A BaseException (like KeyboardInterrupt), so
    ``except Exception`` does not hide it."""

    def __init__(self, signum: int):
        super().__init__(name(signum))
        self.signum = signum

    @property
    def name(self) -> str:
        return name(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def name(signum: int) -> str:
    return NAMES.get(signum, f"signal {signum}")


def install() -> None:
    """Handle SIGINT and SIGTERM as described above (call from the main thread). A signal the parent set to be
    ignored stays ignored (a shell's background job ignores SIGINT, ``nohup`` runs ...)."""
    for signum in NAMES:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _handle)


def _handle(signum, frame) -> None:
    global _received
    if _received is None and _deferred:
        _received = signum
        return
    first = _received is None
    for cleanup in reversed(_cleanups):
        try:
            cleanup()
        except Exception:  # leaving anyway
            pass
    how = "" if first else "second "
    more = "" if first else "; exiting now without a checkpoint"
    os.write(2, f"stepdistill: stopped by {how}{name(signum)}{more}\n".encode())
    os._exit(128 + signum)


def on_stop(cleanup):
    """Run ``cleanup`` when a signal ends the process at once; returns a function that unregisters it."""
    _cleanups.append(cleanup)
    return lambda: _cleanups.remove(cleanup) if cleanup in _cleanups else None


def requested() -> int | None:
    """The signal that asked training to stop (None: none)."""
    return _received


def request(signum: int) -> None:
    """Ask training to stop as a signal would (tests)."""
    global _received
    _received = signum


def reset() -> None:
    global _received
    _received = None


class deferred:
    """``with deferred():`` a signal is only recorded (:func:`requested`); the caller checks it at safe points."""

    def __enter__(self):
        global _deferred
        _deferred += 1

    def __exit__(self, *exc):
        global _deferred
        _deferred -= 1
