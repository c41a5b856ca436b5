"""The worker's retries of kept follow-up hook calls (``hookledger``).

A hook call that failed was kept in the ledger with the time of its next
try; ``HookRetries`` tells the main loop when the next one is due, and hands
the due ones to the pool -- a few at a time, so that requests keep most of
the pool while the archive's database is down and thousands of calls wait.
When a request's last kept call succeeds, its batch stops being pending.

The ledger is looked at again only when something changed it: a call kept
or retried (any thread: ``changed``), or ``spoolops hooks retry`` (SIGUSR1:
``reload``, which re-reads the files another process wrote).

Trusts: the dispatcher (which runs the hook, its targets locked) and the
ledger's calls as the ledger checked them; the transport, to release a
batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from .dispatch import Dispatcher, Request
from .hookledger import HookCall
from .runner import batch_of
from .transport import Transport

log = logging.getLogger("spoolops.worker")


class HookRetries:
    """When kept hook calls are due, and which are running on the pool."""

    def __init__(self, dispatcher: Dispatcher, transport: Transport, concurrency: int,
                 wake: Callable[[], None]) -> None:
        self.dispatcher = dispatcher
        self.ledger = dispatcher.hook_ledger
        self.transport = transport
        # at most half the pool (one, at least) retries hooks
        self.share = max(1, concurrency // 2)
        self._wake = wake
        self._look = True                   # the ledger changed: when is the next due?
        self._reload = False                # ... changed by another process
        self._next: float | None = None     # monotonic time the next call is due
        self._running: set[tuple[str, str]] = set()

    def changed(self) -> None:
        """A hook call was kept or retried (any thread): look at the ledger."""
        self._look = True
        self._wake()

    def reload(self) -> None:
        """Another process changed the calls: read them afresh (a signal
        handler may call this: flags only)."""
        self._reload = True
        self._look = True

    def due_in(self) -> float | None:
        """Seconds until a kept call is due (None: none is kept)."""
        if self._look:
            self._look = False
            if self._reload:
                self._reload = False
                self.ledger.reload()
            due_in = self.ledger.next_due_in()
            self._next = None if due_in is None else time.monotonic() + due_in
        return None if self._next is None else max(0.0, self._next - time.monotonic())

    def start_due(self, pool: Executor) -> None:
        """Hand the calls that are due to ``pool``, as many as its share
        allows (the rest are due still, and go when these are done)."""
        if self._next is None or time.monotonic() < self._next:
            return
        self._next = None
        room = self.share - len(self._running)
        for call in self.ledger.due():
            if room <= 0:
                break
            key = (call.id, call.hook)
            if key not in self._running:
                self._running.add(key)
                room -= 1
                pool.submit(self._retry, call, key)

    def _retry(self, call: HookCall, key: tuple[str, str]) -> None:
        try:
            if self.dispatcher.retry_hook(call) and not self.ledger.pending_for(call.id):
                # the request's last kept call: its batch is no longer pending
                batch = batch_of(Request(id=call.id, op=call.op, args=call.args,
                                         user=call.user, queued_at=0.0, marker=call.marker))
                if batch is not None:
                    self.transport.release_batch(call.id, batch)
        except Exception:
            log.exception("event=hook_retry_crashed id=%s hook=%s", call.id, call.hook)
        finally:
            self._running.discard(key)
            self.changed()
