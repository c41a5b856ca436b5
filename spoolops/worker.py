"""The worker: claims requests in order, runs them, answers each exactly once.

Policy only; the transport does the moving.  The main thread watches for
arrivals (a hint: the transport's scan is the truth, taken at start, on lost
hints and every ``rescan_interval``, as Postfix's pickup does) and asks its
intake (``intake.py``: order, read-ahead, claim, validation, leases) once
per round for what may start; a pool of ``concurrency`` threads runs
operations and delivers replies, so a slow operation never blocks an
unrelated fast one.  An op declared ``inline`` and idempotent
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

from .config import Config
from .counters import Stats
from .dispatch import Dispatcher, Job, Request
from .followups import HookRetries
from .intake import Intake
from .liveness import Keepalive, gauges, write_metrics
from .ops import Registry, default_registry
from .runner import Runner, instant
from .sdnotify import Notifier
from .transport import Transport, open_transport
from .transport.base import Claimed, SharedQueue

log = logging.getLogger("spoolops.worker")

PUBLISH_RETRY_S = 1.0
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
        self.stats = Stats(self.transport.save_stats)
        self.intake = Intake(self.transport, self.registry, self.dispatcher, self.stats)
        self.running = 0     # requests running (the metrics)
        # slots of ``concurrency`` taken: a job, a rejection's delivery, or a
        # batch of jobs answered in place (one statement, one slot)
        self.slots = 0
        self.running_since: dict[str, float] = {}    # id -> start, for the metrics
        # what is over, for the main loop to reap
        self._done: deque[Job | list[Job] | tuple[str, dict[str, Any]]] = deque()
        self._stop = False
        self._stats_wanted = False
        self._rescan_wanted = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pool: ThreadPoolExecutor | None = None
        self._loop_thread = threading.current_thread()

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
            arrivals = self.intake.open()
            self._pool = ThreadPoolExecutor(self.config.concurrency,
                                            thread_name_prefix="spoolops-op")
            self.stats.started()
            # the line operators and tests wait for: from here on requests are served
            log.info("event=worker_ready pid=%d queued=%d", os.getpid(), len(self.intake.backlog))
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
            if self.intake.reconcile_wanted:
                timeout = min(timeout, PUBLISH_RETRY_S)
            retry = self.intake.gate.next_retry()
            if retry is not None:
                timeout = min(timeout, retry)
            hooks_due = self.hooks.due_in()
            if hooks_due is not None:
                timeout = min(timeout, hooks_due)
            if self._done:  # a pool job finished meanwhile: reap it now
                timeout = 0.0
            idle_since = time.perf_counter()
            readable: list[int] = []
            if timeout > 0 and back_to_back and self.slots == 0:
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
                self.intake.arrived()
            if time.monotonic() >= next_rescan or self._rescan_wanted:
                self._rescan_wanted = False
                self.intake.rescan()
                next_rescan = time.monotonic() + self.config.rescan_interval
            if next_orphans is not None and time.monotonic() >= next_orphans:
                self.intake.reconcile(self.runner.unpublished)
                self.intake.recover_others()
                next_orphans = time.monotonic() + ORPHAN_CHECK_S
            elif self.intake.reconcile_wanted:
                self.intake.reconcile(self.runner.unpublished)
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
        return gauges(self.intake.backlog, self.running, self.running_since.values())

    def _idle(self) -> bool:
        return not self.intake.backlog and self.slots == 0 and not self.runner.unpublished

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

    def _schedule(self) -> None:
        """Start what may start (``intake`` chooses and claims)."""
        while True:
            admission = self.intake.admit(self.config.concurrency - self.slots)
            for request, reply in admission.rejected:
                self.running += 1
                self.slots += 1
                assert self._pool is not None
                self._pool.submit(self._publish_only, request, reply)
            in_place = [(job, admission.in_place[job.entry]) for job in admission.jobs
                        if job.entry in admission.in_place]
            if in_place:      # first in line: first to a pool thread
                self._start_in_place(in_place, admission.alone)
            for job in admission.jobs:
                if job.entry not in admission.in_place:
                    self._start(job, admission.alone)
            if not admission.jobs:
                return
            self._finish_done()  # inline jobs are over already: their slots are free

    def _publish_only(self, request: Request, reply: dict[str, Any]) -> None:
        try:
            self.runner.deliver(request, reply, started=False)
        finally:
            self._done.append((request.id, reply))
            os.write(self._wake_w, b"d")

    # -- running ------------------------------------------------------------------

    def _start(self, job: Job, alone: bool) -> None:
        self.running += 1
        self.slots += 1
        self.running_since[job.request.id] = time.monotonic()
        if instant(job) and (not self.config.durable or alone):
            # declared instant (echo): a thread hand-off would cost more than
            # the job.  Durable replies of several waiting requests go to the
            # pool instead, where their fsyncs share one journal commit.
            self._run_job(job)
            return
        assert self._pool is not None
        self._pool.submit(self._run_job, job)

    def _start_in_place(self, batch: list[tuple[Job, Claimed]], alone: bool) -> None:
        """Instant jobs read and not claimed, answered in one step: one
        statement, one commit, one slot for the batch.  Alone, here; with
        more in line, on the pool, while this loop reads the next batch."""
        self.slots += 1
        for job, _ in batch:
            self.running += 1
            self.running_since[job.request.id] = time.monotonic()
        if not self.config.durable or alone:
            self._run_in_place(batch)
            return
        assert self._pool is not None
        self._pool.submit(self._run_in_place, batch)

    def _run_in_place(self, batch: list[tuple[Job, Claimed]]) -> None:
        try:
            self.runner.run_in_place(batch)
        finally:
            self._done.append([job for job, _ in batch])
            if threading.current_thread() is not self._loop_thread:
                os.write(self._wake_w, b"d")

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
            self.slots -= 1
            if isinstance(item, list):
                for job in item:
                    self._finish(job)
                continue
            if isinstance(item, tuple):
                self.running -= 1
                rid, reply = item
                self.intake.rejected(rid)
                # a rejected request names whatever op it likes: counted under
                # its name only if that op exists, so requesters cannot mint labels
                op = reply["op"] if reply["op"] in self.registry else "-"
                self.stats.count(op, reply["error"]["type"], 0.0)
                continue
            self._finish(item)

    def _finish(self, job: Job) -> None:
        self.running -= 1
        self.intake.done(job)
        self.running_since.pop(job.request.id, None)
        reply = job.reply
        if reply is not None:
            self.stats.count(job.request.op, "ok" if reply["ok"] else
                             reply["error"]["type"], job.duration)


def run_worker(config: Config, once: bool = False, standby: bool = False,
               registry: Registry | None = None) -> int:
    """Entry point for ``spoolops worker``."""
    worker = Worker(config, registry, once=once, standby=standby)
    worker.install_signal_handlers()
    return worker.run()
