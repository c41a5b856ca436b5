"""Execution order: priority, then age, then id; one request per target at a time.

Pure bookkeeping, no I/O: the transport tells it what is queued and what
finished; it answers what to start next.  ``Queue`` holds requests still in
``new/`` (unclaimed); ``TargetGate`` holds the targets in use and the claimed
requests waiting for one.

A queued request's key is ``(-priority, mtime_ns, id)``.  Keys are only
needed when more requests are queued than there are free slots (otherwise
everything starts now and only the batch itself is sorted), so reading a
request early, to learn its priority, is skipped in the common case.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

Key = tuple[int, int, str]


def request_key(priority: int, mtime_ns: int, rid: str) -> Key:
    return (-priority, mtime_ns, rid)


@dataclass(slots=True)
class Pending:
    name: str
    key: Key | None = None
    targets: tuple[str, ...] | None = None


class Queue:
    """Requests in ``new/``, by name, with their keys once known."""

    def __init__(self) -> None:
        self.entries: dict[str, Pending] = {}
        self._heap: list[tuple[Key, str]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def add(self, name: str) -> bool:
        if name in self.entries:
            return False
        self.entries[name] = Pending(name)
        return True

    def discard(self, name: str) -> None:
        self.entries.pop(name, None)  # its heap item is dropped lazily

    def sync(self, names: Iterable[str]) -> None:
        """Make the queue match a directory scan."""
        present = set(names)
        for name in list(self.entries):
            if name not in present:
                del self.entries[name]
        for name in present:
            self.add(name)
        if len(self._heap) > 2 * len(self.entries) + 64:
            self._heap = [(p.key, n) for n, p in self.entries.items() if p.key is not None]
            heapq.heapify(self._heap)

    def unkeyed(self) -> list[str]:
        return [name for name, p in self.entries.items() if p.key is None]

    def set_key(self, name: str, key: Key, targets: tuple[str, ...] | None) -> None:
        entry = self.entries.get(name)
        if entry is None or entry.key is not None:
            return
        entry.key = key
        entry.targets = targets
        heapq.heappush(self._heap, (key, name))

    def take(self, count: int, gate: TargetGate) -> list[str]:
        """Up to ``count`` names to claim now, best first.

        If everything queued fits in ``count``, all of it is returned (the
        caller sorts the batch after reading it).  Otherwise every entry must
        be keyed; entries whose targets are busy are passed over, not lost.
        """
        if count <= 0 or not self.entries:
            return []
        if len(self.entries) <= count:
            names = list(self.entries)
            self.entries.clear()
            self._heap.clear()
            return names
        chosen: list[str] = []
        skipped: list[tuple[Key, str]] = []
        reserved: set[str] = set()
        while self._heap and len(chosen) < count:
            key, name = heapq.heappop(self._heap)
            entry = self.entries.get(name)
            if entry is None or entry.key != key:
                continue  # stale heap item
            targets = entry.targets or ()
            if not gate.is_free(targets) or reserved.intersection(targets):
                skipped.append((key, name))
                continue
            reserved.update(targets)
            chosen.append(name)
            del self.entries[name]
        for item in skipped:
            heapq.heappush(self._heap, item)
        return chosen


class TargetGate:
    """Targets in use, and claimed jobs waiting for one, each in key order."""

    def __init__(self) -> None:
        self.busy: set[str] = set()
        self._waiting: dict[str, list[tuple[Key, int, Any]]] = {}
        self._seq = itertools.count()

    def is_free(self, targets: Iterable[str]) -> bool:
        return not any(t in self.busy or t in self._waiting for t in targets)

    def acquire(self, targets: Iterable[str]) -> None:
        self.busy.update(targets)

    def wait(self, key: Key, targets: tuple[str, ...], job: Any) -> None:
        """Park ``job`` until its targets are free."""
        blocking = next(t for t in targets if t in self.busy or t in self._waiting)
        heapq.heappush(self._waiting.setdefault(blocking, []), (key, next(self._seq), job))

    def waiting_count(self) -> int:
        return sum(len(h) for h in self._waiting.values())

    def release(self, targets: Iterable[str], targets_of: Any) -> list[Any]:
        """Free ``targets``; returns parked jobs that may start now (their
        targets are acquired for them).  ``targets_of(job)`` gives a job's targets."""
        self.busy.difference_update(targets)
        ready = []
        for target in list(targets):
            heap = self._waiting.get(target)
            if not heap or target in self.busy:
                continue
            key, _, job = heapq.heappop(heap)
            if not heap:
                del self._waiting[target]
            job_targets = tuple(targets_of(job))
            others = [t for t in job_targets if t != target and
                      (t in self.busy or t in self._waiting)]
            if others:  # still blocked elsewhere: wait there, keeping its key
                heapq.heappush(self._waiting.setdefault(others[0], []),
                               (key, next(self._seq), job))
                continue
            self.busy.update(job_targets)
            ready.append(job)
        return ready

    def drain_waiting(self) -> list[Any]:
        """Every parked job (on shutdown, to put them back in line)."""
        jobs = [job for heap in self._waiting.values() for _, _, job in heap]
        self._waiting.clear()
        return jobs
