"""Start-up recovery: finish or undo what a dead worker left behind.

Runs once, under the worker lock, before any request is claimed:

1. each operation's own ``recover`` hook (``update_headers`` rolls back an
   in-place header rewrite cut off by a crash, before any request can touch
   the file);
2. recorded temporary files of operations are removed
   (``workhome.temps.cleanup_temps``), and the dead worker's own scratch files;
3. the transport settles what the dead worker left half-done in its own
   keeping (``Transport.settle``: the spool publishes a finished reply it
   had not published -- exactly one reply, never two -- drops one cut off
   while its request can still be answered, and clears an orphan whose
   reply is out; PostgreSQL fences a worker that is gone); this module only
   says what to answer a request whose outcome was lost: ``Interrupted``;
4. each orphan (a request a dead worker had claimed): if it never started
   or its op is idempotent it goes back in line (its place kept); otherwise
   it gets an ``Interrupted`` reply and is kept aside with a reason.

A running worker of a shared transport (PostgreSQL) does step 4 now and
then for the orphans of workers that died or hung elsewhere
(``recover_orphans``, after ``settle``), and for its own strays (``recover_strays``): rows the
queue says it holds but it does not know of -- a claim that committed while
its answer was lost, a ``put_back`` that failed.  They are this host's
orphans and take the same path (put back in line, their place kept, or
answered).

Policy only: every step goes through the transport.  The caller must hold
the worker lock (the worker does; ``spoolops janitor`` takes it non-blocking
before calling ``recover``).  ``plan_orphan`` says what ``recover`` would do
with one orphan, without doing it (``janitor --dry-run``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .dispatch import Dispatcher, Request
from .errors import Interrupted, OpError
from .ops import Registry
from .transport import Transport
from .transport.base import Orphan, SharedQueue, Step
from .users import user_name
from .workhome.temps import cleanup_temps

log = logging.getLogger("spoolops.recovery")

REQUEUE, INTERRUPT, QUARANTINE, LEAVE = "requeue", "interrupt", "quarantine", "leave"
# what each of ``settle``'s actions counts as
_SETTLED = {"publish": "published", "clear": "cleared"}


@dataclass
class Recovery:
    """What ``recover`` did: counts by kind, and one step per thing done or failed."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("hooks", "temps", "published", "cleared", "requeued", "interrupted", "errors"), 0))
    steps: list[Step] = field(default_factory=list)

    def did(self, kind: str | None, action: str, what: object, why: str) -> None:
        if kind is not None:
            self.counts[kind] += 1
        self.steps.append(Step(action, str(what), why, done=True))

    def failed(self, action: str, what: object, why: str, error: str) -> None:
        self.counts["errors"] += 1
        self.steps.append(Step(action, str(what), why, error=error))

    def settled(self, steps: list[Step]) -> None:
        for step in steps:
            if step.error is not None:
                self.counts["errors"] += 1
            elif step.action in _SETTLED:
                self.counts[_SETTLED[step.action]] += 1
            self.steps.append(step)


def recover(transport: Transport, registry: Registry, dispatcher: Dispatcher) -> Recovery:
    """Bring the spool to a clean state; returns what was done."""
    done = Recovery()
    for name in registry.names():
        operation = registry.get(name)
        if operation is None or operation.recover is None:
            continue
        try:
            for line in operation.recover(dispatcher.context(_nobody())):
                log.warning("event=recovered op=%s action=%r", name, line)
                done.did("hooks", "recover", name, line)
        except Exception as exc:
            log.exception("event=recover_hook_failed op=%s", name)
            done.failed("recover", name, f"{name}'s recovery hook", repr(exc))
    removed, errors = cleanup_temps(transport.work_dir)
    for path in removed:
        log.warning("event=recovered action=removed_temp path=%s", path)
        done.did("temps", "remove", path, "temporary file of an operation cut off by a crash")
    for path, error in errors:
        log.error("event=temp_not_removed path=%s error=%r", path, error)
        done.failed("remove", path, "temporary file of an operation cut off by a crash",
                    error)
    return recover_orphans(transport, registry, dispatcher, done)


def lost_reply(dispatcher: Dispatcher) -> Callable[[str], dict[str, Any]]:
    """The reply to a request whose outcome was lost with its worker (a reply
    cut off while being written, its request gone: only a power cut with
    durable = no leaves one): the client is told the outcome is unknown."""
    def reply(rid: str) -> dict[str, Any]:
        return dispatcher.reply(None, rid=rid, error=Interrupted(
            "the worker stopped while writing this request's reply; whether the operation"
            " completed is unknown. Check the target before retrying"))
    return reply


