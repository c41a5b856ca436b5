"""Liveness: the worker's main loop proves that it turns, and says how it fares.

``Keepalive`` is called from the main loop only, so that a loop that hangs
stops it: ``WATCHDOG=1`` to systemd (``sdnotify``; a hung worker is killed
and restarted) and, on a shared transport, a heartbeat in the queue that
other workers judge.  A worker that learns from its heartbeat that it was
fenced (declared dead; its requests taken over) exits at once with
``EX_TEMPFAIL``: whatever it finished now would run those requests twice,
and systemd starts it afresh.

``gauges`` and ``write_metrics``: what the worker knows of its queue without
looking at it (queued and running requests, the oldest age of each), and
``[worker] metrics_file`` for node_exporter's textfile collector, rewritten
from the worker's memory -- no sweep of the spool on the loop's thread.

Trusts: the worker's own memory and its transport.  Writes one file, the
metrics file the configuration names (atomically; a failure is logged and
never stops the worker).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .counters import Stats
from .files import write_atomic
from .prometheus import render_metrics
from .schedule import Backlog
from .sdnotify import Notifier
from .transport import Transport
from .transport.base import STATES, SharedQueue

log = logging.getLogger("spoolops.worker")

# the exit status of a worker that must stop now (fenced): systemd restarts it
EX_TEMPFAIL = 75


class Keepalive:
    """Proves the loop turns: systemd's watchdog, the queue's heartbeat."""

    def __init__(self, notifier: Notifier, transport: Transport) -> None:
        self.notifier = notifier
        self.transport = transport
        self._next_beat: float | None = None

    def beat(self) -> None:
        """Ping and beat if due; exit the process if this worker was fenced."""
        self.notifier.ping()
        transport = self.transport
        if not isinstance(transport, SharedQueue) or transport.heartbeat_interval is None:
            return      # the spool: systemd's watchdog (and the worker lock) judge it
        interval = transport.heartbeat_interval
        now = time.monotonic()
        if self._next_beat is not None and now < self._next_beat:
            return
        self._next_beat = now + interval
        try:
            alive = transport.heartbeat()
        except OSError as exc:
            log.error("event=heartbeat_failed error=%r", str(exc))
            return
        if not alive:
            # another worker declared this one dead and took its requests
            # over: whatever it finishes now would run them twice
            log.critical("event=worker_fenced_self action=exit note=%r", "another worker"
                         " took this one's requests over (its heartbeat was stale)")
            logging.shutdown()
            os._exit(EX_TEMPFAIL)

    def due_in(self) -> float | None:
        """Seconds until ``beat`` has something to do (None: never)."""
        waits = [w for w in (self.notifier.due_in(),) if w is not None]
        if isinstance(self.transport, SharedQueue) and \
                self.transport.heartbeat_interval is not None:
            waits.append(0.0 if self._next_beat is None else
                         max(0.0, self._next_beat - time.monotonic()))
        return min(waits, default=None)


def gauges(backlog: Backlog, running: int, running_since: Iterable[float]) -> dict[str, Any]:
    """What the worker knows without looking at the spool: queued and
    running requests and how long the oldest of each has waited."""
    now = time.monotonic()
    seen = backlog.oldest_seen()
    since = min(running_since, default=None)
    return {"queued": {"count": len(backlog),
                       "oldest_age_s": None if seen is None else round(now - seen, 3)},
            "running": {"count": running,
                        "oldest_age_s": None if since is None else round(now - since, 3)}}


def write_metrics(path: str, gauges: dict[str, Any], stats: Stats) -> None:
    """Rewrite the metrics file at ``path`` from the worker's gauges and counters."""
    # failed requests and uncollected replies are no worker's business:
    # 'spoolops status --prometheus' (from cron) counts them
    status = {"worker": {"alive": True},
              **{state: gauges.get(state, {"count": None}) for state in STATES}}
    try:
        text = render_metrics(status, stats.snapshot(gauges))
        target = Path(path)
        write_atomic(target.with_name(f".{target.name}.tmp"), target, text.encode(),
                     durable=False, mode=0o644, own_staging=True)
    except OSError as exc:
        log.warning("event=metrics_failed path=%s error=%r", path, exc)
