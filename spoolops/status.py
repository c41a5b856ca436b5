"""What the spool holds, and whether it is healthy: the ``status`` object.

Counts and oldest age per state come from the transport (a listing, in the
process that asks -- never the worker's); the worker's own counters (served,
uptime) from its latest snapshot, asked for afresh when this process may
(``refresh``).  Problems are what an operator must act on: no worker, a
request queued longer than ``stuck_after``, orphans with no worker, states
this user may not see, follow-up hook calls that keep failing.  Read-only; trusts nothing it reads enough to act on it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .config import Config
from .hookledger import FAILED_AFTER, HookLedger
from .transport import Transport, open_transport
from .transport.base import STATES, SharedQueue


def spool_status(config: Config, clock: Callable[[], float] = time.time,
                 refresh: bool = False, transport: Transport | None = None
                 ) -> dict[str, Any]:
    """The ``status --json`` object of the design, plus a few extras.
    ``refresh``: ask the running worker for its counters as of now."""
    transport = transport if transport is not None else open_transport(config)
    now = clock()
    result: dict[str, Any] = {"root": str(config.root)}
    problems: list[str] = []
    counts = transport.counts(now)
    for state in STATES:
        count = counts[state]
        result[state] = {"count": count.count, "oldest_age_s": count.oldest_age_s}
    queued = counts["queued"]
    if queued.oldest_age_s is not None and queued.oldest_age_s > config.stuck_after:
        problems.append(f"request(s) queued longer than stuck_after"
                        f" ({config.stuck_after:g} s): the oldest for"
                        f" {queued.oldest_age_s:.0f} s")
    alive, pid = transport.worker_alive()
    result["worker"] = {"pid": pid, "alive": bool(alive)}
    try:
        # several workers (PostgreSQL): which is alive and holds what
        workers = transport.workers() if isinstance(transport, SharedQueue) else None
    except OSError:
        workers = None
    if workers is not None:
        result["workers"] = workers
    stats = transport.load_stats(fresh=refresh) if alive else None
    if stats is not None:
        result["worker"]["uptime_s"] = round(max(0.0, now - stats.get("started_ts", now)), 1)
        result["worker"]["served"] = stats.get("served")
    if alive is None:
        problems.append("cannot tell whether a worker runs: the worker lock is not readable"
                        " (run as root or the worker user)")
    elif not alive:
        problems.append("no worker holds the lock (start 'spoolops worker' or its service)")
        running = result["running"]["count"]
        if running:
            problems.append(f"{running} orphan(s) running"
                            f" ({transport.place_of('running')}) with no worker: they are"
                            " recovered when a worker starts")
    result["hooks"] = hook_counts(transport.work_dir, config.durable)
    if result["hooks"] is not None and result["hooks"]["failed"]:
        problems.append(f"{result['hooks']['failed']} follow-up hook call(s) failed"
                        f" {FAILED_AFTER} times or more and are still retried: see"
                        " 'spoolops hooks'")
    for count in counts.values():
        if count.problem == "missing":
            problems.append(f"{count.where} is missing: run 'spoolops init'")
    unreadable = [c.where for c in counts.values() if c.problem == "unreadable"]
    if unreadable:
        problems.append(f"cannot list {', '.join(unreadable)} as this user (run as root or"
                        " the worker user)")
    result["problems"] = problems
    return result


def hook_counts(work_dir: Any, durable: bool) -> dict[str, int] | None:
    """Kept hook calls by state; None when this user may not look."""
    try:
        if not os.access(work_dir, os.R_OK | os.X_OK):
            return None
    except OSError:
        return None
    return HookLedger(work_dir, durable).counts()
