"""The spool worker: watches ``new/``, claims requests, runs them, replies.

One inotify instance watches ``new/``; inotify is only a hint and the
directory scan is the truth (as Postfix's pickup): the worker rescans at
start, on ``IN_Q_OVERFLOW`` and every ``rescan_interval``.  The main thread
claims and validates requests and keeps the order (``schedule.py``); a pool
of ``concurrency`` threads runs operations, stages and publishes replies, so
a slow operation never blocks an unrelated fast one.  An op declared
``inline`` (``echo``: no I/O, instant, idempotent) runs on the main thread
when replies need no fsync, since a thread hand-off would cost more than it.

Security: runs as the worker user and trusts only ``work/`` and the config.
Every entry of ``new/`` is read as hostile (``spool.read_untrusted``); what
cannot be attributed to an id is quarantined in ``failed/`` with a reason.
Signals only set flags; logging and I/O happen in the main loop.
Diagnostics: one ``key=value`` log line per request start and end.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import stat
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

from . import recovery
from .config import Config
from .dispatch import Dispatcher, Job, Request, user_name
from .errors import BadRequest, OpError, OpFailed, SpoolSetupError
from .lock import WorkerLock
from .metrics import render_metrics
from .ops import Registry, default_registry
from .schedule import Queue, TargetGate, request_key
from .spool import (
    REQUEST_SUFFIX,
    Spool,
    UnsafeEntry,
    id_from_name,
    pending_events,
    utc_iso,
    write_atomic,
)
from .stats import Stats
from .status import spool_status

log = logging.getLogger("spoolops.worker")

WATCH_FLAGS = flags.MOVED_TO | flags.CLOSE_WRITE | flags.CREATE
PUBLISH_RETRY_S = 1.0
# After a request, look for the next one this long before sleeping in select(),
# but only while requests have been arriving that quickly (a caller running
# requests one after another, e.g. a QA tool marking files in turn): a sleeping
# thread wakes on a cold core.  Sporadic traffic never spins.
POLL_BEFORE_SLEEP_S = 0.0003


class Worker:
    """Serve one spool until stopped (or, with ``once``, until it is drained)."""

    def __init__(self, config: Config, registry: Registry | None = None, once: bool = False,
                 standby: bool = False) -> None:
        self.config = config
        self.spool = Spool(config.root, config.durable, config.max_request_bytes)
        self.registry = registry if registry is not None else default_registry()
        self.dispatcher = Dispatcher(self.registry, config, self.spool.work)
        self.once = once
        self.standby = standby
        self.queue = Queue()
        self.gate = TargetGate()
        self.stats = Stats(self.spool.work)
        self.running = 0
        self.skipped: set[str] = set()
        self.unpublished: dict[str, dict[str, Any]] = {}
        self._retries: dict[str, int] = {}      # failed publish retries, for the log
        self._done: deque[Job | tuple[str, dict[str, Any]]] = deque()
        self._stop = False
        self._stats_wanted = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = WorkerLock(self.spool.lock_path)
        self._pool: ThreadPoolExecutor | None = None
        self._loop_thread = threading.current_thread()

    # -- signals: flags only ------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self._stop = True
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass

    def request_stats(self, *_: Any) -> None:
        """SIGUSR1 (sent by ``spoolops status``): save the counters now."""
        self._stats_wanted = True
        try:
            os.write(self._wake_w, b"u")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        signal.signal(signal.SIGUSR1, self.request_stats)

    # -- life cycle ---------------------------------------------------------

    def run(self) -> int:
        self.spool.check_exists()
        self._check_groups()
        if self.standby:
            log.info("event=standby lock=%s", self.spool.lock_path)
        self._lock.acquire(wait=self.standby, should_stop=lambda: self._stop)
        self._loop_thread = threading.current_thread()
        # the dispatch thread must get the GIL back promptly from busy op threads
        sys.setswitchinterval(0.001)
        inotify = None
        try:
            if self._stop:
                return 0
            log.info("event=worker_start pid=%d root=%s concurrency=%d ops=%s", os.getpid(),
                     self.config.root, self.config.concurrency, ",".join(self.registry.names()))
            # watch before the first scan, so nothing arrives unseen in between
            inotify = INotify(nonblocking=True)
            inotify.add_watch(self.spool.new, WATCH_FLAGS)
            recovery.recover(self.spool, self.registry, self.dispatcher)
            self._pool = ThreadPoolExecutor(self.config.concurrency,
                                            thread_name_prefix="spoolops-op")
            self.stats.started()
            self._rescan()
            # the line operators and tests wait for: from here on requests are served
            log.info("event=worker_ready pid=%d queued=%d", os.getpid(), len(self.queue))
            self._loop(inotify)
            return 0
        finally:
            self._shutdown()
            if inotify is not None:
                inotify.close()
            self._lock.release()
            log.info("event=worker_stop pid=%d served=%d", os.getpid(), self.stats.served)

    def _loop(self, inotify: INotify) -> None:
        next_rescan = time.monotonic() + self.config.rescan_interval
        fds = [inotify.fileno(), self._wake_r]
        back_to_back = False   # did the last request come within POLL_BEFORE_SLEEP_S?
        while True:
            self._finish_done()
            if not self._stop:
                self._schedule()
            if self._stop or (self.once and self._idle()):
                break
            timeout = max(0.0, next_rescan - time.monotonic())
            if self.unpublished:
                timeout = min(timeout, PUBLISH_RETRY_S)
            save_in = self.stats.save_due_in()
            if save_in is not None:
                timeout = min(timeout, save_in)
            if self._done:  # a pool job finished meanwhile: reap it now
                timeout = 0.0
            idle_since = time.perf_counter()
            readable: list[int] = []
            if timeout > 0 and back_to_back and self.running == 0:
                end = idle_since + POLL_BEFORE_SLEEP_S
                while not readable and time.perf_counter() < end:
                    readable, _, _ = select.select(fds, [], [], 0)
            if not readable:
                readable, _, _ = select.select(fds, [], [], timeout)
            if timeout > 0:
                back_to_back = time.perf_counter() - idle_since < POLL_BEFORE_SLEEP_S
            if self._wake_r in readable:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            if inotify.fileno() in readable:
                self._take_events(inotify)
            if time.monotonic() >= next_rescan:
                self._rescan()
                next_rescan = time.monotonic() + self.config.rescan_interval
            if self.unpublished:
                self._retry_unpublished()
            if self._stats_wanted:
                self._stats_wanted = False
                self.stats.save(self.queue, self.running)
            if self.stats.maybe_save(self.queue, self.running) and self.config.metrics_file:
                self._write_metrics()

    def _check_groups(self) -> None:
        """Refuse to serve when requests or replies would be unreadable: the
        process must be in the submit group (the group of ``tmp/``)."""
        submit_gid = os.stat(self.spool.tmp).st_gid
        if os.geteuid() != 0 and submit_gid not in (os.getegid(), *os.getgroups()):
            raise SpoolSetupError(
                f"this worker process (uid {os.geteuid()}, groups"
                f" {sorted({os.getegid(), *os.getgroups()})}) is not in the submit group"
                f" (gid {submit_gid}, the group of {self.spool.tmp}): it could neither read"
                " requests nor answer in that group.  Add the worker user to the group"
                " (usermod -aG) and start the worker with its supplementary groups"
                " (systemd User=, setpriv --init-groups, runuser)")
        if self.spool.reply_gid() is not None:
            log.warning("event=work_dir_group path=%s action=chgrp_each_reply hint=%r",
                        self.spool.work, "work/ is not setgid to the submit group:"
                        " run 'spoolops init' to repair it")

    def _write_metrics(self) -> None:
        """Rewrite ``[worker] metrics_file`` for node_exporter's textfile collector."""
        try:
            text = render_metrics(spool_status(self.config),
                                  self.stats.snapshot(len(self.queue), self.running))
            path = Path(self.config.metrics_file)
            write_atomic(path.with_name(f".{path.name}.tmp"), path, text.encode(),
                         durable=False, mode=0o644, own_staging=True)
        except OSError as exc:
            log.warning("event=metrics_failed path=%s error=%r", self.config.metrics_file, exc)

    def _idle(self) -> bool:
        return not self.queue and self.running == 0 and not self.unpublished

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # finish what runs; queued stays queued
            self._pool = None
            self._finish_done()
        self.stats.save(self.queue, 0)

    # -- intake -------------------------------------------------------------

    def _take_events(self, inotify: INotify) -> None:
        for event in pending_events(inotify):
            if event.mask & flags.Q_OVERFLOW:
                log.warning("event=inotify_overflow action=rescan")
                self._rescan()
                continue
            name = event.name
            if not name or name in self.skipped:
                continue
            if event.mask & flags.CREATE and not event.mask & flags.ISDIR:
                # a regular file created in place is taken when closed; only
                # links, FIFOs and the like need the create event
                try:
                    if (self.spool.new / name).is_file() and \
                            not (self.spool.new / name).is_symlink():
                        continue
                except OSError:
                    continue
            self.queue.add(name)

    def _rescan(self) -> None:
        names = []
        for entry in self.spool.scan_new():
            name = entry.name
            if name in self.skipped:
                continue
            if entry.is_dir(follow_symlinks=False) and self.spool.has_reason(name):
                self.skipped.add(name)
                continue
            names.append(name)
        self.queue.sync(names)

    def _prekey(self) -> None:
        """Read queued requests early to learn their priority and targets."""
        for name in self.queue.unkeyed():
            rid = id_from_name(name) or name
            priority, targets, mtime_ns = 0, None, time.time_ns()
            try:
                f = self.spool.read_queued(name)
            except FileNotFoundError:   # the request file itself is gone (cancelled)
                self.queue.discard(name)
                continue
            except (UnsafeEntry, OSError):
                f = None                # the claim will report it properly
            if f is not None:
                mtime_ns = min(f.st.st_mtime_ns, time.time_ns())
                try:
                    request = self.dispatcher.parse(f.data, rid, f.st.st_uid, mtime_ns / 1e9)
                    priority = request.priority
                    targets = self.dispatcher.prepare(request).targets
                except OpError:
                    pass                # answered when claimed (NotFound, BadRequest, ...)
                except Exception:
                    log.exception("event=prekey_failed name=%s", name)
            self.queue.set_key(name, request_key(priority, mtime_ns, rid), targets)

    def _schedule(self) -> None:
        """Start what may start.  A request whose target is busy goes back to
        ``new/`` (so ``ls new/`` shows all that waits) with its key and target
        known, and is passed over until the target is free."""
        while True:
            free = self.config.concurrency - self.running
            if free <= 0 or not self.queue:
                return
            if len(self.queue) > free:
                self._prekey()
            batch = [job for job in map(self._claim, self.queue.take(free, self.gate))
                     if job is not None]
            if not batch:
                return
            batch.sort(key=_job_key)
            started = 0
            for job in batch:
                if self.gate.is_free(job.targets):
                    self.gate.acquire(job.targets)
                    self._start(job, alone=len(batch) == 1)
                    started += 1
                else:
                    self._put_back(job)
            if not started:
                return
            self._finish_done()  # inline jobs are over already: their slots are free

    def _put_back(self, job: Job) -> None:
        """Return a claimed, not started request to ``new/`` (mtime kept)."""
        name = job.request.id + REQUEST_SUFFIX
        try:
            self.spool.unclaim_request(name)
        except OSError as exc:
            log.error("event=unclaim_failed name=%s error=%r", name, exc)
            return
        self.queue.add(name)
        self.queue.set_key(name, _job_key(job), job.targets)

    def _claim(self, name: str) -> Job | None:
        """Claim ``new/NAME``, read it once, validate it.  Returns a job to
        run, or None when the entry was answered, quarantined or gone."""
        rid = id_from_name(name)
        if rid is None:
            # judged by its name alone, before any rename: a hostile name such
            # as 'ID.json.run' must never be renamed over a file in active/
            self._quarantine_queued(name, "Its name is not <id>.json with an id matching"
                                    " ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$, so no reply can"
                                    " be addressed")
            return None
        try:
            if not self.spool.claim_request(name):
                return None
        except FileExistsError:
            self._quarantine_queued(name, f"Request id {rid} is already running; a second"
                                    " request with the same id was not run")
            return None
        except OSError as exc:
            # e.g. a directory owned by another user: renaming it needs write
            # access to it (for its '..'), which the worker does not have
            what = "it is a directory" if os.path.isdir(self.spool.new / name) else \
                "it could not be claimed"
            self._quarantine_queued(name, f"Not a request: {what}"
                                    f" ({exc.strerror or exc})")
            return None
        try:
            f = self.spool.read_claimed(name)
        except FileNotFoundError:
            return None
        except UnsafeEntry as exc:
            st = _plain_file(self.spool.active / name)
            problem = None if st is None else _unreadable_or_oversize(
                st, exc.reason, self.config.max_request_bytes)
            if problem is None:
                self._quarantine(name, f"Not a request: {exc.reason}")
                return None
            # the id is trustworthy (a plain file in our active/, its owner the
            # submitter): a file too large or unreadable is a bad request,
            # answered like any other
            queued_at = min(st.st_mtime_ns, time.time_ns()) / 1e9
            self._answer(Request(id=rid, op="", args=None, uid=st.st_uid,
                                 user=user_name(st.st_uid), queued_at=queued_at),
                         BadRequest(problem))
            return None
        except OSError as exc:
            self._quarantine(name, f"Could not read it: {exc.strerror or exc}")
            return None
        queued_ns = min(f.st.st_mtime_ns, time.time_ns())  # future mtime: now
        queued_at = queued_ns / 1e9
        try:
            request = self.dispatcher.parse(f.data, rid, f.st.st_uid, queued_at)
        except OpError as exc:
            request = Request(id=rid, op="", args=None, uid=f.st.st_uid,
                              user=user_name(f.st.st_uid), queued_at=queued_at)
            self._answer(request, exc, op=_peek_op(f.data))
            return None
        try:
            job = self.dispatcher.prepare(request)
            # the exact nanoseconds: keys made by _prekey use them, and a
            # float round trip can move a time by ~100 ns and swap two requests
            job.extra["queued_ns"] = queued_ns
            return job
        except OpError as exc:
            self._answer(request, exc)
        except Exception as exc:
            log.exception("event=validate_crashed id=%s op=%s", rid, request.op)
            self._answer(request, OpFailed(f"argument validation failed: {exc!r}"))
        return None

    def _quarantine_queued(self, name: str, reason: str) -> None:
        """Quarantine straight from ``new/``; what cannot be moved is skipped."""
        log.warning("event=quarantine name=%r reason=%r", name, reason)
        try:
            moved = self.spool.quarantine(self.spool.new, name, reason)
        except OSError as exc:
            # e.g. the reason could not be written (disk full): the worker
            # goes on; an entry still in new/ is skipped, not retried forever
            log.warning("event=quarantine_cleanup_failed name=%r error=%r", name, exc)
            moved = not os.path.lexists(self.spool.new / name)
        if not moved:
            self.skipped.add(name)
        self.stats.count("-", "quarantined", 0.0)

    def _quarantine(self, name: str, reason: str) -> None:
        log.warning("event=quarantine name=%r reason=%r", name, reason)
        self.spool.quarantine(self.spool.active, name, reason)
        self.stats.count("-", "quarantined", 0.0)

    def _answer(self, request: Request, error: OpError, op: str | None = None) -> None:
        """Reply with an error to a request that will not run."""
        reply = self.dispatcher.reply(request, error=error, op=op or request.op or None)
        log.info("event=rejected id=%s op=%s user=%s error=%s message=%r", request.id,
                 reply["op"], request.user, error.type, error.message)
        self.running += 1
        assert self._pool is not None
        self._pool.submit(self._publish_only, request.id, reply)

    def _publish_only(self, rid: str, reply: dict[str, Any]) -> None:
        try:
            self._deliver(rid, reply)
        finally:
            self._done.append((rid, reply))
            os.write(self._wake_w, b"d")

    # -- running ------------------------------------------------------------

    def _start(self, job: Job, alone: bool) -> None:
        self.running += 1
        if _instant(job) and (not self.config.durable or (alone and not self.queue)):
            # declared instant (echo): a thread hand-off would cost more than
            # the job.  Durable replies of several waiting requests go to the
            # pool instead, where their fsyncs share one journal commit.
            self._run_job(job)
            return
        assert self._pool is not None
        self._pool.submit(self._run_job, job)

    def _run_job(self, job: Job) -> None:
        request = job.request
        # a non-idempotent op must be known to have started, even after a power
        # cut; an instant one needs no run file (recovery re-runs what has
        # none), no progress and no start line in the log: its end line says all
        inline = _instant(job)
        try:
            started = time.time()
            info = None if inline else {
                "id": request.id, "op": request.op, "pid": self.dispatcher.worker_info["pid"],
                "host": self.dispatcher.worker_info["host"], "user": request.user,
                "targets": list(job.targets), "started_at": utc_iso(started)}
            try:
                if info is not None:
                    self.spool.write_run_info(request.id, info,
                                              durable=self.config.durable and
                                              not job.operation.idempotent)
            except OSError as exc:
                # no run file, no start (disk full): answer now; the reply
                # itself waits in memory until there is room for it
                reply = self.dispatcher.reply(request, error=OpFailed(
                    f"not started: could not record its start in active/"
                    f" ({exc.strerror or exc})"), started_at=started)
                job.extra["reply"], job.extra["duration"] = reply, 0.0
                log.error("event=not_started id=%s op=%s error=%r", request.id, request.op,
                          exc.strerror or exc)
                self._deliver(request.id, reply, run_file=False)
                return
            if not inline:
                log.info("event=start id=%s op=%s user=%s target=%s", request.id, request.op,
                         request.user, ",".join(job.targets) or "-")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("event=args id=%s args=%r", request.id, job.args)
            progress = None if info is None else _ProgressWriter(self.spool, request.id, info)
            reply = self.dispatcher.execute(job, progress)
            duration = time.time() - started
            job.extra["reply"] = reply
            job.extra["duration"] = duration
            self._deliver(request.id, reply, run_file=not inline)
            error = reply["error"]
            log.info("event=end id=%s op=%s user=%s target=%s outcome=%s duration=%.6f%s",
                     request.id, request.op, request.user, ",".join(job.targets) or "-",
                     "ok" if reply["ok"] else error["type"], duration,
                     f" message={error['message']!r}" if error else "")
        except Exception:
            log.exception("event=job_crashed id=%s", request.id)
        finally:
            self._done.append(job)
            if threading.current_thread() is not self._loop_thread:
                os.write(self._wake_w, b"d")

    def _deliver(self, rid: str, reply: dict[str, Any], run_file: bool = False) -> None:
        """Stage and publish; on failure (disk full) keep it for a retry."""
        try:
            self.spool.stage_reply(rid, reply)
            self.spool.publish_reply(rid, run_file=run_file)
        except OSError as exc:
            log.error("event=reply_failed id=%s error=%r action=retry", rid,
                      errno.errorcode.get(exc.errno or 0, str(exc)))
            self.unpublished[rid] = reply

    def _retry_unpublished(self) -> None:
        for rid, reply in list(self.unpublished.items()):
            try:
                if self.spool.staged_reply(rid) is None:   # not even staged yet
                    self.spool.stage_reply(rid, reply)
                self.spool.publish_reply(rid)
            except OSError as exc:
                self._retries[rid] = self._retries.get(rid, 0) + 1
                if self._retries[rid] == 1:       # said once; the late publish says the rest
                    log.warning("event=reply_retry_failed id=%s error=%r action=retry", rid,
                                errno.errorcode.get(exc.errno or 0, str(exc)))
                return
            del self.unpublished[rid]
            log.info("event=reply_published_late id=%s retries=%d", rid,
                     self._retries.pop(rid, 0))

    def _finish_done(self) -> None:
        while self._done:
            item = self._done.popleft()
            self.running -= 1
            if isinstance(item, tuple):
                _rid, reply = item
                self.stats.count(reply["op"] or "-", reply["error"]["type"], 0.0)
                continue
            job = item
            reply = job.extra.get("reply")
            if reply is not None:
                self.stats.count(job.request.op, "ok" if reply["ok"] else
                                 reply["error"]["type"], job.extra.get("duration", 0.0))
            self.gate.release(job.targets)


