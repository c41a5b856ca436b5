"""Keeping the spool: making the tree, putting requests back, reaping what is
stale, and the worker's counters.

``create`` gives every folder the owner, group and mode of the design
(setgid everywhere, so that files take the submit group) through folder
descriptors (``files.ensure_tree``): a folder the worker account swapped
for a symbolic link is refused, and nothing is ever changed through one.
``requeue`` puts a failed (or, with no worker, an orphaned) request back
in line, never through ``new/``.  ``reap`` is the janitor's share: every removal is decided by
age or by a lock nobody holds, never by "looks unused", so it is safe beside
a busy worker and busy clients; names found in the group-writable folders
are only ever unlinked, and ages come from ``lstat``.  ``load_stats`` reads
the counters and asks the worker for fresh ones.

A mixin of ``SpoolTransport`` (its folders and names).  Trusts the caller's
privileges; ``work/`` for what it writes there as the worker (requeue,
reap, save_stats) -- but not what it reads for others: ``create`` and
``load_stats`` also run for root, and the worker account may have rigged
``work/`` (links, FIFOs, a stats file naming any pid), so the counters and
the lock are read as ``files.read_untrusted`` reads, and a signal goes
only to a process of the worker user.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import SpoolSetupError
from ...files import (
    UnsafeEntry,
    ensure_tree,
    read_untrusted,
    remove_quietly,
    rename_noreplace,
    write_atomic,
)
from ...formats import encode_json
from ...hookledger import HookLedger
from ...workhome import (
    MADE_BY_INIT,
    OWN_FILES,
    STATS_NAME,
    TARGET_LOCKS_DIR,
    leftovers_pending,
    stats_path,
)
from ..base import Ages, Finding, Step
from ..worklock import signal_worker, worker_alive
from .names import (
    DIR_MODES,
    FAILING_SUFFIX,
    HELD_SUFFIX,
    REASON_SUFFIX,
    REQUEST_SUFFIX,
    ROOT_MODE,
    RUN_SUFFIX,
    STAGED_REPLY_SUFFIX,
    reason_file_name,
)

log = logging.getLogger("spoolops.janitor")

INOTIFY_PROC = Path("/proc/sys/fs/inotify")
MIN_INOTIFY = {"max_user_instances": 128, "max_queued_events": 16384,
               "max_user_watches": 8192}
KEEP_IN_WORK = OWN_FILES
MAX_STATS_BYTES = 1 << 20      # counters per op and outcome: kilobytes in practice


class SpoolCare:
    """Creating, requeueing and reaping (mixed into ``SpoolTransport``)."""

    root: Path
    tmp: Path
    new: Path
    active: Path
    failed: Path
    replies: Path
    pending: Path
    work: Path
    max_request_bytes: int
    lock_path: Path
    worker_uid: Callable[[], int]

    # -- the tree ---------------------------------------------------------------

    def diagnose(self) -> list[tuple[str, bool, str, str]]:
        """The host's inotify limits: the worker and every client process
        each take one instance (``max_user_instances``); a burst of requests
        must not overflow the worker's queue of events (a rescan would
        catch up, slower)."""
        out = []
        for name, minimum in MIN_INOTIFY.items():
            try:
                value = int((INOTIFY_PROC / name).read_text().strip())
            except (OSError, ValueError):
                out.append((f"inotify {name}", False, f"cannot read {INOTIFY_PROC / name}",
                            "is this Linux with inotify?"))
                continue
            if value < minimum:
                fix = f"sysctl -w fs.inotify.{name}={minimum} (and in /etc/sysctl.d/)"
                out.append((f"inotify {name}", False,
                            f"fs.inotify.{name} = {value}, below {minimum}", fix))
            else:
                out.append((f"inotify {name}", True, f"{value}", ""))
        return out

    def layout(self) -> list[tuple[str, Path, tuple[int, ...]]]:
        """(label, folder, allowed modes) of the tree, for ``spoolops doctor``."""
        out = [("spool root", self.root, (ROOT_MODE,))]
        for name, mode in DIR_MODES.items():
            # work/: 2700; 0700 in older trees (doctor checks the reply group)
            out.append((f"{name}/", self.root / name,
                        (mode, 0o700) if name == "work" else (mode,)))
        return out

    def create(self, uid: int, gid: int, **options: Any) -> list[str]:
        """Create or repair the tree for worker ``uid`` and submit group ``gid``;
        one line per change made.  (The spool takes no ``options``.)"""
        if options:
            raise SpoolSetupError(f"the spool takes no {', '.join(sorted(options))}")
        changes: list[str] = []
        folders = [*DIR_MODES.items(), *((f"work/{name}", DIR_MODES["work"]) for name in MADE_BY_INIT)]
        ensure_tree(self.root, ROOT_MODE, folders, uid, gid, changes)
        return changes

    # -- operators --------------------------------------------------------------

    def requeue(self, rid: str) -> str:
        """Back in line -- never through ``new/``, where a member who saw the
        id could swap it: from ``failed/`` into ``active/`` with no run record
        (a running worker adopts it at its next scan, which ``spoolops
        requeue`` asks for; else the next worker's recovery re-runs it as
        never started); from ``active/``, when no worker holds the lock
        (taken here, non-blocking, meanwhile), by dropping its run record, so
        that recovery re-runs it even if its op is not idempotent."""
        name = rid + REQUEST_SUFFIX
        if os.path.lexists(self.failed / name):
            try:
                rename_noreplace(str(self.failed / name), str(self.active / name))
            except FileExistsError:
                raise SpoolSetupError(f"a request {rid} is running: requeue it once it"
                                      " is done") from None
            remove_quietly(self.failed / reason_file_name(name))
            self._retire_stale_reply(name)
            return "failed/"
        if not os.path.lexists(self.active / name):
            raise SpoolSetupError(f"{rid} is neither in failed/ nor in active/")
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SpoolSetupError(f"{rid} is running under a live worker; it recovers"
                                      " its own orphans when restarted") from None
            if os.path.lexists(self.work / (rid + STAGED_REPLY_SUFFIX)):
                raise SpoolSetupError(f"{rid} finished: its reply waits in work/ and the"
                                      " worker publishes it when it starts") from None
            remove_quietly(self.active / (rid + RUN_SUFFIX))
            self._retire_stale_reply(name)
            return "active/"
        finally:
            os.close(fd)

    def _retire_stale_reply(self, name: str) -> None:
        """The request's earlier answer, if its client never collected it, is
        superseded by the re-run's (a waiting reply would make the claim
        refuse the id)."""
        try:
            st = os.lstat(self.replies / name)
        except FileNotFoundError:
            return
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            remove_quietly(self.replies / name)

    # -- the janitor ------------------------------------------------------------

    def reap(self, now: float, ages: Ages, worker_alive: bool, dry_run: bool
             ) -> tuple[list[Step], list[Finding]]:
        """Remove by age what nobody will collect or finish; report what is stuck.

        ``worker_alive``: a worker runs (its staging files are its own until
        they are old; it answers for what runs).  Otherwise recovery (under
        the lock, before this) has dealt with ``active/`` and ``work/``.
        """
        sweep = _Sweep(now, dry_run)
        sweep.older(self.tmp, ages.tmp_ttl,
                    "left in tmp/ longer than tmp_ttl (its client died mid-write)")
        sweep.older(self.replies, ages.reply_ttl,
                    "not collected within reply_ttl (its client gave up)")
        self._reap_failed(sweep, ages)
        self._reap_marks(sweep, ages)
        for name, st in _entries(self.new):
            age = sweep.age(st)
            if age > ages.stuck_after and not os.path.lexists(
                    self.failed / reason_file_name(name)):
                sweep.found("stuck", self.new / name, "queued longer than stuck_after"
                            f" ({ages.stuck_after:g} s): is the worker down or wedged?", age)
        if worker_alive:
            self._reap_running(sweep, ages)
        self._reap_work(sweep, ages, worker_alive)
        self._reap_target_locks(sweep, ages.lock_ttl)
        return sweep.removals, sweep.findings

    def _reap_marks(self, sweep: _Sweep, ages: Ages) -> None:
        """Pending marks older than ``tmp_ttl`` that no queued or running
        request and no kept hook call names: their client died before it
        queued the request, or the request was quarantined unread."""
        old = [(name, st) for name, st in _entries(self.pending)
               if sweep.age(st) > ages.tmp_ttl]
        if not old:
            return
        named = {call.marker for call in HookLedger(self.work, durable=False).calls()}
        for folder in (self.new, self.active):
            for name, _st in _entries(folder):
                if not name.endswith(REQUEST_SUFFIX):
                    continue
                try:
                    data = read_untrusted(folder / name, self.max_request_bytes,
                                          check_name=False, reader="the janitor").data
                    marker = json.loads(data).get("marker")
                except (UnsafeEntry, OSError, ValueError, AttributeError, RecursionError):
                    continue
                if isinstance(marker, str):       # a member's request says what it likes
                    named.add(marker)
        for name, st in old:
            if name.removesuffix(HELD_SUFFIX) not in named:
                sweep.remove(self.pending / name, "a pending mark no queued or running"
                             " request names, older than tmp_ttl", sweep.age(st))

    def _reap_failed(self, sweep: _Sweep, ages: Ages) -> None:
        entries = dict(_entries(self.failed))
        reasons = {n for n in entries if n.endswith(REASON_SUFFIX)}
        for name, st in entries.items():
            if name in reasons:
                continue
            reason = reason_file_name(name)
            # the failure's age: when its reason was written (else when it was moved here)
            rst = entries.get(reason)
            age = sweep.age(rst) if rst is not None else sweep.age(st, ctime=True)
            if age > ages.failed_ttl:
                sweep.remove(self.failed / name, "failed longer ago than failed_ttl", age)
                if rst is not None:
                    sweep.remove(self.failed / reason, "its entry expired", age)
            reasons.discard(reason)
        # reasons without an entry in failed/: unmovable entries left in new/ or
        # active/ (the reason makes the worker skip them), or a requeue cut short
        for reason in sorted(reasons):
            name = reason[: -len(REASON_SUFFIX)]
            age = sweep.age(entries[reason])
            left = [d / name for d in (self.new, self.active) if os.path.lexists(d / name)]
            if left:
                sweep.found("skipped", left[0], "could not be moved to failed/; the worker"
                            f" skips it (see failed/{reason}); remove it by hand", age)
            elif age > ages.failed_ttl:
                sweep.remove(self.failed / reason, "a reason whose entry is gone", age)

    def _reap_running(self, sweep: _Sweep, ages: Ages) -> None:
        """A live worker's requests: report those running too long; remove run
        files whose request is gone (older than tmp_ttl)."""
        for name, st in _entries(self.active):
            if name.endswith(RUN_SUFFIX):
                if not os.path.lexists(self.active / name[: -len(".run")]) and \
                        sweep.age(st) > ages.tmp_ttl:
                    sweep.remove(self.active / name, "a run file whose request is gone",
                                 sweep.age(st))
                continue
            try:   # the run file is refreshed by progress reports
                age = sweep.age(os.lstat(self.active / (name[: -len(REQUEST_SUFFIX)]
                                                        + RUN_SUFFIX)))
            except FileNotFoundError:
                age = sweep.age(st, ctime=True)
            if age > ages.stuck_after:
                sweep.found("running_long", self.active / name, "running (or its progress"
                            " unchanged) longer than stuck_after", age)

    def _reap_work(self, sweep: _Sweep, ages: Ages, worker_alive: bool) -> None:
        """Staging leftovers older than tmp_ttl, and replies a live worker keeps
        failing to publish (reported).  Never the lock or the counters."""
        if not worker_alive:
            return
        for name, st in _entries(self.work):
            if name in KEEP_IN_WORK or not stat.S_ISREG(st.st_mode):
                continue
            age = sweep.age(st)
            if name.endswith(".tmp") and age > ages.tmp_ttl:
                sweep.remove(self.work / name, "staging leftover older than tmp_ttl", age)
            elif name.endswith(STAGED_REPLY_SUFFIX) and age > ages.stuck_after:
                sweep.found("unpublished", self.work / name, "a finished reply the worker"
                            " has not managed to publish (disk full?); it keeps retrying",
                            age)

    def _reap_target_locks(self, sweep: _Sweep, lock_ttl: float) -> None:
        """Target lock files untouched for ``lock_ttl`` that a non-blocking flock
        shows nobody holds (unlinked while we hold that flock: whoever opened
        one before us gets it after we close and finds it unlinked -- filelock
        then retries on a new file)."""
        folder = self.work / TARGET_LOCKS_DIR
        for name, st in _entries(folder):
            age = sweep.age(st)
            if not name.endswith(".lock") or not stat.S_ISREG(st.st_mode) or age <= lock_ttl:
                continue
            path = folder / name
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use right now: not dead
                sweep.remove(path, f"target lock unused for {lock_ttl / 3600:g} h and held"
                             " by nobody", age)
            finally:
                os.close(fd)

    # -- the worker and its counters ----------------------------------------------------

    def worker_alive(self) -> tuple[bool | None, int | None]:
        return worker_alive(self.lock_path)

    def save_stats(self, snapshot: dict[str, Any]) -> bool:
        try:
            write_atomic(self.work / (STATS_NAME + ".tmp"), stats_path(self.work),
                         encode_json(snapshot), durable=False, mode=0o644, own_staging=True)
        except OSError:
            return False  # statistics are a courtesy (disk full must not stop the worker)
        return True

    def load_stats(self, fresh: bool = False) -> dict[str, Any] | None:
        """The counters in ``work/stats.json``.  ``fresh``: the worker (the
        lock holder) is asked with SIGUSR1 to save them now, and the save --
        a new file renamed into place -- is awaited up to a second; whoever
        may not signal it gets the last saved ones.  Only a process that
        saved these counters itself is signalled (a janitor holding the lock
        for recovery would die of a SIGUSR1), and only if it runs as the
        worker user (``signal_worker``): both files are the worker account's
        to write, and root must not signal whatever pid they name."""
        path = stats_path(self.work)
        saved = _read_json(path)
        if not fresh or saved is None:
            return saved
        alive, pid = self.worker_alive()
        if not alive or pid is None or saved.get("pid") != pid:
            return saved
        try:
            before = os.lstat(path).st_ino
            uid = self.worker_uid()
        except OSError:     # SpoolSetupError (no such worker user) included
            return saved
        if not signal_worker(pid, uid, signal.SIGUSR1):
            return saved
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                if os.lstat(path).st_ino != before:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.002)   # the save takes a millisecond; nothing to block on
        return _read_json(path)

    def recovery_pending(self) -> bool:
        """Leftovers of a dead worker only recovery may touch: staged replies,
        journals, temp records, staging files, orphans."""
        if leftovers_pending(self.work):
            return True
        return any(n.endswith((".tmp", STAGED_REPLY_SUFFIX, FAILING_SUFFIX)) for n, _ in _entries(self.work)) \
            or any(not n.endswith(RUN_SUFFIX) for n, _ in _entries(self.active))


class _Sweep:
    """Removals and findings of one janitor pass, at one ``now``."""

    def __init__(self, now: float, dry_run: bool) -> None:
        self.now, self.dry_run = now, dry_run
        self.removals: list[Step] = []
        self.findings: list[Finding] = []

    def age(self, st: os.stat_result, ctime: bool = False) -> float:
        stamp = max(st.st_mtime, st.st_ctime) if ctime else st.st_mtime
        return max(0.0, self.now - stamp)

    def found(self, kind: str, path: Path, why: str, age: float) -> None:
        self.findings.append(Finding(kind, str(path), why, round(age, 1)))

    def older(self, folder: Path, ttl: float, why: str) -> None:
        for name, st in _entries(folder):
            age = self.age(st)
            if age > ttl:
                self.remove(folder / name, why, age)

    def remove(self, path: Path, why: str, age: float | None) -> None:
        removal = Step("remove", str(path), why, None if age is None else round(age, 1))
        self.removals.append(removal)
        if self.dry_run:
            return
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removal.done = True
            log.info("event=janitor_removed path=%s why=%r", path, why)
        except FileNotFoundError:
            removal.done = True  # gone meanwhile (renamed by its owner, or collected)
        except OSError as exc:
            removal.error = f"{exc.strerror or exc}"


def _entries(directory: Path) -> list[tuple[str, os.stat_result]]:
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


def _read_json(path: str | os.PathLike) -> dict[str, Any] | None:
    """A JSON object from a file the worker account writes (never through a
    link, never a FIFO, at most ``MAX_STATS_BYTES``), or None."""
    try:
        data = read_untrusted(path, MAX_STATS_BYTES, limit_name="the counters' size").data
        obj = json.loads(data)
    except (OSError, UnsafeEntry, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


