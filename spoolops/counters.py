"""The worker's counters: requests served by op and outcome, durations, uptime.

The worker counts in memory and hands a snapshot to its transport (the spool
keeps it in ``work/stats.json``) at most twice a second, and at once when
``spoolops status`` asks (SIGUSR1), so that status and the Prometheus
metrics report them without talking to the worker.  The snapshot also
carries what the worker knows of its queue (``gauges``).  Trusts nothing;
does no I/O of its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .formats import utc_iso

# seconds; Prometheus histogram upper bounds (+Inf is implicit)
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)
SAVE_INTERVAL_S = 0.5


class Stats:
    """Counters, and when to save them (``save`` is the transport's)."""

    def __init__(self, save: Callable[[dict[str, Any]], bool]) -> None:
        self._save = save
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

    def snapshot(self, gauges: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "started_at": utc_iso(self.started_at),
                "started_ts": self.started_at, "updated_at": utc_iso(),
                "served": self.served, **gauges, "outcomes": self.outcomes,
                "buckets": list(BUCKETS), "histograms": self.histograms}

    def save_due_in(self) -> float | None:
        """Seconds until unsaved counts should be saved, or None if all saved."""
        if not self._dirty:
            return None
        return max(0.0, SAVE_INTERVAL_S - (time.monotonic() - self._saved))

    def maybe_save(self, gauges: Callable[[], dict[str, Any]]) -> bool:
        """Save if counts changed and the last save is old enough; True if saved."""
        if self._dirty and time.monotonic() - self._saved >= SAVE_INTERVAL_S:
            return self.save(gauges())
        return False

    def save(self, gauges: dict[str, Any]) -> bool:
        if not self._save(self.snapshot(gauges)):
            return False  # statistics are a courtesy (disk full must not stop the worker)
        self._dirty = False
        self._saved = time.monotonic()
        return True
