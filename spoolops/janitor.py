"""The janitor: removes what is stale from a spool and reports stuck work.

Run from cron or a systemd timer as the worker user (``spoolops janitor``).
It is safe beside a busy worker and busy clients because every removal is
decided by age or by the worker lock, never by "looks unused":

- ``tmp/``: files older than ``tmp_ttl`` (a client died mid-write; a live
  client renames its file into ``new/`` within moments of creating it).
- ``replies/``: replies older than ``reply_ttl`` (their client gave up).
- ``failed/``: entries and their ``.reason`` files once the failure is older
  than ``failed_ttl``; a reason whose entry is gone (and that marks nothing
  left in ``new/`` or ``active/``) and an entry without a reason, likewise.
- ``work/``: never ``worker.lock``, ``stats.json``, staged replies, journals
  or temp records while a worker holds the lock.  Only staging leftovers
  (``*.tmp``) older than ``tmp_ttl``, and target lock files
  (``work/locks/*.lock``) untouched for ``LOCK_TTL`` that a non-blocking
  ``flock`` shows nobody holds (unlinked while we hold that flock).
- ``active/``: reported.  When no worker holds the lock, the janitor takes it
  non-blocking (so no worker can start meanwhile) and runs the worker's own
  start-up recovery (``recovery.recover``): orphans are requeued or answered
  ``Interrupted``, staged replies published, journals rolled back.
- ``new/``: requests older than ``stuck_after`` are reported as stuck.

Stuck work (exit 1 of the command): a request queued longer than
``stuck_after``, an orphan in ``active/`` with no worker, or a request
running (its run file untouched) longer than ``stuck_after``.

Trusts: the configuration and ``work/``.  Names found in the group-writable
folders are only ever unlinked (never followed); ages come from ``lstat``.
The clock is injectable (``now``) so that tests can age the tree.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import recovery
from .config import Config
from .dispatch import Dispatcher
from .errors import WorkerRunning
from .lock import WorkerLock, worker_alive
from .ops import Registry, default_registry
from .spool import (
    LOCK_NAME,
    REASON_SUFFIX,
    REQUEST_SUFFIX,
    RUN_SUFFIX,
    STAGED_REPLY_SUFFIX,
    Spool,
    reason_file_name,
)
from .stats import STATS_NAME

log = logging.getLogger("spoolops.janitor")

LOCK_TTL = 86400.0          # a target lock file unused for a day is dead
LOCKS_DIR = "locks"
KEEP_IN_WORK = {LOCK_NAME, STATS_NAME}


@dataclass
class Action:
    """One thing the janitor did (or, with ``dry_run``, would do)."""

    action: str             # "remove", "recover", "requeue", "interrupt", "clear", ...
    path: str
    why: str
    age_s: float | None = None
    done: bool = False
    error: str | None = None


@dataclass
class Finding:
    """Something reported, not changed: stuck or orphaned work."""

    kind: str               # "stuck", "orphan", "running_long", "unpublished", "skipped"
    path: str
    why: str
    age_s: float | None = None


@dataclass
class JanitorReport:
    root: str
    dry_run: bool
    worker: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    recovered: dict[str, int] | None = None

    @property
    def stuck(self) -> bool:
        """True when work is stuck: the command exits 1 (cron mails, monitors alert)."""
        return any(f.kind in ("stuck", "orphan", "running_long") for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "dry_run": self.dry_run, "worker": self.worker,
                "stuck": self.stuck, "actions": [asdict(a) for a in self.actions],
                "findings": [asdict(f) for f in self.findings],
                "recovered": self.recovered}


class _Janitor:
    def __init__(self, config: Config, dry_run: bool, now: Callable[[], float],
                 registry: Registry | None, lock_ttl: float = LOCK_TTL) -> None:
        self.lock_ttl = lock_ttl
        self._unknown_ops: set[str] = set()
        self.config = config
        self.spool = Spool(config.root, config.durable, config.max_request_bytes)
        self.dry_run = dry_run
        self.now = now()
        self.registry = registry
        alive, pid = worker_alive(self.spool.lock_path)
        self.report = JanitorReport(str(config.root), dry_run,
                                    {"alive": alive, "pid": pid})

    # -- helpers ------------------------------------------------------------

    def _age(self, st: os.stat_result, ctime: bool = False) -> float:
        stamp = max(st.st_mtime, st.st_ctime) if ctime else st.st_mtime
        return max(0.0, self.now - stamp)

    def _remove(self, path: Path, why: str, age: float | None) -> None:
        action = Action("remove", str(path), why, None if age is None else round(age, 1))
        self.report.actions.append(action)
        if self.dry_run:
            return
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                os.unlink(path)
            action.done = True
            log.info("event=janitor_removed path=%s why=%r", path, why)
        except FileNotFoundError:
            action.done = True  # gone meanwhile (renamed by its owner, or collected)
        except OSError as exc:
            action.error = f"{exc.strerror or exc}"

    def _entries(self, directory: Path) -> list[tuple[str, os.stat_result]]:
        out = []
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return out
        for name in names:
            try:
                out.append((name, os.lstat(directory / name)))
            except FileNotFoundError:
                continue
        return out

    # -- the folders --------------------------------------------------------

    def _remove_older(self, folder: Path, ttl: float, why: str) -> None:
        for name, st in self._entries(folder):
            age = self._age(st)
            if age > ttl:
                self._remove(folder / name, why, age)

    def tmp(self) -> None:
        self._remove_older(self.spool.tmp, self.config.tmp_ttl,
                           "left in tmp/ longer than tmp_ttl (its client died mid-write)")

    def replies(self) -> None:
        self._remove_older(self.spool.replies, self.config.reply_ttl,
                           "not collected within reply_ttl (its client gave up)")

    def failed(self) -> None:
        entries = dict(self._entries(self.spool.failed))
        ttl = self.config.failed_ttl
        reasons = {n for n in entries if n.endswith(REASON_SUFFIX)}
        for name, st in entries.items():
            if name in reasons:
                continue
            reason = reason_file_name(name)
            # the failure's age: when its reason was written (else when it was moved here)
            rst = entries.get(reason)
            age = self._age(rst) if rst is not None else self._age(st, ctime=True)
            if age > ttl:
                self._remove(self.spool.failed / name, "failed longer ago than failed_ttl", age)
                if rst is not None:
                    self._remove(self.spool.failed / reason, "its entry expired", age)
            reasons.discard(reason)
        # reasons without an entry in failed/: unmovable entries left in new/ or
        # active/ (the reason makes the worker skip them), or a requeue cut short
        for reason in sorted(reasons):
            name = reason[: -len(REASON_SUFFIX)]
            age = self._age(entries[reason])
            left = [d / name for d in (self.spool.new, self.spool.active)
                    if os.path.lexists(d / name)]
            if left:
                self.report.findings.append(Finding(
                    "skipped", str(left[0]), "could not be moved to failed/; the worker"
                    f" skips it (see failed/{reason}); remove it by hand", round(age, 1)))
                continue
            if age > ttl:
                self._remove(self.spool.failed / reason, "a reason whose entry is gone", age)

    def new(self) -> None:
        for name, st in self._entries(self.spool.new):
            age = self._age(st)
            if age <= self.config.stuck_after or self.spool.has_reason(name):
                continue
            self.report.findings.append(Finding(
                "stuck", str(self.spool.new / name), "queued longer than stuck_after"
                f" ({self.config.stuck_after:g} s): is the worker down or wedged?",
                round(age, 1)))

    def work_files(self, worker_alive_now: bool) -> None:
        """Staging leftovers and dead target locks.  While a worker runs only
        what age proves dead; recovery handles the rest under the lock."""
        for name, st in self._entries(self.spool.work):
            if name in KEEP_IN_WORK or not stat.S_ISREG(st.st_mode):
                continue
            age = self._age(st)
            if name.endswith(".tmp") and age > self.config.tmp_ttl and worker_alive_now:
                self._remove(self.spool.work / name, "staging leftover older than tmp_ttl",
                             age)
            elif name.endswith(STAGED_REPLY_SUFFIX) and worker_alive_now and \
                    age > self.config.stuck_after:
                self.report.findings.append(Finding(
                    "unpublished", str(self.spool.work / name), "a finished reply the worker"
                    " has not managed to publish (disk full?); it keeps retrying",
                    round(age, 1)))
        self._target_locks()

    def _target_locks(self) -> None:
        ldir = self.spool.work / LOCKS_DIR
        for name, st in self._entries(ldir):
            age = self._age(st)
            if not name.endswith(".lock") or not stat.S_ISREG(st.st_mode) or age <= self.lock_ttl:
                continue
            path = ldir / name
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use right now: not dead
                # unlink while holding the flock: whoever opened it before us
                # gets it after we close and finds it unlinked (filelock retries)
                self._remove(path, f"target lock unused for {self.lock_ttl / 3600:g} h and"
                             " held by nobody", age)
            finally:
                os.close(fd)

    def stale_run_files(self) -> None:
        """``active/ID.json.run`` without its request, older than tmp_ttl."""
        for name, st in self._entries(self.spool.active):
            if not name.endswith(RUN_SUFFIX):
                continue
            if os.path.lexists(self.spool.active / name[: -len(".run")]):
                continue
            age = self._age(st)
            if age > self.config.tmp_ttl:
                self._remove(self.spool.active / name, "a run file whose request is gone", age)

    def active(self) -> bool:
        """Report ``active/``; with no worker, recover it under the lock.
        Returns whether the worker lock was free (and so recovery applied)."""
        orphans = [(n, st) for n, st in self._entries(self.spool.active)
                   if not n.endswith(RUN_SUFFIX)]
        alive = self.report.worker["alive"]
        if alive:
            for name, st in orphans:
                run = self.spool.active / (name[: -len(REQUEST_SUFFIX)] + RUN_SUFFIX)
                try:
                    age = self._age(os.lstat(run))  # refreshed by progress reports
                except FileNotFoundError:
                    age = self._age(st, ctime=True)
                if age > self.config.stuck_after:
                    self.report.findings.append(Finding(
                        "running_long", str(self.spool.active / name), "running (or its"
                        " progress unchanged) longer than stuck_after", round(age, 1)))
            self.stale_run_files()
            return False
        if alive is None:
            return False  # cannot tell: never recover without the lock
        if self.dry_run:
            self._plan(orphans)  # read-only: not even the lock file is touched
            self._plan_work_leftovers()
            return True
        lock = WorkerLock(self.spool.lock_path)
        try:
            lock.acquire(wait=False)
        except WorkerRunning:
            self.report.worker["alive"] = True  # a worker started meanwhile
            return False
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return False
        try:
            # listed again under the lock: a worker may have finished some meanwhile
            orphans = [(n, st) for n, st in self._entries(self.spool.active)
                       if not n.endswith(RUN_SUFFIX)]
            registry, dispatcher, staged = self._plan(orphans)
            if self._unknown_ops:
                # the worker may know ops this janitor does not (a site package
                # missing from its path): interrupting them could be wrong, so
                # nothing is recovered and the report says so
                return True
            if orphans or staged or self._recovery_pending():
                done = recovery.recover(self.spool, registry, dispatcher)
                self.report.recovered = done.counts
                self.report.actions += [Action(step.action, step.path, step.why, None,
                                               done=step.error is None, error=step.error)
                                        for step in done.steps]
            self.stale_run_files()
        finally:
            lock.release()
        return True

    def _plan(self, orphans: list[tuple[str, os.stat_result]]
              ) -> tuple[Registry, Dispatcher, list[str]]:
        """Report each orphan and staged reply with what recovery does (or,
        in a dry run, would do) to it."""
        registry = self.registry if self.registry is not None else default_registry()
        dispatcher = Dispatcher(registry, self.config, self.spool.work)
        plans = []
        for name, st in sorted(orphans):
            what, op_name, _ = recovery.plan_orphan(self.spool, registry, dispatcher, name)
            if op_name is not None and op_name not in registry:
                self._unknown_ops.add(op_name)
            plans.append((name, st, what, op_name))
        for name, st, what, op_name in plans:
            age = round(self._age(st, ctime=True), 1)
            path = str(self.spool.active / name)
            if self._unknown_ops:
                why = (f"in active/ with no worker (op {op_name or '?'}): left for the"
                       " worker's own recovery, because this janitor does not know"
                       f" {', '.join(sorted(self._unknown_ops))}")
            elif self.dry_run:
                why = f"in active/ with no worker (op {op_name or '?'}): recovery would {what} it"
                self.report.actions.append(Action(what, path, "worker recovery of an orphan",
                                                  age))
            else:
                why = f"in active/ with no worker (op {op_name or '?'}): recovered ({what})"
            self.report.findings.append(Finding("orphan", path, why, age))
        staged = self.spool.staged_replies()
        if self.dry_run:
            for rid in staged:
                self.report.actions.append(Action(
                    "publish", str(self.spool.work / (rid + STAGED_REPLY_SUFFIX)),
                    "a finished reply the dead worker had not published", None))
        return registry, dispatcher, staged

    def _plan_work_leftovers(self) -> None:
        for name, st in sorted(self._entries(self.spool.work)):
            if name.endswith(".tmp") and stat.S_ISREG(st.st_mode):
                self.report.actions.append(Action(
                    "remove", str(self.spool.work / name), "staging leftover of a dead"
                    " worker (removed by recovery)", round(self._age(st), 1)))

    def _recovery_pending(self) -> bool:
        """Leftovers only recovery may touch: journals, temp records, staging files."""
        for sub in ("journals", "temps"):
            try:
                if any(os.scandir(self.spool.work / sub)):
                    return True
            except (FileNotFoundError, NotADirectoryError):
                continue
        return any(n.endswith(".tmp") for n, _ in self._entries(self.spool.work))


def run_janitor(config: Config, dry_run: bool = False, now: Callable[[], float] = time.time,
                registry: Registry | None = None, lock_ttl: float = LOCK_TTL
                ) -> JanitorReport:
    """One janitor pass over the spool of ``config``; returns what it did and found.

    ``lock_ttl``: how long a target lock file must sit unused before it is
    removed (a day; tests lower it to race the flock check against a worker).
    """
    janitor = _Janitor(config, dry_run, now, registry, lock_ttl)
    janitor.spool.check_exists()
    recovered_under_lock = janitor.active()
    janitor.tmp()
    janitor.replies()
    janitor.failed()
    janitor.new()
    janitor.work_files(worker_alive_now=not recovered_under_lock)
    return janitor.report
