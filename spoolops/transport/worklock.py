"""The worker lock: ``work/worker.lock``, held with ``flock`` for a worker's life.

One worker per home (``workhome``), on either transport: a second exits with ``WorkerRunning`` (or, as a
standby, polls until the lock is free, so that signals stay prompt and it
takes over within a fraction of a second).  The holder writes its pid into
the file; ``worker_alive`` tells whether anyone holds it (a shared,
non-blocking ``flock`` fails) and who.  ``signal_worker`` is how anyone
else (``spoolops status``) may signal that holder.

Trusts: the worker's own ``work/`` for holding the lock.  Readers trust
nothing in it: root's ``status`` reads a file the worker account may have
rigged (a link, a FIFO, a pid of ``-1`` or of a root process), so the lock
is opened without following links or blocking, its pid must be a plain
number above 1, and a signal goes only, through a pidfd, to a process that
runs as the worker user.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import signal
import stat
import time
from pathlib import Path
from typing import Any

from ..errors import WorkerRunning
from ..files import UnsafeEntry, read_untrusted
from .base import WorkerLock

log = logging.getLogger("spoolops.worker")

MAX_LOCK_BYTES = 64            # "<pid>\n" is all a worker writes
# ASCII digits only (int() also takes "-1", "+5", "1_0", " 7 " and other scripts' digits)
_PID_TEXT = re.compile(rb"[0-9]{1,10}")
_PID_LIMIT = 1 << 22           # the kernel's largest pid_max


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


def parse_pid(data: bytes) -> int | None:
    """The pid in a lock file's bytes: a plain decimal number above 1 (never
    0, 1 or negative: ``kill`` reads those as "my group", init, "everyone"
    or a group), else None."""
    text = data.strip()
    if not _PID_TEXT.fullmatch(text):
        return None
    pid = int(text)
    return pid if 1 < pid < _PID_LIMIT else None


def read_lock_pid(path: Path) -> int | None:
    """The pid written in the lock file at ``path``, or None (no file, not a
    plain file, no valid pid)."""
    try:
        return parse_pid(read_untrusted(path, MAX_LOCK_BYTES, limit_name="a lock file's"
                                        " size").data)
    except (OSError, UnsafeEntry):
        return None


def worker_alive(path: Path) -> tuple[bool | None, int | None]:
    """(alive, pid) from the lock; alive is None when the lock is unreadable
    or is not a plain file (then nobody can tell)."""
    try:
        # O_NOFOLLOW: never a link's target; O_NONBLOCK: a FIFO must not hang us
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY |
                     os.O_CLOEXEC)
    except FileNotFoundError:
        return False, None
    except OSError:        # EACCES, or ELOOP/ENXIO: a link or a socket in its place
        return None, None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            # the pid from the file we hold open, not from the name again
            return True, parse_pid(os.pread(fd, MAX_LOCK_BYTES, 0))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    except OSError:
        return None, None
    finally:
        os.close(fd)


def signal_worker(pid: int, uid: int, sig: int) -> bool:
    """Send ``sig`` to process ``pid`` only if it runs as ``uid`` (real,
    effective, saved and filesystem uid alike); True if sent.

    Through a pidfd, so that the process checked is the process signalled:
    its uids are read from /proc after the pidfd is open, and the pidfd
    must still name a process afterwards (so the pid was not reused in
    between).  Never pid 0, 1, a negative one, or this process; a kernel
    without pidfds gets no signal at all.
    """
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return False
    try:
        if _uids_of(pid) != {uid}:
            return False
        signal.pidfd_send_signal(pidfd, 0)   # still the process the pidfd names
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def _uids_of(pid: int) -> set[int]:
    """The uids of process ``pid`` as /proc shows them; empty if /proc is not
    this process's own pid namespace's (its numbers would be someone else's)."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return set()
        with open(f"/proc/{pid}/status", "rb") as f:   # the kernel's: trusted
            text = f.read(1 << 16)
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(b"Uid:"):
            try:
                return {int(field) for field in line.split()[1:]}
            except ValueError:
                return set()
    return set()
