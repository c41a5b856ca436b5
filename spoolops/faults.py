"""Fault injection for crash tests: SIGKILL this process at a chosen point.

Trusts: the process environment (set by tests or an operator, never by a
request).  ``SPOOLOPS_FAULT`` holds comma-separated ``POINT:N`` entries; when
a point's counter reaches N the process kills itself with SIGKILL, so no
``finally``, ``atexit`` or buffered write tidies up -- a crash, as far as the
process is concerned (not a power cut: the page cache survives).

Points: ``write`` (bytes written through ``write``/``pwrite`` here; the N-th
byte is the last to reach the file, so writes are cut mid-way), ``fsync``
(after the N-th fsync through ``fsync`` here or reported with ``hit``),
``bytes`` (bytes copied by ``ingest_upload``, checked after each chunk), and
named moments such as ``ingest.before_publish``.  Counters restart whenever
the variable's value changes, so a forked test child counts from zero.
When the variable is unset, counting costs a dictionary update.
"""

from __future__ import annotations

import os
import signal
import threading

FAULT_ENV = "SPOOLOPS_FAULT"

_counts: dict[str, int] = {}
_limits: dict[str, int] = {}
_spec: list[str | None] = [None]
_lock = threading.Lock()


def parse(spec: str) -> dict[str, int]:
    """``"fsync:2,bytes:10"`` -> ``{"fsync": 2, "bytes": 10}``; bad entries are ignored."""
    points: dict[str, int] = {}
    for entry in spec.split(","):
        name, sep, count = entry.strip().rpartition(":")
        if sep and name:
            try:
                points[name] = int(count)
            except ValueError:
                continue
    return points


def _sync_spec() -> None:
    spec = os.environ.get(FAULT_ENV) or None
    if spec != _spec[0]:
        _spec[0] = spec
        _counts.clear()
        _limits.clear()
        _limits.update(parse(spec or ""))


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hit(point: str, amount: int = 1) -> None:
    """Count ``amount`` at ``point``; SIGKILL the process if its limit is reached."""
    with _lock:
        _sync_spec()
        _counts[point] = _counts.get(point, 0) + amount
        limit = _limits.get(point)
        reached = limit is not None and _counts[point] >= limit
    if reached:
        _die()


def _allowed(n: int) -> int:
    """How many of the next ``n`` bytes may be written before the ``write`` limit."""
    with _lock:
        _sync_spec()
        limit = _limits.get("write")
        if limit is None:
            return n
        return max(0, min(n, limit - _counts.get("write", 0)))


def _written(n: int) -> None:
    with _lock:
        _counts["write"] = _counts.get("write", 0) + n


def write(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` at the current position (cut short by a ``write`` fault)."""
    view = memoryview(data)
    allowed = _allowed(len(view))
    while allowed:
        n = os.write(fd, view[:allowed])
        view, allowed = view[n:], allowed - n
        _written(n)
    if len(view):
        _die()


def pwrite(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (cut short by a ``write`` fault)."""
    view = memoryview(data)
    allowed = _allowed(len(view))
    while allowed:
        n = os.pwrite(fd, view[:allowed], offset)
        view, allowed, offset = view[n:], allowed - n, offset + n
        _written(n)
    if len(view):
        _die()


def fsync(fd: int) -> None:
    os.fsync(fd)
    hit("fsync")


def snapshot() -> dict[str, int]:
    """Every point's count since the variable last changed (for calibrating
    a crash test: which points a complete run passes, how often)."""
    with _lock:
        _sync_spec()
        return dict(_counts)


def counts() -> tuple[int, int]:
    """(bytes written, fsyncs) since the variable last changed."""
    with _lock:
        _sync_spec()
        return _counts.get("write", 0), _counts.get("fsync", 0)

