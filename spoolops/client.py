"""The Python client: submit a request, wait for its reply, cancel it.

Used by the web application.  It builds the request envelope (id, op, args,
priority, deadline), hands it to the transport the configuration names, and
turns the reply into a result or the ``OpError`` it names.  Waiting is the
transport's business (the spool shares one inotify instance per process
across threads and clients); the client registers before it publishes, and
looks for its reply after registering, so no reply is missed.

Trusts: only replies the transport vouches for (the spool: files owned by
the worker user whose ``id`` matches) that name this process's submitter
(and, for a request it published itself, its op).  Thread-safe, and safe across
``fork()`` (the child waits on a fresh instance).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import Config, load_config, replace_config
from .errors import BadRequest, Timeout, TransportUnavailable, error_for
from .formats import PROTOCOL_VERSION, new_request_id, priority_problem, utc_iso
from .transport import open_transport
from .transport.base import ClientSide, Waiter

BACKSTOP_POLL_S = 2.0  # a wake-up is a hint: look anyway this often
PROGRESS_POLL_S = 0.5  # how often call(on_progress=...) looks at the progress


@dataclass(frozen=True)
class Reply:
    """A reply as the worker wrote it (``raw`` holds the whole object)."""

    id: str
    op: str | None
    ok: bool
    result: Any
    error: dict[str, str] | None
    submitted_by: str | None = None
    queued_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    worker: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Reply:
        return cls(id=obj["id"], op=obj.get("op"), ok=bool(obj.get("ok")),
                   result=obj.get("result"), error=obj.get("error"),
                   submitted_by=obj.get("submitted_by"), queued_at=obj.get("queued_at"),
                   started_at=obj.get("started_at"), finished_at=obj.get("finished_at"),
                   worker=obj.get("worker"), raw=obj)

    def raise_for_error(self) -> Any:
        """Raise the ``OpError`` subclass the reply names, if it failed; else
        return the result."""
        if not self.ok:
            error = self.error or {}
            raise error_for(str(error.get("type")))(str(error.get("message", "")), reply=self)
        return self.result


def _deadline_text(deadline: datetime | str | float | None) -> str | None:
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        return utc_iso(deadline.timestamp())
    if isinstance(deadline, (int, float)):
        return utc_iso(float(deadline))
    return str(deadline)


class Client:
    """Submit requests and collect their replies (thread-safe)."""

    def __init__(self, root: str | os.PathLike | None = None,
                 config: Config | str | os.PathLike | None = None) -> None:
        if not isinstance(config, Config):
            config = load_config(config)
        if root is not None:
            config = replace_config(config, root=Path(os.path.abspath(root)))
        self.config = config
        self.transport: ClientSide = open_transport(config)   # only the client's side
        self._host = socket.gethostname()
        self._me: str | None = None

    def _request(self, op: str, args: dict[str, Any] | None, priority: int,
                 deadline: datetime | str | float | None, reply: bool = True
                 ) -> dict[str, Any]:
        # refused here, nothing queued, as the worker would refuse it (over
        # PostgreSQL the column would otherwise cast "9" to 9)
        problem = priority_problem(priority)
        if problem is not None:
            raise BadRequest(problem)
        request: dict[str, Any] = {
            "version": PROTOCOL_VERSION, "id": new_request_id(), "op": op,
            "args": {} if args is None else args, "priority": priority,
            "submitted": utc_iso(), "client": {"pid": os.getpid(), "host": self._host}}
        if not reply:
            request["reply"] = False
        text = _deadline_text(deadline)
        if text is not None:
            request["deadline"] = text
        return request

    def submit(self, op: str, args: dict[str, Any] | None = None, priority: int = 0,
               deadline: datetime | str | float | None = None, reply: bool = True) -> str:
        """Queue a request; returns its id at once (once it is queued and, with
        ``durable``, kept).  Raises, with nothing queued, otherwise.
        ``reply=False``: fire and forget -- the worker answers nobody and
        leaves nothing behind (failures reach its log and metrics); waiting
        for it times out."""
        return self.transport.publish(self._request(op, args, priority, deadline, reply))

    def pending_batches(self) -> set[str]:
        """The batches (``args["batch"]``) of requests queued or running, or
        answered with follow-up hooks still to retry, of every submitter --
        true whether or not a worker runs (FitsStorage's reducer waits on it)."""
        return self.transport.pending_batches()

    def queue_length(self) -> int:
        """How many requests of every submitter are queued or running."""
        return self.transport.queue_length()

    def wait(self, rid: str, timeout: float | None = 30.0) -> Reply:
        """The reply to ``rid`` (collected: it is removed), or ``Timeout``."""
        waiter = self.transport.expect(rid)
        try:
            return self._wait_registered(rid, waiter, timeout)
        finally:
            waiter.close()

    def _wait_registered(self, rid: str, waiter: Waiter, timeout: float | None,
                         look_first: bool = True,
                         on_progress: Callable[[dict[str, Any]], None] | None = None,
                         op: str | None = None) -> Reply:
        """``look_first=False``: registered before the request was published,
        so the reply cannot be there before its wake-up.  ``op``: the op this
        client asked for, when it published the request itself."""
        end = None if timeout is None else time.monotonic() + timeout
        poll = BACKSTOP_POLL_S if on_progress is None else PROGRESS_POLL_S
        shown = None
        while True:
            try:
                if self._me is None:
                    self._me = self.transport.submitter_name()
                obj = self.transport.collect(rid, submitter=self._me, op=op) \
                    if look_first else None
                look_first = True
                if obj is not None:
                    return Reply.from_dict(obj)
                if on_progress is not None:
                    progress = self.transport.progress_of(rid)
                    if progress is not None and progress != shown:
                        on_progress(progress)
                        shown = progress
            except TransportUnavailable:
                pass   # a database restarting: the request and its reply wait there
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(f"no reply to {rid} within {timeout:g} s"
                              f" (is a worker running on {self.config.root}?)")
            waiter.wait(poll if remaining is None else min(remaining, poll))

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 30.0,
             priority: int = 0, deadline: datetime | str | float | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """Submit, wait, and return the result (or raise its ``OpError``).

        Unless ``deadline`` is given, the request expires when the caller stops
        waiting, so the worker never does work nobody waits for; on
        ``Timeout`` a request still queued is withdrawn.  ``on_progress`` is
        called with each new progress report of the running request
        (``{"done", "total", "updated_at"}``).  A failure's ``OpError``
        carries the whole reply (``.reply``).
        """
        return self.call_reply(op, args, timeout, priority, deadline,
                               on_progress).raise_for_error()

    def call_reply(self, op: str, args: dict[str, Any] | None = None, timeout: float = 30.0,
                   priority: int = 0, deadline: datetime | str | float | None = None,
                   on_progress: Callable[[dict[str, Any]], None] | None = None) -> Reply:
        """``call``, returning the whole ``Reply`` whether it is ``ok`` or not
        (``spoolops call`` prints it); still ``Timeout`` when none comes."""
        if deadline is None and timeout is not None:
            deadline = time.time() + timeout
        request = self._request(op, args, priority, deadline)
        rid = request["id"]
        waiter = self.transport.expect(rid)   # waiting before the request exists
        try:
            self.transport.publish(request)
            try:
                return self._wait_registered(rid, waiter, timeout, look_first=False,
                                             on_progress=on_progress, op=op)
            except Timeout:
                self.cancel(rid)
                raise
        finally:
            waiter.close()

    def cancel(self, rid: str) -> bool:
        """Withdraw a queued request: True if the worker had not claimed it
        (then it never runs and no reply comes)."""
        return self.transport.withdraw(rid)
