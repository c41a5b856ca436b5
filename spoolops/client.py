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

import json
import logging
import os
import pwd
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
    UnsafeEntry,
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


class _ReplyWatcher:
    """The process's one inotify instance, and the threads waiting on it.

    No thread of its own: whichever waiting thread finds nobody reading the
    instance reads it (the leader) and wakes the others whose replies came,
    so a lone caller sleeps on inotify itself, with no thread hand-off.  A
    leader that leaves wakes one other waiter, which takes over.  While
    nobody waits, nobody reads: an idle process is not woken by the replies
    to others (the kernel queues their events, read and dropped by the next
    leader; an overflow only wakes every waiter to look for its file).
    """

    def __init__(self) -> None:
        self.inotify = INotify(nonblocking=True)
        self.lock = threading.Lock()
        self.dirs: dict[int, str] = {}            # wd -> replies dir
        self.watched: dict[str, int] = {}         # replies dir -> wd
        self.waiters: dict[tuple[str, str], list[threading.Event]] = {}
        self.leader: threading.Event | None = None

    def expect(self, directory: Path, name: str) -> threading.Event:
        """Register a waiter (watching the folder from the first on: adding and
        removing a watch per wait costs milliseconds in the kernel)."""
        key = str(directory)
        event = threading.Event()
        with self.lock:
            if key not in self.watched:
                wd = self.inotify.add_watch(key, flags.MOVED_TO | flags.CLOSE_WRITE)
                self.watched[key] = wd
                self.dirs[wd] = key
            self.waiters.setdefault((key, name), []).append(event)
        return event

    def forget(self, directory: Path, name: str, event: threading.Event) -> None:
        key = (str(directory), name)
        with self.lock:
            events = self.waiters.get(key)
            if events and event in events:
                events.remove(event)
                if not events:
                    del self.waiters[key]

    def wait(self, event: threading.Event, timeout: float) -> None:
        """Return when ``event`` is set (maybe spuriously) or ``timeout`` passed."""
        end = time.monotonic() + timeout
        leading = False
        try:
            while not event.is_set():
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return
                if not leading:
                    with self.lock:
                        if self.leader is None:
                            self.leader, leading = event, True
                if not leading:
                    event.wait(remaining)
                    continue
                ready, _, _ = select.select([self.inotify.fileno()], [], [], remaining)
                if ready:
                    self._dispatch(pending_events(self.inotify))
        finally:
            if leading:
                with self.lock:
                    self.leader = None
                    # hand the reading over: wake one other waiter, it will lead
                    other = next((e for evs in self.waiters.values() for e in evs
                                  if e is not event), None)
                    if other is not None:
                        other.set()

    def _dispatch(self, events: list) -> None:
        with self.lock:
            for ev in events:
                if ev.mask & flags.Q_OVERFLOW:
                    for waiting in self.waiters.values():
                        for e in waiting:
                            e.set()
                    continue
                for e in self.waiters.get((self.dirs.get(ev.wd), ev.name), ()):
                    e.set()


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

    @property
    def worker_uid(self) -> int:
        """The uid a genuine reply is owned by."""
        if self._worker_uid is None:
            if self.config.worker_user:
                try:
                    self._worker_uid = pwd.getpwnam(self.config.worker_user).pw_uid
                except KeyError:
                    raise SpoolSetupError(f"[spool] worker_user {self.config.worker_user!r}"
                                          " is not a user on this machine") from None
            else:
                try:
                    self._worker_uid = os.stat(self.spool.active).st_uid
                except FileNotFoundError:
                    raise SpoolSetupError(f"no spool at {self.config.root}:"
                                          " run 'spoolops init'") from None
        return self._worker_uid

    def _expect(self, rid: str) -> tuple[_ReplyWatcher, threading.Event]:
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
        watcher, event = self._expect(rid)
        try:
            return self._wait_registered(rid, event, timeout, watcher)
        finally:
            watcher.forget(self.spool.replies, rid + REQUEST_SUFFIX, event)

    def _wait_registered(self, rid: str, event: threading.Event, timeout: float | None,
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
            watcher.wait(event, BACKSTOP_POLL_S if remaining is None else
                         min(remaining, BACKSTOP_POLL_S))
            event.clear()

    def _collect(self, rid: str) -> Reply | None:
        try:
            f = self.spool.read_reply(rid)
        except FileNotFoundError:
            return None
        except (UnsafeEntry, PermissionError, BlockingIOError) as exc:  # a lease, say
            log.warning("ignoring untrustworthy reply file for %s: %s", rid, exc)
            return None
        if f.st.st_uid != self.worker_uid:
            log.warning("ignoring reply for %s owned by uid %d, not the worker's (%d)",
                        rid, f.st.st_uid, self.worker_uid)
            return None
        try:
            obj = json.loads(f.data)
        except ValueError:
            log.warning("ignoring reply for %s that is not valid JSON", rid)
            return None
        if not isinstance(obj, dict) or obj.get("id") != rid:
            log.warning("ignoring reply for %s whose id does not match", rid)
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
        watcher, event = self._expect(rid)  # watching before the request exists
        try:
            self._publish(request)
            try:
                reply = self._wait_registered(rid, event, timeout, watcher, look_first=False)
            except Timeout:
                self.cancel(rid)
                raise
        finally:
            watcher.forget(self.spool.replies, rid + REQUEST_SUFFIX, event)
        reply.raise_for_error()
        return reply.result

    def cancel(self, rid: str) -> bool:
        """Withdraw a queued request: True if the worker had not claimed it
        (then it never runs and no reply comes)."""
        return self.spool.withdraw_request(rid)
