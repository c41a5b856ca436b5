"""The pool's side of the worker: run a job, deliver its reply exactly once.

A job the worker has claimed, validated and leased runs here, on a pool
thread (an instant one on the main thread): first its run record -- a
non-idempotent op must be known to have started, even after a power cut,
and recovery re-runs what has none -- then the op (``dispatch``), its
progress written back to the record once a second, then the reply, handed
to the transport with the batch it keeps pending.  A reply the transport
cannot take (disk full) is kept in memory, in ``unpublished``, and the main
loop tries it again (``retry_unpublished``) until it goes: a finished
request is answered late, never twice and never not at all.

Trusts: the job (dispatch has validated it), the dispatcher and the
transport.  The outcome is left on the job (``reply``, ``duration``,
``requeue``) for the main loop to count; this module keeps no other state
but the unpublished replies.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from typing import Any

from .dispatch import Dispatcher, Job, Request
from .errors import OpFailed
from .formats import batch_name, utc_iso
from .transport import Transport
from .transport.base import AnswersInPlace, Batch, Claimed, SharedQueue

log = logging.getLogger("spoolops.worker")


@dataclass(frozen=True)
class Answer:
    """An answer on its way to the transport (kept for a retry if it fails)."""

    reply: dict[str, Any]
    started: bool
    deliver: bool
    batch: Batch | None


class Runner:
    """Runs jobs and delivers replies from any thread; ``retry_unpublished``
    from the main loop only."""

    def __init__(self, transport: Transport, dispatcher: Dispatcher, durable: bool) -> None:
        self.transport = transport
        self.dispatcher = dispatcher
        self.durable = durable
        self.unpublished: dict[str, Answer] = {}
        self._retries: dict[str, int] = {}           # failed publish retries, for the log

    def run(self, job: Job) -> None:
        """Run ``job`` and answer it; never raises (a crash is logged)."""
        request = job.request
        # a non-idempotent op must be known to have started, even after a power
        # cut; an instant one needs no run record (recovery re-runs what has
        # none), no progress and no start line in the log: its end line says all
        inline = instant(job)
        try:
            started = time.time()
            record = None if inline else {
                "id": request.id, "op": request.op, "pid": self.dispatcher.worker_info["pid"],
                "host": self.dispatcher.worker_info["host"], "user": request.user,
                "targets": list(job.targets), "started_at": utc_iso(started)}
            try:
                if record is not None:
                    self.transport.start(request.id, record, durable=self.durable
                                         and not job.operation.idempotent)
            except OSError as exc:
                if isinstance(exc, ConnectionError) and isinstance(self.transport,
                                                                     SharedQueue):
                    # the queue is out of reach (a database restarting): not
                    # started, so it goes back in line once the queue answers
                    # -- the reconcile finds it held and not running
                    job.requeue = True
                    log.error("event=not_started id=%s op=%s error=%r action=requeue",
                              request.id, request.op, str(exc))
                    return
                # no run record, no start (disk full): answer now; the reply
                # itself waits in memory until there is room for it
                reply = self.dispatcher.reply(request, error=OpFailed(
                    f"not started: could not record its start ({exc.strerror or exc})"),
                    started_at=started)
                job.reply, job.duration = reply, 0.0
                log.error("event=not_started id=%s op=%s error=%r", request.id, request.op,
                          exc.strerror or exc)
                self.deliver(request, reply, started=False)
                return
            if not inline:
                log.info("event=start id=%s op=%s user=%s target=%s", request.id, request.op,
                         request.user, ",".join(job.targets) or "-")
            if log.isEnabledFor(logging.DEBUG):
                log.debug("event=args id=%s args=%r", request.id, job.args)
            progress = None if record is None else _ProgressWriter(self.transport, request.id,
                                                                   record)
            reply = self.dispatcher.execute(job, progress)
            duration = time.time() - started
            job.reply = reply
            job.duration = duration
            if self.deliver(request, reply, started=not inline):
                self.dispatcher.answered(job)
            _log_end(job)
        except Exception:
            log.exception("event=job_crashed id=%s", request.id)

    def run_in_place(self, jobs: list[tuple[Job, Claimed]]) -> None:
        """Run jobs read and not claimed, each with the read its answer must
        match (``AnswersInPlace``: instant, idempotent, no targets), and
        answer them all in one step, which claims them.  One no longer queued
        as read is not answered here (``job.requeue``: it is claimed the usual
        way, which finds out what became of it).  Never raises."""
        assert isinstance(self.transport, AnswersInPlace)
        ran: list[tuple[Job, Claimed]] = []
        for job, seen in jobs:
            job.requeue = True      # until its answer is known to be in
            try:
                started = time.time()
                job.reply = self.dispatcher.execute(job)
                job.duration = time.time() - started
                ran.append((job, seen))
            except Exception:
                log.exception("event=job_crashed id=%s", job.request.id)
        if not ran:
            return
        try:
            answered = self.transport.answer_queued([(seen, job.reply) for job, seen in ran])
        except Exception as exc:
            # answered or not, the claim finds out (and answers what is not)
            if not isinstance(exc, OSError):
                log.exception("event=answer_in_place_crashed ids=%s",
                              ",".join(seen.rid for _, seen in ran))
            answered, failure = set(), str(exc)
        else:
            failure = None
        for job, seen in ran:
            if seen.entry not in answered:
                if failure is None:
                    log.info("event=answer_in_place_missed id=%s action=claim note=%r",
                             seen.rid, "no longer queued as read")
                else:
                    log.error("event=answer_in_place_failed id=%s error=%r action=claim",
                              seen.rid, failure)
                job.reply = None
                continue
            job.requeue = False
            try:
                self.dispatcher.answered(job)
                _log_end(job)
            except Exception:
                log.exception("event=job_crashed id=%s", job.request.id)

    def deliver(self, request: Request, reply: dict[str, Any], started: bool) -> bool:
        """Answer (nobody, for ``"reply": false``), and let the request's
        batch stop being pending -- unless hooks are still to be retried; on
        failure (disk full) keep the answer for a retry."""
        held = "retrying" in (reply.get("hooks") or {}).values()
        answer = Answer(reply, started, request.wants_reply, batch_of(request, held))
        try:
            self._send(request.id, answer)
            return True
        except OSError as exc:
            log.error("event=reply_failed id=%s error=%r action=retry", request.id,
                      errno.errorcode.get(exc.errno or 0, str(exc)))
            self.unpublished[request.id] = answer
            return False

    def _send(self, rid: str, answer: Answer) -> None:
        self.transport.reply(rid, answer.reply, answer.started, deliver=answer.deliver,
                             batch=answer.batch)

    def retry_unpublished(self) -> None:
        """Try the kept answers again, in order, until one fails."""
        for rid, answer in list(self.unpublished.items()):
            try:
                self._send(rid, answer)
            except OSError as exc:
                self._retries[rid] = self._retries.get(rid, 0) + 1
                if self._retries[rid] == 1:       # said once; the late publish says the rest
                    log.warning("event=reply_retry_failed id=%s error=%r action=retry", rid,
                                errno.errorcode.get(exc.errno or 0, str(exc)))
                return
            del self.unpublished[rid]
            log.info("event=reply_published_late id=%s retries=%d", rid,
                     self._retries.pop(rid, 0))


def _log_end(job: Job) -> None:
    request, reply = job.request, job.reply
    assert reply is not None
    error = reply["error"]
    log.info("event=end id=%s op=%s user=%s target=%s outcome=%s duration=%.6f%s",
             request.id, request.op, request.user, ",".join(job.targets) or "-",
             "ok" if reply["ok"] else error["type"], job.duration,
             f" message={error['message']!r}" if error else "")


def batch_of(request: Request, held: bool = False) -> Batch | None:
    """What keeps ``request``'s batch pending (None: nothing does)."""
    name = batch_name(request.args)
    if request.marker is None and name is None:
        return None
    return Batch(request.marker, name, held)


def instant(job: Job) -> bool:
    """``job``'s op is ``Operation.instant``."""
    return job.operation.instant


class _ProgressWriter:
    """Rewrites the run record with bytes done/total, once a second."""

    def __init__(self, transport: Transport, rid: str, record: dict[str, Any]) -> None:
        self.transport, self.rid, self.record = transport, rid, record
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < 1.0 and done < total:
            return
        self.last = now
        record = dict(self.record, progress={"done": int(done), "total": int(total),
                                             "updated_at": utc_iso()})
        try:
            self.transport.progress(self.rid, record)
        except OSError:
            pass  # progress is a courtesy; never fail the op for it
