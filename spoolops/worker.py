"""The worker: claims requests in order, runs them, answers each exactly once.

Policy only; the transport does the moving.  The main thread watches for
arrivals (a hint: the transport's scan is the truth, taken at start, on lost
hints and every ``rescan_interval``, as Postfix's pickup does), keeps the
order (``schedule.py``), claims and validates; a pool of ``concurrency``
threads runs operations and delivers replies, so a slow operation never
blocks an unrelated fast one.  An op declared ``inline`` and idempotent
(``echo``: no I/O, instant) runs on the main thread when a thread hand-off
would cost more than the op.

Around the loop, each in its own module: a pool thread runs a job and
delivers its reply (``runner``); the loop proves it turns (``liveness``:
systemd's watchdog, the queue's heartbeat); kept hook calls are retried on
the pool (``followups``).  On a shared transport the loop also reconciles:
what the queue says it holds but it does not know of (a claim whose answer
was lost, a failed put-back) is recovered like an orphan, after a lost
connection and every ``ORPHAN_CHECK_S``.

Security: runs as the worker user; every request is hostile until dispatch
has validated it; what cannot be attributed to an id is quarantined with a
reason.  Signals only set flags; logging and I/O happen in the main loop.
Diagnostics: one ``key=value`` log line per request start and end.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import recovery
from .config import Config
from .counters import Stats
from .dispatch import Dispatcher, Job, Request
from .errors import BadRequest, OpError, OpFailed
from .followups import HookRetries
from .liveness import Keepalive, gauges, write_metrics
from .ops import Registry, default_registry
from .runner import Runner, instant
from .schedule import Backlog, TargetGate, request_key
from .sdnotify import Notifier
from .transport import Transport, open_transport
from .transport.base import Claimed, Quarantined, Refused, SharedQueue

log = logging.getLogger("spoolops.worker")

PUBLISH_RETRY_S = 1.0
# a target another worker holds (shared transports) is tried again this soon
ELSEWHERE_RETRY_S = 0.05
# how often a worker of a shared transport looks for other workers' orphans
# (and for its own strays)
ORPHAN_CHECK_S = 2.0
# After a request, look for the next one this long before sleeping in select(),
# but only while requests have been arriving that quickly (a caller running
# requests one after another, e.g. a QA tool marking files in turn): a sleeping
# thread wakes on a cold core.  Sporadic traffic never spins.
POLL_BEFORE_SLEEP_S = 0.0003


class Worker:
    """Serve one spool until stopped (or, with ``once``, until it is drained)."""

    def __init__(self, config: Config, registry: Registry | None = None, once: bool = False,
                 standby: bool = False, transport: Transport | None = None) -> None:
        self.config = config
        self.transport = transport if transport is not None else open_transport(config)
        self.registry = registry if registry is not None else default_registry()
        self.notifier = Notifier()
        self.keepalive = Keepalive(self.notifier, self.transport)
        # (a kept hook call is news for the retries, made just below)
        self.dispatcher = Dispatcher(self.registry, config, self.transport.work_dir,
                                     hook_kept=lambda: self.hooks.changed())
        self.hooks = HookRetries(self.dispatcher, self.transport, config.concurrency,
                                 self._wake)
        self.runner = Runner(self.transport, self.dispatcher, config.durable)
        self.once = once
        self.standby = standby
        self.backlog = Backlog()
        self.gate = TargetGate()
        self.stats = Stats(self.transport.save_stats)
        self.running = 0
        self.running_since: dict[str, float] = {}    # id -> start, for the metrics
        self._done: deque[Job | tuple[str, dict[str, Any]]] = deque()
        self._stop = False
        self._stats_wanted = False
        self._rescan_wanted = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pool: ThreadPoolExecutor | None = None
        self._loop_thread = threading.current_thread()
        self._scan_partial = False     # the last scan stopped at the transport's limit
        self._left_orphans: set[str] = set()   # orphans left to their host, said once
        # ids claimed and not yet done with (claimed, running, being answered):
        # anything else the queue says this worker holds is a stray
        self._held: set[str] = set()
        # of those, ones whose start failed (the queue away): never run, so
        # put back in line even if their run record was stored after all
        self._unstarted: set[str] = set()
        self._reconcile_wanted = False

    # -- signals: flags only ------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self._stop = True
        self._wake()

    def request_stats(self, *_: Any) -> None:
        """SIGUSR1 (sent by ``spoolops status`` and ``hooks retry``): save the
        counters now, and look at the kept hook calls again."""
        self._stats_wanted = True
        self.hooks.reload()             # 'spoolops hooks retry' changed the calls
        self._rescan_wanted = True      # 'spoolops requeue' put a request back
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        signal.signal(signal.SIGUSR1, self.request_stats)

    # -- life cycle ------------------------------------------------------------------

    def run(self) -> int:
        self.transport.check_exists()
        for warning in self.transport.check_worker():
            log.warning("event=deployment %s", warning)
        if self.standby:
            log.info("event=standby transport=%r", self.transport)
        if self.standby:
            # started, as far as systemd is concerned; the wait proves its
            # loop turns through should_stop
            self.notifier.ready("standby: waiting for the worker lock")
        lock = self.transport.lock_worker(wait=self.standby, should_stop=self._waiting)
        self._loop_thread = threading.current_thread()
        # the dispatch thread must get the GIL back promptly from busy op threads
        sys.setswitchinterval(0.001)
        try:
            if self._stop:
                return 0
            log.info("event=worker_start pid=%d root=%s concurrency=%d ops=%s", os.getpid(),
                     self.config.root, self.config.concurrency, ",".join(self.registry.names()))
            # watch before the first scan, so nothing arrives unseen in between
            arrivals = self.transport.watch()
            recovery.recover(self.transport, self.registry, self.dispatcher)
            self.dispatcher.prune_notes(lambda rid: self.transport.where(rid) is not None)
            self._pool = ThreadPoolExecutor(self.config.concurrency,
                                            thread_name_prefix="spoolops-op")
            self.stats.started()
            self._rescan()
            # the line operators and tests wait for: from here on requests are served
            log.info("event=worker_ready pid=%d queued=%d", os.getpid(), len(self.backlog))
            self.notifier.ready(f"serving (pid {os.getpid()})")
            self._loop(arrivals)
            return 0
        finally:
            self.notifier.stopping()
            self._shutdown()
            lock.release()            # (and with it, the watch)
            log.info("event=worker_stop pid=%d served=%d", os.getpid(), self.stats.served)

    def _waiting(self) -> bool:
        """A standby's wait for the lock: asked every few tens of ms."""
        self.notifier.ping()
        return self._stop

    def _loop(self, arrivals: int) -> None:
        next_rescan = time.monotonic() + self.config.rescan_interval
        next_orphans = time.monotonic() + ORPHAN_CHECK_S if isinstance(self.transport, SharedQueue) else None
        fds = [arrivals, self._wake_r]
        back_to_back = False   # did the last request come within POLL_BEFORE_SLEEP_S?
        while True:
            self._finish_done()
            if not self._stop:
                self._schedule()
            if self._stop or (self.once and self._idle()):
                break
            timeout = max(0.0, next_rescan - time.monotonic())
            if self.runner.unpublished:
                timeout = min(timeout, PUBLISH_RETRY_S)
            save_in = self.stats.save_due_in()
            if save_in is not None:
                timeout = min(timeout, save_in)
            if next_orphans is not None:
                timeout = min(timeout, max(0.0, next_orphans - time.monotonic()))
            keepalive = self.keepalive.due_in()
            if keepalive is not None:
                timeout = min(timeout, keepalive)
            if self._reconcile_wanted:
                timeout = min(timeout, PUBLISH_RETRY_S)
            retry = self.gate.next_retry()
            if retry is not None:
                timeout = min(timeout, retry)
            hooks_due = self.hooks.due_in()
            if hooks_due is not None:
                timeout = min(timeout, hooks_due)
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
            self.keepalive.beat()
            if arrivals in readable:
                names = self.transport.arrivals()
                if names is None:
                    log.warning("event=inotify_overflow action=rescan")
                    self._rescan()
                    # (a lost connection, on a shared transport: what was
                    # claimed meanwhile may have lost its answer)
                    self._reconcile_wanted = True
                else:
                    for name in names:
                        self.backlog.add(name)
            if time.monotonic() >= next_rescan or self._rescan_wanted:
                self._rescan_wanted = False
                self._rescan()
                next_rescan = time.monotonic() + self.config.rescan_interval
            if next_orphans is not None and time.monotonic() >= next_orphans:
                self._reconcile()
                self._recover_others()
                next_orphans = time.monotonic() + ORPHAN_CHECK_S
            elif self._reconcile_wanted:
                self._reconcile()
            if self.runner.unpublished:
                self.runner.retry_unpublished()
            if not self._stop:
                assert self._pool is not None
                self.hooks.start_due(self._pool)
            if self._stats_wanted:
                self._stats_wanted = False
                self.stats.save(self._gauges())
            if self.stats.maybe_save(self._gauges) and self.config.metrics_file:
                write_metrics(self.config.metrics_file, self._gauges(), self.stats)

    def _gauges(self) -> dict[str, Any]:
        return gauges(self.backlog, self.running, self.running_since.values())

    def _idle(self) -> bool:
        return not self.backlog and self.running == 0 and not self.runner.unpublished

    def _shutdown(self) -> None:
        if self._pool is not None:
            # finish what runs (queued stays queued), still proving that this
            # worker lives: others would take its running requests over
            pool = self._pool
            closing = threading.Thread(target=pool.shutdown, kwargs={"wait": True},
                                       name="spoolops-shutdown", daemon=True)
            closing.start()
            while closing.is_alive():
                closing.join(self.keepalive.due_in())
                self.keepalive.beat()
            self._pool = None
            self._finish_done()
        self.stats.save(self._gauges())

    # -- intake ------------------------------------------------------------------

    def _rescan(self) -> None:
        try:
            names = self.transport.scan()
        except OSError as exc:   # a database that is away: the next round tries again
            log.error("event=scan_failed error=%r", str(exc))
            return
        limit = self.transport.scan_limit
        self._scan_partial = limit is not None and len(names) >= limit
        self.backlog.sync(names)

    def _reconcile(self) -> None:
        """A shared transport: put back in line (or answer) what the queue
        says this worker holds but it does not know of -- a claim that
        committed while its answer was lost, a put-back that failed."""
        self._reconcile_wanted = False
        known = self._held | set(self.runner.unpublished)
        try:
            recovery.recover_strays(self.transport, self.registry, self.dispatcher, known,
                                    self._unstarted)
            self._unstarted.clear()
        except OSError as exc:
            self._reconcile_wanted = True       # the database is away: again soon
            log.error("event=reconcile_failed error=%r", str(exc))
        except Exception:
            log.exception("event=reconcile_crashed")

    def _recover_others(self) -> None:
        """A shared transport: answer or requeue the requests of workers that
        died elsewhere (theirs is the only copy of that work)."""
        try:
            recovery.recover_orphans(self.transport, self.registry, self.dispatcher,
                                     quiet=self._left_orphans)
        except OSError as exc:
            log.error("event=orphan_check_failed error=%r", str(exc))
        except Exception:
            log.exception("event=orphan_check_crashed")

    def _prekey(self) -> None:
        """Read queued requests early to learn their priority and targets."""
        for name in self.backlog.unkeyed():
            try:
                seen = self.transport.peek(name)
            except OSError as exc:
                # the queue is out of reach (a database restarting): the rest
                # stay unkeyed, read again next round -- the loop must go on
                log.error("event=prekey_failed name=%s error=%r", name, str(exc))
                return
            if seen is None:              # the request itself is gone (cancelled)
                self.backlog.discard(name)
                continue
            priority, targets = 0, None
            try:
                request = self.dispatcher.parse(seen.data, seen.rid, seen.user,
                                                seen.queued_ns / 1e9)
                priority = request.priority
                targets = self.dispatcher.prepare(request).targets
            except OpError:
                pass                      # answered when claimed (NotFound, BadRequest, ...)
            except Exception:
                log.exception("event=prekey_failed name=%s", name)
            self.backlog.set_key(name, request_key(priority, seen.queued_ns, seen.rid), targets)

    def _schedule(self) -> None:
        """Start what may start.  While a target is busy, queued requests are
        read ahead of their claim (``_prekey``): one that needs a busy target
        is passed over and stays queued -- its client may still withdraw it.
        One claimed with a target found busy after all (two of a batch whose
        targets were unknown) goes back in line, held by the transport, its
        key and target known, until the target is free."""
        while True:
            free = self.config.concurrency - self.running
            if self._scan_partial and len(self.backlog) < (self.transport.scan_limit or 0) // 2:
                self._rescan()      # the backlog beyond the last partial scan
            if free <= 0 or not self.backlog:
                return
            if len(self.backlog) > free or self.gate.busy or self.gate.elsewhere:
                self._prekey()
            batch = [job for job in self._claim_all(self.backlog.take(free, self.gate))
                     if job is not None]
            if not batch:
                return
            batch.sort(key=_job_key)
            started = 0
            for job in batch:
                if self.gate.is_free(job.targets) and self._lease(job):
                    self.gate.acquire(job.targets)
                    self._start(job, alone=len(batch) == 1)
                    started += 1
                else:
                    self._put_back(job)
            if not started:
                return
            self._finish_done()  # inline jobs are over already: their slots are free

    def _lease(self, job: Job) -> bool:
        """Hold the job's targets against other workers (a ``SharedQueue``;
        one worker alone holds them by its own gate)."""
        if not isinstance(self.transport, SharedQueue):
            return True
        try:
            if self.transport.lease(job.request.id, job.targets):
                return True
        except OSError as exc:
            log.error("event=lease_failed id=%s error=%r", job.request.id, str(exc))
        self.gate.held_elsewhere(job.targets, ELSEWHERE_RETRY_S)
        return False

    def _put_back(self, job: Job) -> None:
        """Return a claimed, not started request to its place in line."""
        self._held.discard(job.request.id)
        try:
            self.transport.put_back(job.request.id, job.targets)
        except OSError as exc:
            # it may still be claimed by this worker: a stray, reconciled soon
            log.error("event=unclaim_failed id=%s error=%r", job.request.id, exc)
            self._reconcile_wanted = True
            return
        assert job.entry is not None
        self.backlog.add(job.entry)
        self.backlog.set_key(job.entry, _job_key(job), job.targets)

    def _claim_all(self, names: list[str]) -> list[Job | None]:
        """Claim entries, validate them: jobs to run, or None for each one
        answered, quarantined or gone."""
        if not names:
            return []
        try:
            taken = self.transport.claim_all(names)
        except OSError as exc:
            # the queue is out of reach (a database restarting): the entries stay
            # queued there, and the scan after reconnecting finds them again --
            # or the claim committed and its answer was lost: the reconcile
            # finds them held by this worker and puts them back
            log.error("event=claim_failed names=%s error=%r", ",".join(names), str(exc))
            self._reconcile_wanted = True
            return []
        self._held.update(c.rid for c in taken if isinstance(c, (Claimed, Refused)))
        return [self._validate(name, claimed) for name, claimed in zip(names, taken)]

    def _validate(self, name: str, claimed: Claimed | Refused | Quarantined | None
                  ) -> Job | None:
        if claimed is None:
            return None
        if isinstance(claimed, Quarantined):
            log.warning("event=quarantine name=%r reason=%r", name, claimed.reason)
            self.stats.count("-", "quarantined", 0.0)
            return None
        queued_at = claimed.queued_ns / 1e9
        if isinstance(claimed, Refused):
            self._answer(_unparsed(claimed.rid, claimed.user, queued_at),
                         BadRequest(claimed.problem))
            return None
        assert isinstance(claimed, Claimed)
        try:
            request = self.dispatcher.parse(claimed.data, claimed.rid, claimed.user, queued_at)
        except OpError as exc:
            self._answer(_unparsed(claimed.rid, claimed.user, queued_at), exc,
                         op=_peek_op(claimed.data))
            return None
        try:
            job = self.dispatcher.prepare(request)
        except OpError as exc:
            self._answer(request, exc)
            return None
        except Exception as exc:
            log.exception("event=validate_crashed id=%s op=%s", claimed.rid, request.op)
            self._answer(request, OpFailed(f"argument validation failed: {exc!r}"))
            return None
        # the exact nanoseconds: keys made by _prekey use them, and a float
        # round trip can move a time by ~100 ns and swap two requests
        job.queued_ns = claimed.queued_ns
        job.entry = claimed.entry
        return job

    def _answer(self, request: Request, error: OpError, op: str | None = None) -> None:
        """Reply with an error to a request that will not run."""
        reply = self.dispatcher.reply(request, error=error, op=op or request.op or None)
        log.info("event=rejected id=%s op=%s user=%s error=%s message=%r", request.id,
                 reply["op"], request.user, error.type, error.message)
        self.running += 1
        assert self._pool is not None
        self._pool.submit(self._publish_only, request, reply)

    def _publish_only(self, request: Request, reply: dict[str, Any]) -> None:
        try:
            self.runner.deliver(request, reply, started=False)
        finally:
            self._done.append((request.id, reply))
            os.write(self._wake_w, b"d")

    # -- running ------------------------------------------------------------------

    def _start(self, job: Job, alone: bool) -> None:
        self.running += 1
        self.running_since[job.request.id] = time.monotonic()
        if instant(job) and (not self.config.durable or (alone and not self.backlog)):
            # declared instant (echo): a thread hand-off would cost more than
            # the job.  Durable replies of several waiting requests go to the
            # pool instead, where their fsyncs share one journal commit.
            self._run_job(job)
            return
        assert self._pool is not None
        self._pool.submit(self._run_job, job)

    def _run_job(self, job: Job) -> None:
        try:
            self.runner.run(job)
        finally:
            self._done.append(job)
            if threading.current_thread() is not self._loop_thread:
                os.write(self._wake_w, b"d")

    def _finish_done(self) -> None:
        while self._done:
            item = self._done.popleft()
            self.running -= 1
            if isinstance(item, tuple):
                rid, reply = item
                self._held.discard(rid)
                # a rejected request names whatever op it likes: counted under
                # its name only if that op exists, so requesters cannot mint labels
                op = reply["op"] if reply["op"] in self.registry else "-"
                self.stats.count(op, reply["error"]["type"], 0.0)
                continue
            job = item
            self._held.discard(job.request.id)
            if job.requeue:
                self._unstarted.add(job.request.id)
                self._reconcile_wanted = True
            self.running_since.pop(job.request.id, None)
            reply = job.reply
            if reply is not None:
                self.stats.count(job.request.op, "ok" if reply["ok"] else
                                 reply["error"]["type"], job.duration)
            self.gate.release(job.targets)


def _job_key(job: Job) -> tuple[int, int, str]:
    assert job.queued_ns is not None
    return request_key(job.request.priority, job.queued_ns, job.request.id)


def _unparsed(rid: str, user: str, queued_at: float) -> Request:
    """A request known only by its id and sender (its bytes did not parse)."""
    return Request(id=rid, op="", args=None, user=user, queued_at=queued_at)


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
    return worker.run()
