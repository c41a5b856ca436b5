"""Dispatch: from request bytes to a reply, independent of how they travel.

Parses and validates the request envelope, looks up the operation, checks
access and the deadline, takes the cross-process locks on the op's targets,
runs it, and shapes the reply dict of the design (``make_reply``: also for
whoever answers without running anything, an operator's cancel).  It imports
no transport: the worker hands it the bytes and the submitter the transport
vouches for, and hands its reply back to the transport.

Trusts: the registry's code and the configuration.  Distrusts: the request
bytes and every field in them; the submitter's identity comes from the
transport (the request file's owner uid), never from the request.
Diagnostics: every failure is an ``OpError`` whose type and message end up in
the reply; unexpected exceptions from an op become ``OpFailed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from . import faults, workhome
from .config import ALL_USERS, Config
from .errors import (
    BadRequest,
    Conflict,
    Expired,
    OpError,
    OpFailed,
    PermissionDenied,
    UnknownOp,
)
from .formats import (
    PROTOCOL_VERSION,
    decode_json_object,
    parse_iso,
    priority_problem,
    utc_iso,
    valid_id,
)
from .hookledger import HookCall, HookLedger
from .ops import OpContext, Operation, Registry
from .workhome import memos
from .workhome.memos import Memo

log = logging.getLogger("spoolops.dispatch")

TARGET_LOCK_TIMEOUT = 300.0
_ENVELOPE = {"version", "id", "op", "args", "priority", "deadline", "submitted", "client",
             "reply", "marker"}
# the mark a transport gives a request while it is pending (the spool's
# pending/<marker>): 16 hex digits, then ~ and the batch in base64url
_MARKER_RE = re.compile(r"^[0-9a-f]{16}(~[A-Za-z0-9_-]{1,200})?$")


@dataclass
class Request:
    """A parsed request envelope.  ``user`` comes from the transport."""

    id: str
    op: str
    args: Any
    user: str
    queued_at: float
    priority: int = 0
    deadline: float | None = None
    submitted: str | None = None
    client: dict[str, Any] | None = None
    # a digest of this very request (its bytes and submitter): what it
    # notes for its own re-run is filed under it, so a reused id sees nothing
    key: str = ""
    wants_reply: bool = True          # "reply": false -- answer nobody
    marker: str | None = None         # the transport's mark while it is pending


@dataclass
class Job:
    """A request whose op is known, allowed and whose args are validated."""

    request: Request
    operation: Operation
    args: dict[str, Any]
    targets: tuple[str, ...] = ()
    started_at: float | None = None
    # what it notes for its own re-run (``execute``): dropped once answered
    memo: Memo | None = None
    # the worker's, from the claim: the transport's name for the queued
    # request, and its place in line to the nanosecond (a float round trip
    # can move a time by ~100 ns and swap two requests)
    entry: str | None = None
    queued_ns: int | None = None
    # the worker's, from the run: the reply and how long the op took; or,
    # never started (the queue out of reach), it goes back in line
    reply: dict[str, Any] | None = None
    duration: float = 0.0
    requeue: bool = False


def target_lock_path(work_dir: Path, target: str) -> Path:
    """The lock file other archive processes take (with ``filelock``) to keep
    out of a target while spoolops edits it: ``work/locks/<sha256>.lock``."""
    digest = hashlib.sha256(os.fsencode(target)).hexdigest()[:32]
    return workhome.target_lock_path(work_dir, digest)


class Dispatcher:
    """Validates and runs requests; shapes replies.  Thread-safe."""

    def __init__(self, registry: Registry, config: Config, work_dir: Path,
                 clock: Callable[[], float] = time.time,
                 hook_kept: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.config = config
        self.work_dir = Path(work_dir)
        self.clock = clock
        self.worker_info = this_worker()
        self.hook_ledger = HookLedger(self.work_dir, config.durable, cached=True)
        self.hook_kept = hook_kept        # told when a failed hook call is kept

    # -- validation ---------------------------------------------------------

    def parse(self, data: bytes, rid: str, user: str, queued_at: float) -> Request:
        """The envelope from the request bytes; ``rid`` is the id the
        transport attributes the request to (the file name)."""
        obj = decode_json_object(data)
        unknown = sorted(obj.keys() - _ENVELOPE)
        if unknown:
            raise BadRequest(f"unknown request field(s): {', '.join(unknown)}")
        if obj.get("version") != PROTOCOL_VERSION:
            raise BadRequest(f"unsupported request version {obj.get('version')!r}"
                             f" (this worker speaks version {PROTOCOL_VERSION})")
        if obj.get("id") != rid:
            raise BadRequest(f"request id {obj.get('id')!r} does not match its file name {rid!r}")
        op = obj.get("op")
        if not isinstance(op, str) or not op:
            raise BadRequest("request field 'op' must be a non-empty string")
        args = obj.get("args", {})
        priority = obj.get("priority", 0)
        problem = priority_problem(priority)
        if problem is not None:
            raise BadRequest(problem)
        priority = priority or 0
        deadline = obj.get("deadline")
        if deadline is not None:
            if not isinstance(deadline, str):
                raise BadRequest("'deadline' must be an ISO 8601 time string or null")
            try:
                deadline = parse_iso(deadline)
            except ValueError:
                raise BadRequest(f"'deadline' is not an ISO 8601 time: {deadline!r}") from None
        submitted = obj.get("submitted")
        if submitted is not None and not isinstance(submitted, str):
            raise BadRequest("'submitted' must be a string")
        client = obj.get("client")
        if client is not None and not isinstance(client, dict):
            raise BadRequest("'client' must be an object")
        wants_reply = obj.get("reply", True)
        if not isinstance(wants_reply, bool):
            raise BadRequest("'reply' must be true or false")
        marker = obj.get("marker")
        if marker is not None and (not isinstance(marker, str) or not _MARKER_RE.fullmatch(marker)):
            raise BadRequest("'marker' is not a mark this spool makes")
        key = hashlib.sha256(b"\0".join((rid.encode(), user.encode(), data))).hexdigest()[:16]
        return Request(id=rid, op=op, args=args, user=user,
                       queued_at=queued_at, priority=priority, deadline=deadline,
                       submitted=submitted, client=client, key=key,
                       wants_reply=wants_reply, marker=marker)

    def context(self, request: Request,
                progress: Callable[[int, int], None] | None = None) -> OpContext:
        ctx = OpContext(config=self.config, work_dir=self.work_dir, request_id=request.id,
                        user=request.user, resolvers=self.registry.resolvers,
                        memo=Memo(self.work_dir, request.id, self.config.durable, request.key))
        if progress is not None:
            ctx.progress = progress
        return ctx

    def prepare(self, request: Request) -> Job:
        """Look up, authorise and validate; nothing is touched yet."""
        operation = self.registry.get(request.op)
        if operation is None:
            raise UnknownOp(f"unknown operation {request.op!r}"
                            f" (known: {', '.join(self.registry.names())})")
        allowed = self.config.allowed_users(operation.name, operation.allowed_users)
        if ALL_USERS not in allowed and request.user not in allowed:
            raise PermissionDenied(f"user {request.user!r} may not call {operation.name!r}")
        ctx = self.context(request)
        args = operation.validate(request.args, ctx)
        targets = tuple(operation.targets(args, ctx))
        return Job(request=request, operation=operation, args=args, targets=targets)

    # -- execution ----------------------------------------------------------

    def execute(self, job: Job, progress: Callable[[int, int], None] | None = None
                ) -> dict[str, Any]:
        """Run a prepared job and return its reply (never raises OpError)."""
        request = job.request
        job.started_at = self.clock()
        try:
            if request.deadline is not None and job.started_at > request.deadline:
                raise Expired(f"deadline {utc_iso(request.deadline)} passed before the"
                              " worker started the request")
            ctx = self.context(request, progress)
            job.memo = ctx.memo
            with self._target_locks(job.targets):
                result = job.operation.run(ctx, job.args)
                if result is None:
                    result = {}
                if not isinstance(result, dict):
                    raise OpFailed(f"operation {job.operation.name!r} returned"
                                   f" {type(result).__name__}, not a dict")
                json.dumps(result, allow_nan=False)  # a result that cannot be sent fails
                hooks, warnings = self._follow_up(job, ctx, result) if \
                    job.operation.follow_up and self.registry.hooks else ({}, [])
        except OpError as exc:
            return self.reply(request, error=exc, started_at=job.started_at)
        except Exception as exc:
            log.exception("event=op_crashed id=%s op=%s", request.id, request.op)
            return self.reply(request, error=OpFailed(_describe(exc)),
                              started_at=job.started_at)
        reply = self.reply(request, result=result, started_at=job.started_at)
        if hooks:
            reply["hooks"] = hooks
        if warnings:
            reply["warnings"] = warnings
        return reply

    def _follow_up(self, job: Job, ctx: OpContext, result: dict[str, Any]
                   ) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """Run the site's hooks after a committed change, still holding the
        targets' locks, each at most once per request: what a hook did is
        noted (durably) before the next one runs, and a re-run after a crash
        skips what is noted -- repeating a hook only if the worker died
        between the hook's own effect and its note.  A hook that fails does
        not undo the change: its call is kept (``hookledger``) and retried
        later until it succeeds; the reply stays ok, says so in ``hooks``
        (name -> "ran" or "retrying") and carries a warning."""
        done = dict(ctx.memo.get("hooks", {}))
        warnings = []
        faults.hit("follow_up.start")
        for name, hook in self.registry.hooks:
            if name not in done:
                try:
                    hook(job.operation.name, dict(job.args), result, ctx)
                    done[name] = None
                except Exception as exc:  # noqa: BLE001 - site code: report, keep the change
                    done[name] = self._keep_hook_call(job, name, result, exc)
                ctx.memo.put("hooks", done)
                faults.hit("follow_up.noted")
            if done[name] is not None:
                warnings.append({"hook": name, "error": done[name], "retrying": True})
        return {name: "ran" if done[name] is None else "retrying"
                for name, _hook in self.registry.hooks}, warnings

    def _keep_hook_call(self, job: Job, name: str, result: dict[str, Any],
                        exc: Exception) -> str:
        error = f"{type(exc).__name__}: {exc}"
        log.error("event=hook_failed id=%s op=%s hook=%s error=%r action=retry_later",
                  job.request.id, job.operation.name, name, error)
        call = HookCall(id=job.request.id, key=job.request.key, hook=name,
                        op=job.operation.name, args=dict(job.args), result=result,
                        user=job.request.user, targets=list(job.targets),
                        marker=job.request.marker)
        try:
            self.hook_ledger.record(call, error, self.clock())
        except (OSError, ValueError, TypeError) as kept:
            log.error("event=hook_not_kept id=%s hook=%s error=%r", job.request.id, name,
                      str(kept))
            return f"{error} (not kept for a retry: {kept})"
        self.hook_kept()
        return error

    def retry_hook(self, call: HookCall) -> bool:
        """Try a kept hook call again (on a pool thread), the targets locked
        as the first call had them; True if it succeeded (and is forgotten)."""
        hook = dict(self.registry.hooks).get(call.hook)
        if hook is None:
            self.hook_ledger.failed_again(call, f"hook {call.hook!r} is not installed",
                                          self.clock())
            return False
        request = Request(id=call.id, op=call.op, args=call.args, user=call.user,
                          queued_at=0.0, key=call.key)
        try:
            with self._target_locks(call.targets):
                hook(call.op, dict(call.args), call.result, self.context(request))
        except Exception as exc:  # noqa: BLE001 - site code: keep it for the next try
            error = f"{type(exc).__name__}: {exc}"
            self.hook_ledger.failed_again(call, error, self.clock())
            log.warning("event=hook_retry_failed id=%s hook=%s tries=%d error=%r", call.id,
                        call.hook, call.tries, error)
            return False
        self.hook_ledger.succeeded(call)
        log.info("event=hook_retried id=%s hook=%s tries=%d outcome=ok", call.id, call.hook,
                 call.tries + 1)
        return True

    def answered(self, job: Job) -> None:
        """The reply to ``job`` is published: drop what it noted for a re-run."""
        if job.memo is not None and job.memo.kept:
            job.memo.forget()

    def prune_notes(self, pending: Callable[[str], bool]) -> None:
        """At start, after recovery: drop the notes of requests that will not
        run again (``pending(id)`` false)."""
        memos.prune(self.work_dir, pending)

    def _target_locks(self, targets: Sequence[str]) -> AbstractContextManager:
        if not targets:
            return nullcontext()   # echo and the like: nothing to lock, nothing to build
        stack = ExitStack()
        (self.work_dir / workhome.TARGET_LOCKS_DIR).mkdir(mode=0o700, exist_ok=True)
        try:
            for target in sorted(set(targets)):  # one global order: no deadlock
                lock = filelock.FileLock(target_lock_path(self.work_dir, target),
                                         timeout=TARGET_LOCK_TIMEOUT)
                try:
                    stack.enter_context(lock)
                except filelock.Timeout:
                    raise Conflict(f"{target} is locked by another process") from None
        except BaseException:
            stack.close()
            raise
        return stack

    def reply(self, request: Request | None, *, rid: str | None = None,
              result: dict[str, Any] | None = None, error: OpError | None = None,
              started_at: float | None = None, op: str | None = None,
              user: str | None = None, queued_at: float | None = None) -> dict[str, Any]:
        """A reply dict as docs/design.rst shapes it (``make_reply``), to
        ``request`` or else to ``rid``."""
        if request is not None:
            rid, user, queued_at = request.id, request.user, request.queued_at
            op = op if op is not None else (request.op or None)
        return make_reply(rid, op=op, user=user, queued_at=queued_at, result=result,
                          error=error, started_at=started_at, now=self.clock(),
                          worker=self.worker_info)


def this_worker() -> dict[str, Any]:
    """The ``worker`` of a reply this process writes: its host and pid."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def make_reply(rid: str | None, *, op: str | None, user: str | None,
               queued_at: float | None, result: dict[str, Any] | None = None,
               error: OpError | None = None, started_at: float | None = None,
               now: float | None = None, worker: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    """A reply dict as docs/design.rst shapes it, for whoever answers
    without running anything (an operator's cancel): ``now`` is the finish
    time (the clock's if None), ``worker`` this process (``this_worker``) if
    None.  ``ValueError`` if ``rid`` is no id."""
    now = time.time() if now is None else now
    if not valid_id(rid):
        raise ValueError(f"no valid id to reply to: {rid!r}")
    finished_at = utc_iso(now)
    return {
        "version": PROTOCOL_VERSION,
        "id": rid,
        "op": op,
        "ok": error is None,
        "result": result if error is None else None,
        "error": None if error is None else {"type": error.type, "message": error.message},
        "submitted_by": user,
        "queued_at": utc_iso(queued_at) if queued_at is not None else None,
        "started_at": finished_at if started_at is None else utc_iso(started_at),
        "finished_at": finished_at,
        "worker": dict(this_worker() if worker is None else worker),
    }


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"
