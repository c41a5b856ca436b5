"""Shared helpers of the transport contract suite (``tests/contract/``).

Nothing here knows a transport: a request, a reply, a worker's handle and a
client's handle are built only through the interface (``Transport``) and the
test environments' one face (``support.env.Env``, the ``queue`` fixture).

- ``make_request(rid, ...)``: a request document as ``Client`` writes it, with an
  id the test chooses;
- ``reply(rid, ...)``: a reply document as the worker's dispatcher shapes it;
- ``Handles``: worker handles (a ``Transport`` that may claim, as a worker
  does: registered as a worker where the transport needs that) and the
  client's handle (the transport of the queue's ``Client``);
- ``entry_of``: the queued entry a scan names for an id;
- ``DESCRIBED``: the state ``describe`` (and ``spoolops show``) names for a
  request in each of the states.
"""

from __future__ import annotations

import os
from typing import Any

from spoolops.config import replace_config
from spoolops.formats import PROTOCOL_VERSION, utc_iso
from spoolops.transport import open_transport
from spoolops.transport.base import Claimed, SharedQueue, Transport, WorkerLock

# the state ``describe`` / ``spoolops show`` names for a request in each state
DESCRIBED = {"queued": "queued", "running": "running", "failed": "failed", "replies": "done"}


def make_request(rid: str, op: str = "sleep", args: dict[str, Any] | None = None,
            priority: int = 0) -> dict[str, Any]:
    """A request document (``Client._request``'s shape) under id ``rid``."""
    return {"version": PROTOCOL_VERSION, "id": rid, "op": op,
            "args": {"seconds": 0} if args is None else args, "priority": priority,
            "submitted": utc_iso(), "client": {"pid": os.getpid(), "host": "contract"}}


def reply(rid: str, user: str | None = None, mark: Any = None, op: str = "sleep"
          ) -> dict[str, Any]:
    """A successful reply to ``rid`` whose result is ``{"mark": mark}``."""
    now = utc_iso()
    return {"version": PROTOCOL_VERSION, "id": rid, "op": op, "ok": True,
            "result": {"mark": mark}, "error": None, "submitted_by": user,
            "queued_at": None, "started_at": now, "finished_at": now,
            "worker": {"pid": os.getpid(), "host": "contract"}}


def run_record(rid: str, targets: tuple[str, ...] = ()) -> dict[str, Any]:
    """A run record as the worker writes it at ``start``."""
    return {"id": rid, "op": "sleep", "pid": os.getpid(), "host": "contract",
            "user": "contract", "targets": list(targets), "started_at": utc_iso()}


class Handles:
    """The handles a test drives a queue with.

    ``worker()`` is one more worker's transport.  The first takes the worker
    lock (``lock_worker``); on a ``SharedQueue`` every one does, each
    with a folder of its own (``work_dir``: one worker per host folder), as
    several hosts' workers would.  On a transport that is not a ``SharedQueue``
    (the spool) there is one worker by design: a second handle is a rival
    process that holds no lock -- what a claim must withstand all the same.
    """

    def __init__(self, queue, request_) -> None:
        self.queue = queue
        self._request = request_
        self._n = 0
        self._client: Transport | None = None

    def worker(self, lock: bool = True) -> Transport:
        n, self._n = self._n, self._n + 1
        transport = self.queue.transport()
        if isinstance(transport, SharedQueue) and n:
            config = replace_config(self.queue.config, root=self.queue.base / f"host{n}")
            transport = open_transport(config)
        if lock and (n == 0 or isinstance(transport, SharedQueue)):
            os.makedirs(transport.work_dir, exist_ok=True)
            held: WorkerLock = transport.lock_worker(False, lambda: False)
            self._request.addfinalizer(held.release)
        return transport

    def client(self) -> Transport:
        """The client's transport (a web role over PostgreSQL)."""
        if self._client is None:
            self._client = self.queue.client().transport
        return self._client

    def publish(self, *requests: dict[str, Any]) -> list[str]:
        return [self.client().publish(r) for r in requests]


def entry_of(worker: Transport, rid: str) -> str:
    """The queued entry ``worker``'s scan names for ``rid``."""
    for entry in worker.scan():
        seen = worker.peek(entry)
        if seen is not None and seen.rid == rid:
            return entry
    raise AssertionError(f"{rid} is not among the queued entries")


def claimed_ids(results: list) -> list[str]:
    """The ids a ``claim_all`` took (``Claimed``)."""
    return [c.rid for c in results if isinstance(c, Claimed)]


def answered_in_place(worker: Any, seen: Claimed, answer: dict[str, Any]) -> bool:
    """``worker.answer_queued`` for one read (``AnswersInPlace``): answered?"""
    return worker.answer_queued([(seen, answer)]) == {seen.entry}