def recover_orphans(transport: Transport, registry: Registry, dispatcher: Dispatcher,
                    done: Recovery | None = None, quiet: set[str] | None = None
                    ) -> Recovery:
    """Steps 3 and 4 (settle, then the orphans): also what a worker of a
    shared transport does now and then for the requests of workers that
    died elsewhere.  ``quiet``: orphans already reported as left to their
    own host (not logged again)."""
    done = done if done is not None else Recovery()
    interrupted = lost_reply(dispatcher)
    done.settled(transport.settle(interrupted))
    for orphan in transport.orphans():
        _recover_orphan(transport, registry, dispatcher, orphan, done, quiet)
    return done


def recover_strays(transport: Transport, registry: Registry, dispatcher: Dispatcher,
                   known: set[str], unstarted: set[str] | frozenset[str] = frozenset()
                   ) -> Recovery:
    """Step 4 for the requests this worker holds without knowing it (not in
    ``known``: what it claims, runs or answers now; ``unstarted``: those it
    knows it never started).  The caller is the worker's main thread, which
    alone claims: nothing is half-claimed."""
    done = Recovery()
    if not isinstance(transport, SharedQueue):
        return done         # one worker, its claims never lost (the spool's renames)
    for orphan in transport.strays(known, unstarted):
        _recover_orphan(transport, registry, dispatcher, orphan, done)
    return done


def plan_orphan(transport: Transport, registry: Registry, dispatcher: Dispatcher,
                orphan: Orphan) -> tuple[str, str | None, Request | None]:
    """What recovery does with an orphan: (action, op name, parsed request).

    ``requeue``: it never started
    (no run record), its op is idempotent, or it cannot be parsed (the claim
    will answer it); ``interrupt``: a non-idempotent op that started;
    ``quarantine``: its entry carries no id; ``leave``: another host's
    orphan whose op keeps on-disk state there (a journal only that host's
    worker can roll back): its targets stay leased until that worker returns.
    """
    if orphan.rid is None:
        return QUARANTINE, None, None
    op_name, idempotent, request = None, False, None
    claimed = transport.read_claimed(orphan.entry)
    if claimed is not None:
        try:
            request = dispatcher.parse(claimed.data, claimed.rid, claimed.user,
                                       claimed.queued_ns / 1e9)
            op_name = request.op
            operation = registry.get(op_name)
            idempotent = operation is not None and operation.idempotent
        except OpError:
            pass  # invalid: it never ran; the claim will answer it
    operation = registry.get(op_name) if op_name else None
    if not orphan.local and orphan.started and operation is not None and \
            operation.recover is not None:
        return LEAVE, op_name, request
    if not orphan.started or idempotent or request is None:
        return REQUEUE, op_name, request
    return INTERRUPT, op_name, request


def _recover_orphan(transport: Transport, registry: Registry, dispatcher: Dispatcher,
                    orphan: Orphan, done: Recovery, quiet: set[str] | None = None) -> None:
    if not orphan.settled:
        # its worker's grace ran out after settle looked: not fenced yet, so
        # it might still answer -- taken after the next settle
        log.info("event=orphan_not_settled where=%r", orphan.where)
        return
    action, op_name, request = plan_orphan(transport, registry, dispatcher, orphan)
    rid = orphan.rid
    if action == LEAVE:
        if quiet is None or orphan.where not in quiet:
            log.warning("event=orphan_left id=%s op=%s where=%r note=%r", rid, op_name,
                        orphan.where, "its op keeps state on its own host: recovered when"
                        " that host's worker starts")
            if quiet is not None:
                quiet.add(orphan.where)
        done.did(None, "leave", orphan.where, f"another host's orphan of {op_name!r}")
        return
    if action == QUARANTINE:
        transport.quarantine(orphan.entry, "Found claimed by a dead worker, with a name that"
                             " is not <id>.json", claimed=True)
        done.did(None, "quarantine", orphan.where, "claimed, with no request id")
        return
    assert rid is not None
    if action == REQUEUE:
        transport.put_back(rid)
        log.warning("event=recovered action=requeued id=%s op=%s", rid, op_name)
        done.did("requeued", "requeue", orphan.where, f"an orphan of {op_name or '?'} that"
                 " may run again (idempotent, or never started)")
        return
    assert request is not None
    reply = dispatcher.reply(request, error=Interrupted(
        f"the worker stopped while running {op_name!r}; it may or may not have completed."
        " Check the target before retrying (see 'spoolops show ID'); the request is kept"
        " among the failed ones"))
    transport.fail(rid, reply, _interrupted_reason(op_name))
    log.warning("event=recovered action=interrupted id=%s op=%s", rid, op_name)
    done.did("interrupted", "interrupt", orphan.where, f"an orphan of {op_name!r}, not"
             " idempotent: answered Interrupted, kept aside")


def _interrupted_reason(op_name: str | None) -> str:
    return (f"Interrupted: the worker died while running {op_name!r} (not idempotent), so"
            " it was not re-run; check its target and requeue it with 'spoolops requeue'"
            " if it did not complete")


def _nobody() -> Request:
    return Request(id="recovery", op="", args=None, user=user_name(os.getuid()),
                   queued_at=0.0)
