"""The client's side of the spool's inotify: one instance per process.

A web server with 64 threads must not use 64 of the user's 128 inotify
instances: every ``Client`` of a process shares ONE, whichever transport
object asked for it, and one of the waiting threads reads it and wakes the
others.  The watch on ``replies/`` exists before a request is published,
and a waiter looks for its reply file after registering, so no wake-up is
lost.  After a fork the child gets a fresh instance (gunicorn and friends
fork after import).  Trusts nothing: an event only makes a waiter look.
"""

from __future__ import annotations

import os
import select
import threading
import time
from pathlib import Path

from inotify_simple import INotify, flags

from ...files import pending_events
from ..base import Waiter


class SpoolWaiter(Waiter):
    """One caller waiting for one reply: woken when its reply may have come
    (``arrived``), or when it is handed the reading of inotify."""

    __slots__ = ("arrived", "event", "key", "watcher")

    def __init__(self, watcher: ReplyWatcher, key: tuple[str, str]) -> None:
        self.event = threading.Event()
        self.arrived = False
        self.watcher, self.key = watcher, key

    def wait(self, timeout: float) -> None:
        self.watcher.wait(self, timeout)

    def close(self) -> None:
        self.watcher.forget(self)


class ReplyWatcher:
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
        self.waiters: dict[tuple[str, str], list[SpoolWaiter]] = {}
        self.leader: SpoolWaiter | None = None

    def expect(self, directory: Path, name: str) -> SpoolWaiter:
        """Register a waiter (watching the folder from the first on: adding and
        removing a watch per wait costs milliseconds in the kernel)."""
        folder = str(directory)
        waiter = SpoolWaiter(self, (folder, name))
        with self.lock:
            if folder not in self.watched:
                wd = self.inotify.add_watch(folder, flags.MOVED_TO | flags.CLOSE_WRITE)
                self.watched[folder] = wd
                self.dirs[wd] = folder
            self.waiters.setdefault(waiter.key, []).append(waiter)
        return waiter

    def forget(self, waiter: SpoolWaiter) -> None:
        key = waiter.key
        with self.lock:
            waiting = self.waiters.get(key)
            if waiting and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self.waiters[key]
            if self.leader is waiter:
                self._hand_over()

    def wait(self, waiter: SpoolWaiter, timeout: float) -> None:
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

    def _hand_over(self, but: SpoolWaiter | None = None) -> None:
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


_watcher: ReplyWatcher | None = None
_watcher_lock = threading.Lock()


def shared_watcher() -> ReplyWatcher:
    """The process's one watcher (a fresh one after ``fork()``)."""
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = ReplyWatcher()
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
