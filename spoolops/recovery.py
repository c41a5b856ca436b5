"""Start-up recovery: finish or undo what a dead worker left behind.

Runs once, under the worker lock, before any request is claimed:

1. each operation's own ``recover`` hook (``update_headers`` rolls back an
   in-place header rewrite cut off by a crash, before any request can touch
   the file);
2. recorded temporary files outside ``work/`` are removed
   (``tempfiles.cleanup_temps``), and stale staging files in ``work/``;
3. staged replies (the op finished, the reply was not yet published) are
   published -- exactly one reply, never two; one cut off while being
   written is dropped (its request is still in ``active/``, see step 4);
4. each request left in ``active/`` is an orphan: if its reply is already in
   ``replies/`` the orphan is only cleared; if it never started (no run
   file) or its op is idempotent it goes back to ``new/`` keeping its mtime
   (its place in line); otherwise it gets an ``Interrupted`` reply and moves
   to ``failed/`` with a reason.

Trusts: ``work/`` and ``active/`` (the worker's own folders).  The caller
must hold the worker lock (the worker does; ``spoolops janitor`` takes it
non-blocking before calling ``recover``).  ``plan_orphan`` says what
``recover`` would do with one orphan, without doing it (``janitor --dry-run``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .dispatch import Dispatcher, Request, user_name
from .errors import Interrupted, OpError
from .ops import Registry
from .spool import (
    RUN_SUFFIX,
    STAGED_REPLY_SUFFIX,
    Spool,
    UnsafeEntry,
    id_from_name,
)
from .tempfiles import cleanup_temps

log = logging.getLogger("spoolops.recovery")


@dataclass
class Recovery:
    """What ``recover`` did: counts by kind, and one step per thing done or failed."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("hooks", "temps", "published", "cleared", "requeued", "interrupted", "errors"), 0))
    steps: list[Step] = field(default_factory=list)

    def did(self, kind: str, action: str, path: object, why: str) -> None:
        self.counts[kind] += 1
        self.steps.append(Step(action, str(path), why))

    def failed(self, action: str, path: object, why: str, error: str) -> None:
        self.counts["errors"] += 1
        self.steps.append(Step(action, str(path), why, error))


@dataclass(frozen=True)
class Step:
    action: str
    path: str
    why: str
    error: str | None = None


def recover(spool: Spool, registry: Registry, dispatcher: Dispatcher) -> Recovery:
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
    removed, errors = cleanup_temps(spool.work)
    for path in removed:
        log.warning("event=recovered action=removed_temp path=%s", path)
        done.did("temps", "remove", path, "temporary file of an operation cut off by a crash")
    for path, error in errors:
        log.error("event=temp_not_removed path=%s error=%r", path, error)
        done.failed("remove", path, "temporary file of an operation cut off by a crash",
                    error)
    for entry in sorted(os.listdir(spool.work)):
        if entry.endswith(".tmp"):
            _unlink(spool.work / entry)
            done.steps.append(Step("remove", str(spool.work / entry),
                                   "staging leftover of a dead worker"))
    for rid in spool.staged_replies():
        staged = spool.staged_reply(rid)
        if staged is None and not _staged_cut_off(spool, dispatcher, rid):
            continue
        op_name = _interruption_op(staged)
        if op_name is not None and os.path.lexists(spool.active / (rid + ".json")):
            # an earlier recovery staged this Interrupted reply and died before
            # moving the request aside: finish that first
            spool.quarantine(spool.active, rid + ".json", _interrupted_reason(op_name))
        spool.publish_reply(rid)
        log.warning("event=recovered action=published_staged_reply id=%s", rid)
        done.did("published", "publish", spool.work / (rid + STAGED_REPLY_SUFFIX),
                 "a finished reply the dead worker had not published")
    for name in sorted(os.listdir(spool.active)):
        if name.endswith(RUN_SUFFIX):
            if not os.path.lexists(spool.active / name[: -len(".run")]):
                _unlink(spool.active / name)
            continue
        _recover_orphan(spool, registry, dispatcher, name, done)
    return done


REQUEUE, CLEAR, INTERRUPT, QUARANTINE = "requeue", "clear", "interrupt", "quarantine"


