"""Worker statistics: requests served by op and outcome, durations, uptime.

The worker counts in memory and rewrites ``work/stats.json`` (atomically, at
most once a second) so that ``spoolops status`` and the Prometheus metrics
can report them without talking to the worker.  Trusts: ``work/``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from .spool import encode_json, utc_iso, write_atomic

STATS_NAME = "stats.json"
# seconds; Prometheus histogram upper bounds (+Inf is implicit)
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)
SAVE_INTERVAL_S = 0.5


class Stats:
    def __init__(self, work_dir: Path) -> None:
        self.path = Path(work_dir) / STATS_NAME
        self.started_at = time.time()
        self.served = 0
        self.outcomes: dict[str, dict[str, int]] = {}
        self.histograms: dict[str, dict[str, Any]] = {}
        self._dirty = True
        self._saved = 0.0

    def started(self) -> None:
        self.started_at = time.time()
        self._dirty = True

    def count(self, op: str, outcome: str, duration: float) -> None:
        self.served += 1
        by_op = self.outcomes.setdefault(op, {})
        by_op[outcome] = by_op.get(outcome, 0) + 1
        if outcome != "quarantined":
            hist = self.histograms.setdefault(
                op, {"buckets": [0] * len(BUCKETS), "count": 0, "sum": 0.0})
            for i, bound in enumerate(BUCKETS):
                if duration <= bound:
                    hist["buckets"][i] += 1
            hist["count"] += 1
            hist["sum"] += duration
        self._dirty = True

    def snapshot(self, queued: int, running: int) -> dict[str, Any]:
        return {"pid": os.getpid(), "started_at": utc_iso(self.started_at),
                "started_ts": self.started_at, "updated_at": utc_iso(),
                "served": self.served, "queued_known": queued, "running": running,
                "outcomes": self.outcomes, "buckets": list(BUCKETS),
                "histograms": self.histograms}

    def save_due_in(self) -> float | None:
        """Seconds until unsaved counts should be written, or None if all saved."""
        if not self._dirty:
            return None
        return max(0.0, SAVE_INTERVAL_S - (time.monotonic() - self._saved))

    def maybe_save(self, queue: Any, running: int) -> bool:
        """Save if counts changed and the last save is old enough; True if saved."""
        if self._dirty and time.monotonic() - self._saved >= SAVE_INTERVAL_S:
            return self.save(queue, running)
        return False

    def save(self, queue: Any, running: int) -> bool:
        try:
            write_atomic(self.path.with_suffix(".json.tmp"), self.path,
                         encode_json(self.snapshot(len(queue), running)), durable=False,
                         mode=0o644, own_staging=True)
        except OSError:
            return False  # statistics are a courtesy (disk full must not stop the worker)
        self._dirty = False
        self._saved = time.monotonic()
        return True


def load_stats(work_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(work_dir) / STATS_NAME).read_text())
    except (OSError, ValueError):
        return None


def fresh_stats(work_dir: Path, pid: int, wait_s: float = 1.0) -> dict[str, Any] | None:
    """The running worker's counters as of now.  The worker ``pid`` (the
    lock holder) is asked with SIGUSR1 to save them, and the save -- a new
    file renamed into place -- is awaited up to ``wait_s``; whoever may not
    signal it gets the last saved ones.  Only a process that saved these
    counters itself is signalled: a janitor holding the lock for recovery
    would die of a SIGUSR1."""
    path = Path(work_dir) / STATS_NAME
    saved = load_stats(work_dir)
    if saved is None or saved.get("pid") != pid:
        return saved
    try:
        before = os.stat(path).st_ino
        os.kill(pid, signal.SIGUSR1)
    except (OSError, ProcessLookupError):
        return saved
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            if os.stat(path).st_ino != before:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.002)   # the save takes a millisecond; nothing to block on here
    return load_stats(work_dir)
