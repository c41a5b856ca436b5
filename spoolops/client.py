"""The Python client: submit a request, wait for its reply, cancel it.

Used by the web application (a member of the submit group).  One process
shares ONE inotify instance for all its waits, across threads and clients (a
web server with 64 threads must not use 64 of the user's 128 instances); one
of the waiting threads reads it and wakes the others.  The watch on
``replies/`` exists before a request is published, and a waiter looks for
its reply file after registering, so no wake-up is lost.

Trusts: only reply files owned by the worker user (``[spool] worker_user``,
or else the owner of ``active/``) whose ``id`` matches; anything else in the
group-writable ``replies/`` is ignored.  After a fork the child gets a fresh
watcher (gunicorn and friends fork after import).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

from .config import Config, load_config, replace_config
from .errors import SpoolSetupError, Timeout, error_for
from .spool import (
    REQUEST_SUFFIX,
    Spool,
    new_request_id,
    pending_events,
    utc_iso,
)

log = logging.getLogger("spoolops.client")

PROTOCOL_VERSION = 1
BACKSTOP_POLL_S = 2.0  # inotify is a hint: look anyway this often


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

    def raise_for_error(self) -> None:
        """Raise the ``OpError`` subclass the reply names, if it failed."""
        if not self.ok:
            error = self.error or {}
            raise error_for(str(error.get("type")))(str(error.get("message", "")), reply=self)


class _Waiter:
    """One caller waiting for one reply: woken when its reply may have come
    (``arrived``), or when it is handed the reading of inotify."""

    __slots__ = ("arrived", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.arrived = False


class _ReplyWatcher:
    """The process's one inotify instance, and the threads waiting on it.

    No thread of its own: one waiting thread at a time reads the instance
    (the leader) and wakes the others whose replies came, so a lone caller
    sleeps on inotify itself, with no thread hand-off.  A leader that leaves
    hands the reading to a waiter whose reply has NOT come (one whose reply
    came in the same batch would return without reading, and nobody would
    read again until the backstop poll); a waiter handed the reading that
    leaves without taking it up hands it on (``forget``).  While nobody
    waits, nobody reads: an idle process is not woken by the replies to
    others (the kernel queues their events, read and dropped by the next
    leader; an overflow only wakes every waiter to look for its file).
    All state changes happen under ``lock``.
    """

    def __init__(self) -> None:
        self.inotify = INotify(nonblocking=True)
        self.lock = threading.Lock()
        self.dirs: dict[int, str] = {}            # wd -> replies dir
        self.watched: dict[str, int] = {}         # replies dir -> wd
        self.waiters: dict[tuple[str, str], list[_Waiter]] = {}
        self.leader: _Waiter | None = None

    def expect(self, directory: Path, name: str) -> _Waiter:
        """Register a waiter (watching the folder from the first on: adding and
        removing a watch per wait costs milliseconds in the kernel)."""
        key = str(directory)
        waiter = _Waiter()
        with self.lock:
            if key not in self.watched:
                wd = self.inotify.add_watch(key, flags.MOVED_TO | flags.CLOSE_WRITE)
                self.watched[key] = wd
                self.dirs[wd] = key
            self.waiters.setdefault((key, name), []).append(waiter)
        return waiter

    def forget(self, directory: Path, name: str, waiter: _Waiter) -> None:
        key = (str(directory), name)
        with self.lock:
            waiting = self.waiters.get(key)
            if waiting and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self.waiters[key]
            if self.leader is waiter:
                self._hand_over()

    def wait(self, waiter: _Waiter, timeout: float) -> None:
        """Return when the waiter's reply may have come, or ``timeout`` passed.
        (It returns re-armed: the caller looks for its file after this.)"""
        end = time.monotonic() + timeout
        try:
            while True:
                with self.lock:
                    waiter.event.clear()   # setters hold the lock: no wake-up is lost
                    if waiter.arrived:
                        return
                    if self.leader is None:
                        self.leader = waiter
                    leading = self.leader is waiter
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return
                if not leading:
                    waiter.event.wait(remaining)
                    continue
                ready, _, _ = select.select([self.inotify.fileno()], [], [], remaining)
                if ready:
                    self._dispatch(pending_events(self.inotify))
        finally:
            with self.lock:
                waiter.arrived = False
                if self.leader is waiter:
                    self._hand_over(but=waiter)

    def _hand_over(self, but: _Waiter | None = None) -> None:
        """Give the reading to a waiter still waiting (called under ``lock``)."""
        self.leader = next((w for waiting in self.waiters.values() for w in waiting
                            if not w.arrived and w is not but), None)
        if self.leader is not None:
            self.leader.event.set()

    def _dispatch(self, events: list) -> None:
        with self.lock:
            for ev in events:
                if ev.mask & flags.Q_OVERFLOW:
                    woken = [w for waiting in self.waiters.values() for w in waiting]
                else:
                    woken = self.waiters.get((self.dirs.get(ev.wd), ev.name), ())
                for w in woken:
                    w.arrived = True
                    w.event.set()


_watcher: _ReplyWatcher | None = None
_watcher_lock = threading.Lock()


def _shared_watcher() -> _ReplyWatcher:
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = _ReplyWatcher()
        return _watcher


def _after_fork_in_child() -> None:
    global _watcher, _watcher_lock
    old, _watcher = _watcher, None
    _watcher_lock = threading.Lock()
    if old is not None:
        try:
            old.inotify.close()
        except OSError:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)


def _deadline_text(deadline: datetime | str | float | None) -> str | None:
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        return utc_iso(deadline.timestamp())
    if isinstance(deadline, (int, float)):
        return utc_iso(float(deadline))
    return str(deadline)


class Client:
    """Submit requests to a spool and collect their replies (thread-safe)."""

    def __init__(self, root: str | os.PathLike | None = None,
                 config: Config | str | os.PathLike | None = None) -> None:
        if not isinstance(config, Config):
            config = load_config(config)
        if root is not None:
            config = replace_config(config, root=Path(os.path.abspath(root)))
        self.config = config
        self.spool = Spool(config.root, config.durable, config.max_request_bytes)
        self._worker_uid: int | None = None
        self._host = socket.gethostname()
        self._reader = f"this client (uid {os.geteuid()})"

    @property
    def worker_uid(self) -> int:
        """The uid a genuine reply is owned by."""
        if self._worker_uid is None:
            self._worker_uid = self.spool.worker_uid(self.config.worker_user)
        return self._worker_uid

    def _expect(self, rid: str) -> tuple[_ReplyWatcher, _Waiter]:
        """Register as waiting for ``rid``'s reply (watching ``replies/``)."""
        watcher = _shared_watcher()
        try:
            return watcher, watcher.expect(self.spool.replies, rid + REQUEST_SUFFIX)
        except FileNotFoundError:
            raise SpoolSetupError(f"no spool at {self.config.root}: run 'spoolops init'") from None

    def _publish(self, request: dict[str, Any]) -> str:
        try:
            return self.spool.publish_request(request)
        except FileNotFoundError:
            if not self.spool.new.is_dir():
                raise SpoolSetupError(f"no spool at {self.config.root}:"
                                      " run 'spoolops init'") from None
            raise

    def _request(self, op: str, args: dict[str, Any] | None, priority: int,
                 deadline: datetime | str | float | None) -> dict[str, Any]:
        request: dict[str, Any] = {
            "version": PROTOCOL_VERSION, "id": new_request_id(), "op": op,
            "args": {} if args is None else args, "priority": priority,
            "submitted": utc_iso(), "client": {"pid": os.getpid(), "host": self._host}}
        text = _deadline_text(deadline)
        if text is not None:
            request["deadline"] = text
        return request

    def submit(self, op: str, args: dict[str, Any] | None = None, priority: int = 0,
               deadline: datetime | str | float | None = None) -> str:
        """Queue a request; returns its id at once.  (A later ``wait`` first
        registers, then looks for the reply file: an early reply is not missed.)"""
        return self._publish(self._request(op, args, priority, deadline))

    def wait(self, rid: str, timeout: float | None = 30.0) -> Reply:
        """The reply to ``rid`` (collected: the file is removed), or ``Timeout``."""
        watcher, waiter = self._expect(rid)
        try:
            return self._wait_registered(rid, waiter, timeout, watcher)
        finally:
            watcher.forget(self.spool.replies, rid + REQUEST_SUFFIX, waiter)

    def _wait_registered(self, rid: str, waiter: _Waiter, timeout: float | None,
                         watcher: _ReplyWatcher, look_first: bool = True) -> Reply:
        """``look_first=False``: registered before the request was published,
        so the reply cannot be there before its event."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            reply = self._collect(rid) if look_first else None
            look_first = True
            if reply is not None:
                return reply
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise Timeout(f"no reply to {rid} within {timeout:g} s"
                              f" (is a worker running on {self.config.root}?)")
            watcher.wait(waiter, BACKSTOP_POLL_S if remaining is None else
                         min(remaining, BACKSTOP_POLL_S))

    def _collect(self, rid: str) -> Reply | None:
        obj = self.spool.published_reply(rid, self.worker_uid, self._reader)
        if obj is None:
            return None
        self.spool.remove_reply(rid)
        return Reply.from_dict(obj)

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 30.0,
             priority: int = 0, deadline: datetime | str | float | None = None
             ) -> dict[str, Any]:
        """Submit, wait, and return the result (or raise its ``OpError``).

        Unless ``deadline`` is given, the request expires when the caller stops
        waiting, so the worker never does work nobody waits for; on
        ``Timeout`` a request still queued is withdrawn.
        """
        if deadline is None and timeout is not None:
            deadline = time.time() + timeout
        request = self._request(op, args, priority, deadline)
        rid = request["id"]
        watcher, waiter = self._expect(rid)  # watching before the request exists
        try:
            self._publish(request)
            try:
                reply = self._wait_registered(rid, waiter, timeout, watcher, look_first=False)
            except Timeout:
                self.cancel(rid)
                raise
        finally:
            watcher.forget(self.spool.replies, rid + REQUEST_SUFFIX, waiter)
        reply.raise_for_error()
        return reply.result

    def cancel(self, rid: str) -> bool:
        """Withdraw a queued request: True if the worker had not claimed it
        (then it never runs and no reply comes)."""
        return self.spool.withdraw_request(rid)
