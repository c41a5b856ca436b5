"""FitsStorage's file-operations queue API, on the spoolops client.

The Gemini FitsStorage web code queues file operations through
``fits_storage.queues.queue.fileopsqueue``: it builds a ``FileOpsRequest``
(``{"request": op, "args": {...}}``), adds it to a ``FileopsQueue`` -- with
``response_required`` or not, and optionally a ``batch`` -- and, when it
wants the answer, calls ``poll_for_response(id, timeout)``, which returns a
``FileOpsResponse`` (``{"ok", "error", "value"}``) or ``None``.  This module
offers the same names, arguments and return shapes, so that migrating is a
change of import (README: "For FitsStorage maintainers"); the requests then
travel through spoolops, and a reply wakes the waiter at once instead of a
once-a-second poll.

``value`` is what their worker returns: ``echo`` -> its ``echo`` argument
(``"Hello, world"``), ``ingest_upload`` -> ``True``, ``update_headers`` ->
``None``; spoolops' richer result stays on the response as ``result`` (and
the whole ``Reply`` as ``reply``).

Differences, all on the side of safety: ``add`` returns the entry at once
whether or not ``response_required`` (as theirs does); a request's ``batch``
is copied into its ``args``, as their worker's dispatcher did; an
operation's failure is ``ok: False`` with ``error`` = ``"Type: message"``
(their ``ingest_upload`` answers ``ok: True, value: False``); replies nobody
polls for are removed by the janitor after ``reply_ttl`` (theirs were
deleted by the worker).

``add(..., response_required=False)`` asks for no reply at all (``"reply":
false``): the request leaves no file or row behind once done.
``pending_batches()`` and ``queue_length()`` are what their reducer's
``after_batch`` gate and statistics page read from the table.

Trusts: what ``spoolops.Client`` trusts.  The ``session`` and ``logger``
arguments are accepted and not used (there is no database row).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from ..client import Client
from ..errors import Timeout

_client: Client | None = None
_client_lock = threading.Lock()


def shared_client() -> Client:
    """The process's client (its configuration as ``Client()`` finds it)."""
    global _client
    with _client_lock:
        if _client is None:
            _client = Client()
        return _client


class FileOpsResponse:
    """``{"ok": bool, "error": str, "value": any}``, as FitsStorage's."""

    def __init__(self, ok: bool = False, error: str = "", value: Any = "",
                 json: str | None = None) -> None:
        self.ok, self.error, self.value = ok, error, value
        self.result: Any = None            # spoolops' result of the operation
        self.reply: Any = None             # the whole spoolops Reply
        if json is not None:
            self.loads(json)

    def dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.error, "value": self.value}

    def json(self) -> str:
        return json.dumps(self.dict())

    def loads(self, text: str) -> None:
        obj = json.loads(text)
        self.ok, self.error, self.value = obj["ok"], obj["error"], obj["value"]

    @classmethod
    def from_reply(cls, reply: Any) -> FileOpsResponse:
        if reply.ok:
            response = cls(ok=True, error="", value=their_value(reply.op, reply.result))
        else:
            error = reply.error or {}
            response = cls(ok=False, error=f"{error.get('type')}: {error.get('message')}",
                           value="")
        response.result, response.reply = reply.result, reply
        return response


def their_value(op: str | None, result: Any) -> Any:
    """What FitsStorage's worker function returns for a successful ``op``
    (``fits_storage/server/fileops.py``): echo its ``echo`` argument,
    ingest_upload ``True``, update_headers ``None``; other ops their result."""
    if op == "echo":
        return result.get("echo") if isinstance(result, dict) and "echo" in result else result
    if op == "ingest_upload":
        return True
    if op == "update_headers":
        return None
    return result


class FileOpsRequest:
    """``{"request": op, "args": {...}}``, as FitsStorage's."""

    def __init__(self, request: str = "", args: dict[str, Any] | None = None) -> None:
        self.request = request
        self.args = {} if args is None else args

    def dict(self) -> dict[str, Any]:
        return {"request": self.request, "args": self.args}

    def json(self) -> str:
        return json.dumps(self.dict())

    def loads(self, text: str) -> None:
        obj = json.loads(text)
        self.request, self.args = obj["request"], obj["args"]


@dataclass
class FileopsQueueEntry:
    """What ``FileopsQueue.add`` returns: ``id`` is the spoolops request id."""

    id: str
    request: str
    filename: str | None = None
    response_required: bool = False
    batch: Any = None
    response: str | None = field(default=None, repr=False)


class FileopsQueue:
    """``FileopsQueue(session, logger)``: ``add`` and ``poll_for_response``."""

    def __init__(self, session: Any = None, logger: Any = None,
                 client: Client | None = None) -> None:
        self.session, self.logger = session, logger
        self._client = client

    @property
    def client(self) -> Client:
        return self._client if self._client is not None else shared_client()

    def add(self, fo_reqest: FileOpsRequest, filename: str | None = None,  # their spelling
            after: Any = None, response_required: bool = False, batch: Any = None
            ) -> FileopsQueueEntry:
        """Queue the request; the entry (``.id``) at once."""
        args = dict(fo_reqest.args)
        if batch is not None:
            args["batch"] = batch
        # no response wanted: the worker answers nobody, and nothing of the
        # request is left once it is done (theirs deleted the row)
        rid = self.client.submit(fo_reqest.request, args, reply=response_required)
        return FileopsQueueEntry(rid, fo_reqest.json(), filename, response_required, batch)

    def poll_for_response(self, id: str, timeout: float = 10) -> FileOpsResponse | None:
        """The response to entry ``id``, or None if none comes within ``timeout``
        seconds (woken by the reply, not polling)."""
        try:
            return FileOpsResponse.from_reply(self.client.wait(id, timeout=timeout))
        except Timeout:
            return None


def pending_batches() -> set[str]:
    """The batches with a file operation still pending (queued, running, or
    answered with its re-ingest still to be retried), whoever submitted it:
    what ``reducequeue.py``'s ``after_batch`` gate reads from ``fileopsqueue``
    (``batch`` of rows whose ``fail_dt`` is ``fail_dt_false``).  Any member
    of the submit group may ask (their reducer runs as ``dragons``)."""
    return shared_client().pending_batches()


def queue_length() -> int:
    """Requests queued or running (their statistics page counts the table)."""
    return shared_client().queue_length()


def submit(request: dict[str, Any], response_required: bool = False, timeout: float = 60,
           batch: Any = None) -> dict[str, Any] | str:
    """One call for a request dict ``{"request": op, "args": {...}}``: with
    ``response_required``, wait and return ``{"ok", "error", "value"}``
    (``{"ok": False, "error": "Timeout: ...", ...}`` if none comes in time);
    without, return the request id at once."""
    queue = FileopsQueue()
    entry = queue.add(FileOpsRequest(request["request"], request.get("args") or {}),
                      response_required=response_required, batch=batch)
    if not response_required:
        return entry.id
    response = queue.poll_for_response(entry.id, timeout=timeout)
    if response is None:
        queue.client.cancel(entry.id)
        return {"ok": False, "error": f"Timeout: no reply within {timeout:g} s",
                "value": ""}
    return response.dict()
