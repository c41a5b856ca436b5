"""The worker lock: ``work/worker.lock``, held with ``flock`` for a worker's life.

One worker per spool: a second exits with ``WorkerRunning`` (or, as a
standby, polls until the lock is free, so that signals stay prompt and it
takes over within a fraction of a second).  The holder writes its pid into
the file; ``worker_alive`` tells whether anyone holds it (a shared,
non-blocking ``flock`` fails) and who.  Trusts: ``work/`` (the worker's own).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import WorkerRunning
from .base import WorkerLock

log = logging.getLogger("spoolops.worker")


class FlockWorkerLock(WorkerLock):
    """The singleton lock ``work/worker.lock`` (flock), holding the pid."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, wait: bool = False, should_stop: Any = None) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (should_stop is not None and should_stop()):
                    holder = read_lock_pid(self.path)
                    os.close(fd)
                    raise WorkerRunning(
                        f"another worker (pid {holder or 'unknown'}) holds {self.path};"
                        " stop it first, or start this one with --standby to take"
                        " over when it exits") from None
                time.sleep(0.05)  # a standby polls so that signals stay prompt
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk must not keep the worker from starting
            log.warning("event=lock_pid_unwritten error=%r", exc.strerror or exc)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def read_lock_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def worker_alive(path: Path) -> tuple[bool | None, int | None]:
    """(alive, pid) from the lock; alive is None when the lock is unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    except PermissionError:
        return None, None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True, read_lock_pid(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)
