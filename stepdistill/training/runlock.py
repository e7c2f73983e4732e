"""One training per run directory: ``RUN/.lock``, an exclusive ``flock`` holding the owner's PID and host. The
kernel drops the lock when its process dies (even by ``kill -9``), so a lock file left behind is stale and is
taken over with a one-line notice; a live holder makes a second training fail with one line naming it."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from .. import signals
from ..errors import UsageError

LOCK_FILE = ".lock"


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory (created if missing; removed again if it is left
    empty)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.path, self.fd = Path(run_dir), Path(run_dir) / LOCK_FILE, None
        self._created = False

    def __enter__(self) -> "RunLock":
        self._created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create run directory {self.run_dir}: {e.strerror or e}") from None
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UsageError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise UsageError(f"run directory {self.run_dir} is in use by {holder}; wait for it to finish or "
                                 f"choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder released and removed the file between our open and flock: try again
                self.fd = fd
            else:
                os.close(fd)
        stale = _read(self.fd)
        if stale:
            print(f"stepdistill: taking over the stale lock of {_describe(stale)} (no longer running)",
                  file=sys.stderr)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._forget = signals.on_stop(self.release)
        return self

    def __exit__(self, *exc) -> None:
        self._forget()
        self.release()

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
        if self._created:
            try:
                self.run_dir.rmdir()  # only when nothing was written into it
            except OSError:
                pass


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
