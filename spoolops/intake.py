"""The worker's intake: from what is queued to jobs ready to start.

The main loop asks once per round for up to ``free`` jobs (``admit``); this
module does the rest below it.  It keeps the backlog in order (``schedule``),
learns it from the transport's scan (the truth) and its arrivals (a hint),
reads queued requests ahead of their claim while a target is busy, claims,
parses and validates (``dispatch``), holds the targets (the worker's own
gate; a ``SharedQueue``'s lease against other workers) and puts back what
may not start yet.  What will not run comes back as a rejection, its error
reply made, for the loop to deliver on the pool.

On a shared transport it also reconciles what the queue says this worker
holds with what it knows it holds (a claim that committed while its answer
was lost, a failed put-back: "strays"), and answers or requeues the work of
workers that died elsewhere (``recovery``).

Trusts: the transport and the dispatcher.  Every claimed request is hostile
until ``Dispatcher.prepare`` has validated it; what cannot be attributed to
an id is quarantined by the transport, and only counted here.  Called from
the main loop only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import recovery
from .counters import Stats
from .dispatch import Dispatcher, Job, Request
from .errors import BadRequest, OpError, OpFailed
from .ops import Registry
from .runner import batch_of
from .schedule import Backlog, TargetGate, request_key
from .transport import Transport
from .transport.base import AnswersInPlace, Claimed, Quarantined, Refused, SharedQueue

log = logging.getLogger("spoolops.worker")

# a target another worker holds (shared transports) is tried again this soon
ELSEWHERE_RETRY_S = 0.05
# at most this many requests answered in place at once (one statement, one
# commit): a backlog of echoes drains a batch at a time
IN_PLACE_BATCH = 64


@dataclass
class Admission:
    """What one round of intake gives the loop."""

    jobs: list[Job] = field(default_factory=list)       # targets held: start them
    # requests that will not run, with the error reply to deliver
    rejected: list[tuple[Request, dict[str, Any]]] = field(default_factory=list)
    alone: bool = False     # one job, nothing else queued: no batch to share a commit
    # of the jobs, those read and not claimed, by entry: their answer claims
    # them (an ``AnswersInPlace`` transport), with the read it must match
    in_place: dict[str, Claimed] = field(default_factory=dict)


class Intake:
    """Backlog, claims and targets of one worker."""

    def __init__(self, transport: Transport, registry: Registry, dispatcher: Dispatcher,
                 stats: Stats) -> None:
        self.transport = transport
        self.registry = registry
        self.dispatcher = dispatcher
        self.stats = stats
        self.backlog = Backlog()
        self.gate = TargetGate()
        self.reconcile_wanted = False
        self._scan_partial = False     # the last scan stopped at the transport's limit
        self._left_orphans: set[str] = set()   # orphans left to their host, said once
        # ids claimed and not yet done with (claimed, running, being answered):
        # anything else the queue says this worker holds is a stray
        self._held: set[str] = set()
        # of those, ones whose start failed (the queue away): never run, so
        # put back in line even if their run record was stored after all
        self._unstarted: set[str] = set()
        self._in_place: set[str] = set()    # entries of jobs admitted in place
        # requests read ahead and validated by ``_prekey`` that may be answered
        # in place, by entry, with the read they came from (until a rescan)
        self._prepared: dict[str, tuple[Claimed, Job]] = {}
        self._claim_next: set[str] = set()   # not answered in place: claimed next

    # -- what is queued --------------------------------------------------------------

    def open(self) -> int:
        """Start serving: watch, recover what the last worker left, scan.
        Returns the transport's arrivals fd (readable: call ``arrived``)."""
        # watch before the first scan, so nothing arrives unseen in between
        arrivals = self.transport.watch()
        recovery.recover(self.transport, self.registry, self.dispatcher)
        self.dispatcher.prune_notes(lambda rid: self.transport.where(rid) is not None)
        self.rescan()
        return arrivals

    def rescan(self) -> None:
        self._prepared.clear()       # the transport's reads are made anew
        try:
            names = self.transport.scan()
        except OSError as exc:   # a database that is away: the next round tries again
            log.error("event=scan_failed error=%r", str(exc))
            return
        limit = self.transport.scan_limit
        self._scan_partial = limit is not None and len(names) >= limit
        self.backlog.sync(names)
        # (only what is still queued keeps its mark: the set stays bounded)
        self._claim_next.intersection_update(names)

    def arrived(self) -> None:
        """The transport's arrivals fd is readable: take its hints."""
        names = self.transport.arrivals()
        if names is None:
            log.warning("event=inotify_overflow action=rescan")
            self.rescan()
            # (a lost connection, on a shared transport: what was claimed
            # meanwhile may have lost its answer)
            self.reconcile_wanted = True
            return
        for name in names:
            self.backlog.add(name)

    # -- what starts -------------------------------------------------------------------

    def admit(self, free: int) -> Admission:
        """Up to ``free`` requests claimed: jobs whose targets are now held,
        and rejections.  While a target is busy, queued requests are read
        ahead of their claim (``_prekey``): one that needs a busy target is
        passed over and stays queued -- its client may still withdraw it.
        One claimed with a target found busy after all (two of a batch whose
        targets were unknown) goes back in line, held by the transport, its
        key and target known, until the target is free."""
        admission = Admission()
        if self._scan_partial and len(self.backlog) < (self.transport.scan_limit or 0) // 2:
            self.rescan()      # the backlog beyond the last partial scan
        if free <= 0 or not self.backlog:
            return admission
        if len(self.backlog) > free or self.gate.busy or self.gate.elsewhere:
            self._prekey()
        batch: list[Job] = []
        while True:
            # jobs answered in place take one slot together (their batch): while
            # all taken so far are, take the next ones in line too, up to a
            # batch answered at once -- and claim no more than the slots left
            take = free - 1 if admission.in_place else free
            if take <= 0:
                to_claim = []
                break
            # (one being answered in place, seen again by a scan meanwhile, is
            # that job's: back in line if its answer misses)
            names = [n for n in self.backlog.take(take, self.gate) if n not in self._in_place]
            batch += self._read_in_place(names, admission)
            to_claim = [n for n in names if n not in admission.in_place]
            if (to_claim or not names or not self.backlog
                    or len(admission.in_place) >= IN_PLACE_BATCH):
                break
        batch += [job for job in self._claim_all(to_claim, admission) if job is not None]
        batch.sort(key=_job_key)
        for job in batch:
            if job.entry in admission.in_place:
                admission.jobs.append(job)         # no targets: nothing to hold
            elif self.gate.is_free(job.targets) and self._lease(job):
                self.gate.acquire(job.targets)
                admission.jobs.append(job)
            else:
                self._put_back(job)
        admission.alone = len(batch) == 1 and not self.backlog
        return admission

    def rejected(self, rid: str) -> None:
        """A claimed request that did not run is answered."""
        self._held.discard(rid)

    def done(self, job: Job) -> None:
        """A job is over: answered, or (``requeue``) never started -- put back
        by the reconcile -- or, admitted in place, not answered there:
        claimed the usual way, which finds out what became of it."""
        self._held.discard(job.request.id)
        if job.entry in self._in_place:
            self._in_place.discard(job.entry)
            if job.requeue:
                # not answered in place (missed, failed or crashed): claimed
                # the usual way next, never tried in place again
                self._claim_next.add(job.entry)
                self.backlog.add(job.entry)
        elif job.requeue:
            self._unstarted.add(job.request.id)
            self.reconcile_wanted = True
        self.gate.release(job.targets)

    def _read_in_place(self, names: list[str], admission: Admission) -> list[Job]:
        """Jobs that need no claim of their own (see ``AnswersInPlace``):
        read already, valid, instant and idempotent, without targets or a
        batch, a reply wanted.  Anything else is claimed, and what is wrong
        with it answered then."""
        if not isinstance(self.transport, AnswersInPlace):
            return []
        jobs = []
        for name in names:
            if name in self._claim_next:
                self._claim_next.discard(name)
                continue
            seen = self.transport.read_ahead(name)
            if seen is None:
                continue
            kept = self._prepared.pop(name, None)
            if kept is not None and kept[0] is seen:
                job = kept[1]               # validated from these very bytes
            else:
                try:
                    request = self.dispatcher.parse(seen.data, seen.rid, seen.user,
                                                    seen.queued_ns / 1e9)
                    # the op's declaration first: any other request is validated
                    # once, when claimed (a site's validation may query a database)
                    if not self._answerable(request):
                        continue
                    job = self.dispatcher.prepare(request)
                except Exception:  # the claim answers it (and logs a crash)
                    log.debug("event=not_in_place id=%s", seen.rid, exc_info=True)
                    continue
            if job.targets:
                continue
            job.queued_ns, job.entry = seen.queued_ns, name
            admission.in_place[name] = seen
            self._in_place.add(name)
            jobs.append(job)
        return jobs

    def _answerable(self, request: Request) -> bool:
        """Whether ``request`` may be answered in place, by its op's
        declaration and its own fields (its targets are known once valid)."""
        operation = self.registry.get(request.op)
        return (operation is not None and operation.instant and request.wants_reply
                and batch_of(request) is None)

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
                job = self.dispatcher.prepare(request)
                targets = job.targets
                if self._answerable(request) and isinstance(self.transport, AnswersInPlace) \
                        and seen is self.transport.read_ahead(name):
                    # answered in place from this read: validated once
                    self._prepared[name] = (seen, job)
            except OpError:
                pass                      # answered when claimed (NotFound, BadRequest, ...)
            except Exception:
                log.exception("event=prekey_failed name=%s", name)
            self.backlog.set_key(name, request_key(priority, seen.queued_ns, seen.rid), targets)

    def _claim_all(self, names: list[str], admission: Admission) -> list[Job | None]:
        """Claim entries, validate them: jobs to run, or None for each one
        rejected, quarantined or gone."""
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
            self.reconcile_wanted = True
            return []
        self._held.update(c.rid for c in taken if isinstance(c, (Claimed, Refused)))
        return [self._validate(name, claimed, admission) for name, claimed in zip(names, taken)]

    def _validate(self, name: str, claimed: Claimed | Refused | Quarantined | None,
                  admission: Admission) -> Job | None:
        if claimed is None:
            return None
        if isinstance(claimed, Quarantined):
            log.warning("event=quarantine name=%r reason=%r", name, claimed.reason)
            self.stats.count("-", "quarantined", 0.0)
            return None
        queued_at = claimed.queued_ns / 1e9
        if isinstance(claimed, Refused):
            self._reject(admission, _unparsed(claimed.rid, claimed.user, queued_at),
                         BadRequest(claimed.problem))
            return None
        assert isinstance(claimed, Claimed)
        try:
            request = self.dispatcher.parse(claimed.data, claimed.rid, claimed.user, queued_at)
        except OpError as exc:
            self._reject(admission, _unparsed(claimed.rid, claimed.user, queued_at), exc,
                         op=_peek_op(claimed.data))
            return None
        try:
            job = self.dispatcher.prepare(request)
        except OpError as exc:
            self._reject(admission, request, exc)
            return None
        except Exception as exc:
            log.exception("event=validate_crashed id=%s op=%s", claimed.rid, request.op)
            self._reject(admission, request, OpFailed(f"argument validation failed: {exc!r}"))
            return None
        # the exact nanoseconds: keys made by _prekey use them, and a float
        # round trip can move a time by ~100 ns and swap two requests
        job.queued_ns = claimed.queued_ns
        job.entry = claimed.entry
        return job

    def _reject(self, admission: Admission, request: Request, error: OpError,
                op: str | None = None) -> None:
        """An error reply for a request that will not run."""
        reply = self.dispatcher.reply(request, error=error, op=op or request.op or None)
        log.info("event=rejected id=%s op=%s user=%s error=%s message=%r", request.id,
                 reply["op"], request.user, error.type, error.message)
        admission.rejected.append((request, reply))

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
            self.reconcile_wanted = True
            return
        assert job.entry is not None
        self.backlog.add(job.entry)
        self.backlog.set_key(job.entry, _job_key(job), job.targets)

    # -- a shared queue: strays and orphans ---------------------------------------------

    def reconcile(self, unpublished: Iterable[str]) -> None:
        """Put back in line (or answer) what the queue says this worker holds
        but it does not know of -- a claim that committed while its answer
        was lost, a put-back that failed.  ``unpublished``: answered, the
        reply not yet taken by the transport (known, not strays)."""
        self.reconcile_wanted = False
        known = self._held | set(unpublished)
        try:
            recovery.recover_strays(self.transport, self.registry, self.dispatcher, known,
                                    self._unstarted)
            self._unstarted.clear()
        except OSError as exc:
            self.reconcile_wanted = True       # the database is away: again soon
            log.error("event=reconcile_failed error=%r", str(exc))
        except Exception:
            log.exception("event=reconcile_crashed")

    def recover_others(self) -> None:
        """Answer or requeue the requests of workers that died elsewhere
        (theirs is the only copy of that work)."""
        try:
            recovery.recover_orphans(self.transport, self.registry, self.dispatcher,
                                     quiet=self._left_orphans)
        except OSError as exc:
            log.error("event=orphan_check_failed error=%r", str(exc))
        except Exception:
            log.exception("event=orphan_check_crashed")


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