def plan_orphan(spool: Spool, registry: Registry, dispatcher: Dispatcher, name: str
                ) -> tuple[str, str | None, object]:
    """What recovery does with ``active/NAME``: (action, op name, parsed request).

    ``clear``: its reply was already published; ``requeue``: it never started
    (no run file), its op is idempotent, or it cannot be parsed (the claim
    will answer it); ``interrupt``: a non-idempotent op that started;
    ``quarantine``: its name carries no id.
    """
    rid = id_from_name(name)
    if rid is None:
        return QUARANTINE, None, None
    # the reply a client would trust, not merely a file by that name: replies/
    # is group-writable, and a planted one must not make an orphan vanish
    worker_uid = spool.worker_uid(dispatcher.config.worker_user)
    if spool.published_reply(rid, worker_uid, reader="recovery") is not None:
        return CLEAR, None, None
    started = os.path.lexists(spool.active / (rid + RUN_SUFFIX))
    op_name, idempotent, request = None, False, None
    try:
        f = spool.read_claimed(name)
        request = dispatcher.parse(f.data, rid, f.st.st_uid, f.st.st_mtime_ns / 1e9)
        op_name = request.op
        operation = registry.get(op_name)
        idempotent = operation is not None and operation.idempotent
    except (UnsafeEntry, OpError, OSError):
        pass  # unreadable or invalid: it never ran; the claim will answer it
    if not started or idempotent or request is None:
        return REQUEUE, op_name, request
    return INTERRUPT, op_name, request


def _recover_orphan(spool: Spool, registry: Registry, dispatcher: Dispatcher, name: str,
                    done: Recovery) -> None:
    action, op_name, request = plan_orphan(spool, registry, dispatcher, name)
    rid = id_from_name(name)
    path = spool.active / name
    if action == QUARANTINE:
        spool.quarantine(spool.active, name, "Found in active/ at start-up with a name that"
                         " is not <id>.json")
        done.steps.append(Step("quarantine", str(path), "in active/ with no request id"))
        return
    if action == CLEAR:
        _unlink(spool.active / (name[: -len(".json")] + RUN_SUFFIX))
        _unlink(spool.active / name)
        log.warning("event=recovered action=cleared_answered_orphan id=%s", rid)
        done.did("cleared", "clear", path, "an orphan whose reply was already published")
        return
    if action == REQUEUE:
        spool.unclaim_request(name)
        log.warning("event=recovered action=requeued id=%s op=%s", rid, op_name)
        done.did("requeued", "requeue", path, f"an orphan of {op_name or '?'} that may run"
                 " again (idempotent, or never started)")
        return
    assert isinstance(request, Request) and rid is not None
    reply = dispatcher.reply(request, error=Interrupted(
        f"the worker stopped while running {op_name!r}; it may or may not have completed."
        " Check the target before retrying (see 'spoolops show ID'); the request is in"
        f" failed/{name}"))
    spool.stage_reply(rid, reply, in_place=False)
    spool.quarantine(spool.active, name, _interrupted_reason(op_name))
    spool.publish_reply(rid)
    log.warning("event=recovered action=interrupted id=%s op=%s", rid, op_name)
    done.did("interrupted", "interrupt", path, f"an orphan of {op_name!r}, not idempotent:"
             " answered Interrupted, moved to failed/")


def _interrupted_reason(op_name: str | None) -> str:
    return (f"Interrupted: the worker died while running {op_name!r} (not idempotent), so"
            " it was not re-run; check its target and requeue it with 'spoolops requeue'"
            " if it did not complete")


def _staged_cut_off(spool: Spool, dispatcher: Dispatcher, rid: str) -> bool:
    """A staged reply that does not parse was cut off while being written:
    drop it, and leave the request in ``active/`` to step 4.  Only a power
    cut with ``durable = no`` can leave one without its request: then its
    outcome is unknown, and the client is told so.  True if a replacement
    reply was staged (to be published)."""
    name = rid + ".json"
    if any(os.path.lexists(folder / name) for folder in (spool.active, spool.new,
                                                          spool.failed)):
        # the request will be answered from there (``spoolops requeue`` may
        # have put it back in new/ while no worker ran)
        _unlink(spool.work / (rid + STAGED_REPLY_SUFFIX))
        log.warning("event=recovered action=dropped_partial_reply id=%s", rid)
        return False
    spool.stage_reply(rid, dispatcher.reply(None, rid=rid, error=Interrupted(
        "the worker stopped while writing this request's reply; whether the operation"
        " completed is unknown. Check the target before retrying")), in_place=False)
    return True


def _interruption_op(reply: dict | None) -> str | None:
    """The op name if a staged reply is an ``Interrupted`` one."""
    error = reply.get("error") if reply is not None else None
    if isinstance(error, dict) and error.get("type") == Interrupted.type:
        return reply.get("op") or "?"
    return None


def _nobody() -> Request:
    return Request(id="recovery", op="", args=None, uid=os.getuid(),
                   user=user_name(os.getuid()), queued_at=0.0)


def _unlink(path: os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


