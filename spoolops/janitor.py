"""The janitor: removes what is stale and reports stuck work.

Run from cron or a systemd timer as the worker user (``spoolops janitor``;
started as root it becomes the worker user first).  It is safe beside a busy
worker and busy clients because every removal is decided by age or by the
worker lock, never by "looks unused" (the transport's ``reap``: stale
temporary requests after ``tmp_ttl``, uncollected replies after
``reply_ttl``, failed entries after ``failed_ttl``, dead target locks).
When no worker holds the lock, the janitor takes it non-blocking (so no
worker can start meanwhile), settles what the dead worker left half-done
(``Transport.settle``: finished replies published, answered orphans
cleared, dead workers fenced -- nothing an operation decides) and runs the
worker's own start-up recovery: orphans are requeued or answered
``Interrupted``, journals rolled back -- unless an orphan's operation is
unknown to the janitor (a site package missing from its path), when it
recovers no orphan and says so.

Stuck work (exit 1 of the command): a request queued longer than
``stuck_after``, an orphan with no worker, or a request running (its run
record untouched) longer than ``stuck_after``.  The report says what was
done and what was not: nothing is listed as done that was not.

Trusts: the configuration.  The clock is injectable (``now``) so that tests
can age the tree.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import recovery
from .config import Config
from .dispatch import Dispatcher
from .errors import WorkerRunning
from .ops import Registry, default_registry
from .transport import Transport, open_transport
from .transport.base import Ages, Finding, Step

LOCK_TTL = 86400.0          # a target lock file unused for a day is dead
STUCK_KINDS = ("stuck", "orphan", "running_long")


@dataclass
class JanitorReport:
    root: str
    dry_run: bool
    worker: dict[str, Any]
    actions: list[Step] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    recovered: dict[str, int] | None = None

    @property
    def stuck(self) -> bool:
        """True when work is stuck: the command exits 1 (cron mails, monitors alert)."""
        return any(f.kind in STUCK_KINDS for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "dry_run": self.dry_run, "worker": self.worker,
                "stuck": self.stuck, "actions": [asdict(a) for a in self.actions],
                "findings": [asdict(f) for f in self.findings],
                "recovered": self.recovered}


def run_janitor(config: Config, dry_run: bool = False, now: Callable[[], float] = time.time,
                registry: Registry | None = None, lock_ttl: float = LOCK_TTL,
                transport: Transport | None = None) -> JanitorReport:
    """One janitor pass; returns what it did and found.

    ``lock_ttl``: how long a target lock file must sit unused before it is
    removed (a day; tests lower it to race the flock check against a worker).
    """
    transport = transport if transport is not None else open_transport(config)
    transport.check_exists()
    alive, pid = transport.worker_alive()
    report = JanitorReport(str(config.root), dry_run, {"alive": alive, "pid": pid})
    if alive is False:
        _recover(transport, config, report, registry)
    ages = Ages(config.tmp_ttl, config.reply_ttl, config.failed_ttl, config.stuck_after,
                lock_ttl)
    # with no worker, recovery (or, dry, its plan) has dealt with the worker's
    # home and the running requests
    removals, findings = transport.reap(now(), ages, report.worker["alive"] is not False,
                                        dry_run)
    report.actions += removals
    report.findings += findings
    return report


def _recover(transport: Transport, config: Config, report: JanitorReport,
             registry: Registry | None) -> None:
    """No worker: recover under the lock (or, dry, say what recovery would do)."""
    registry = registry if registry is not None else default_registry()
    dispatcher = Dispatcher(registry, config, transport.work_dir)
    interrupted = recovery.lost_reply(dispatcher)
    if report.dry_run:   # read-only: not even the lock is taken
        _plan(transport, registry, dispatcher, report,
              transport.settle(interrupted, dry_run=True), dry_run=True)
        return
    try:
        lock = transport.lock_worker(wait=False, should_stop=lambda: True)
    except WorkerRunning:
        report.worker["alive"] = True   # a worker started meanwhile
        return
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        report.worker["alive"] = None   # cannot tell, cannot recover
        return
    try:
        # under the lock: a worker may have finished some meanwhile.  Settled
        # first (a finished reply published, an answered orphan cleared, a
        # dead worker fenced: nothing an op decides), so that the plan
        # reports only the orphans recovery then takes
        done = recovery.Recovery()
        done.settled(transport.settle(interrupted))
        if _plan(transport, registry, dispatcher, report, done.steps, dry_run=False) and \
                transport.recovery_pending():
            more = recovery.recover(transport, registry, dispatcher)
            for kind, count in more.counts.items():
                done.counts[kind] += count
            done.steps += more.steps
        if done.steps:
            report.recovered = done.counts
            report.actions += done.steps
    finally:
        lock.release()


def _plan(transport: Transport, registry: Registry, dispatcher: Dispatcher,
          report: JanitorReport, settled: list[Step], dry_run: bool) -> bool:
    """Report each orphan with what recovery does (or, dry, would do) to it,
    and what settling did (would do) first -- an orphan it clears is none of
    the plan's.  False when an orphan's op is unknown here: the worker may
    know ops this janitor does not, and interrupting them could be wrong."""
    cleared = {step.path for step in settled if step.action == "clear"}
    plans = []
    unknown: set[str] = set()
    for orphan in transport.orphans():
        if orphan.where in cleared:
            continue
        what, op_name, _ = recovery.plan_orphan(transport, registry, dispatcher, orphan)
        if op_name is not None and op_name not in registry:
            unknown.add(op_name)
        plans.append((orphan, what, op_name))
    running = transport.place_of("running")
    for orphan, what, op_name in plans:
        where = f"claimed by a worker that is gone ({running}, op {op_name or '?'})"
        if unknown:
            why = (f"{where}: left for the worker's own recovery, because this janitor does"
                   f" not know {', '.join(sorted(unknown))}")
        elif dry_run:
            why = f"{where}: recovery would {what} it"
            report.actions.append(Step(what, orphan.where, "worker recovery of an orphan"))
        else:
            why = f"{where}: recovered ({what})"
        report.findings.append(Finding("orphan", orphan.where, why))
    if dry_run:
        report.actions += settled
    return not unknown