def _instant(job: Job) -> bool:
    """Declared ``inline`` (no I/O, over in microseconds) and idempotent."""
    return job.operation.inline and job.operation.idempotent


def _job_key(job: Job) -> tuple[int, int, str]:
    return request_key(job.request.priority, job.extra["queued_ns"], job.request.id)


class _ProgressWriter:
    """Rewrites ``active/ID.json.run`` with bytes done/total, once a second."""

    def __init__(self, spool: Spool, rid: str, info: dict[str, Any]) -> None:
        self.spool, self.rid, self.info = spool, rid, info
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 1.0 and done < total:
            return
        self.last = now
        info = dict(self.info, progress={"done": int(done), "total": int(total),
                                         "updated_at": utc_iso()})
        try:
            self.spool.write_run_info(self.rid, info)
        except OSError:
            pass  # progress is a courtesy; never fail the op for it


def _plain_file(path: Path) -> os.stat_result | None:
    """The lstat of ``path`` if it is a regular file with one link."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None


def _unreadable_or_oversize(st: os.stat_result, reason: str, limit: int) -> str | None:
    """What is wrong with a plain request file the worker could not read."""
    if st.st_size > limit:
        return f"request is {st.st_size} bytes, more than max_request_bytes ({limit})"
    if "permission denied" in reason:
        return (f"the worker may not read the request file (mode"
                f" {stat.S_IMODE(st.st_mode):04o}, group {st.st_gid}): a request must be"
                " readable by the submit group (0640)")
    return None


def _peek_op(data: bytes) -> str | None:
    """The op name of a rejected request, if it can be read at all (for the reply)."""
    try:
        obj = json.loads(data)
        op = obj.get("op") if isinstance(obj, dict) else None
        return op if isinstance(op, str) and len(op) <= 128 else None
    except Exception:  # noqa: BLE001
        return None


def run_worker(config: Config, once: bool = False, standby: bool = False,
               registry: Registry | None = None) -> int:
    """Entry point for ``spoolops worker``."""
    worker = Worker(config, registry, once=once, standby=standby)
    worker.install_signal_handlers()
    try:
        return worker.run()
    except FileNotFoundError as exc:
        raise SpoolSetupError(f"spool not found: {exc.filename}: run 'spoolops init'") from None
