"""Execution order: priority, then age, then id; one request per target at a time.

Pure bookkeeping, no I/O: the transport tells it what is queued and what
finished; it answers what to start next.  ``Backlog`` holds requests still
queued (unclaimed); ``TargetGate`` holds the targets in use.

A queued request's key is ``(-priority, mtime_ns, id)``.  Keys are only
needed when more requests are queued than there are free slots (otherwise
everything starts now and only the batch itself is sorted), so reading a
request early, to learn its priority, is skipped in the common case.  A
request found to need a busy target goes back to the queue with its key and
targets known, and is passed over until the target is free: requests for one
target therefore start one at a time, in key order.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from dataclasses import dataclass

Key = tuple[int, int, str]


def request_key(priority: int, mtime_ns: int, rid: str) -> Key:
    return (-priority, mtime_ns, rid)


@dataclass(slots=True)
class Pending:
    name: str
    key: Key | None = None
    targets: tuple[str, ...] | None = None
    seen: float = 0.0              # monotonic time the worker first saw it


class Backlog:
    """Requests still queued (unclaimed), by name, with their keys once known."""

    def __init__(self) -> None:
        self.entries: dict[str, Pending] = {}
        self._unkeyed: dict[str, None] = {}   # insertion-ordered set: O(new) per round
        self._heap: list[tuple[Key, str]] = []

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def add(self, name: str) -> bool:
        if name in self.entries:
            return False
        self.entries[name] = Pending(name, seen=time.monotonic())
        self._unkeyed[name] = None
        return True

    def discard(self, name: str) -> None:
        self.entries.pop(name, None)  # its heap item is dropped lazily
        self._unkeyed.pop(name, None)

    def sync(self, names: Iterable[str]) -> None:
        """Make the queue match a directory scan."""
        present = set(names)
        for name in list(self.entries):
            if name not in present:
                self.discard(name)
        for name in present:
            self.add(name)
        if len(self._heap) > 2 * len(self.entries) + 64:
            self._heap = [(p.key, n) for n, p in self.entries.items() if p.key is not None]
            heapq.heapify(self._heap)

    def oldest_seen(self) -> float | None:
        """When the worker first saw the longest-waiting entry (entries are
        kept in the order they were seen)."""
        for entry in self.entries.values():
            return entry.seen
        return None

    def unkeyed(self) -> list[str]:
        return list(self._unkeyed)

    def set_key(self, name: str, key: Key, targets: tuple[str, ...] | None) -> None:
        entry = self.entries.get(name)
        if entry is None or entry.key is not None:
            return
        entry.key = key
        entry.targets = targets
        self._unkeyed.pop(name, None)
        heapq.heappush(self._heap, (key, name))

    def take(self, count: int, gate: TargetGate) -> list[str]:
        """Up to ``count`` names to claim now, best first.

        If everything queued fits in ``count``, all of it is returned except
        entries known to need a busy target (the caller sorts the batch after
        reading it).  Otherwise every entry must be keyed.  Entries whose
        targets are busy, or taken by a better entry in this batch, are passed
        over, not lost.
        """
        if count <= 0 or not self.entries:
            return []
        reserved: set[str] = set()

        def runnable(entry: Pending) -> bool:
            targets = entry.targets or ()
            if entry.key is not None and (not gate.is_free(targets) or
                                          reserved.intersection(targets)):
                return False
            reserved.update(targets)
            return True

        if len(self.entries) <= count:
            chosen = [name for name, entry in sorted(
                self.entries.items(), key=lambda item: item[1].key or (0, 0, ""))
                if runnable(entry)]
            for name in chosen:
                self.discard(name)
            return chosen
        chosen = []
        skipped: list[tuple[Key, str]] = []
        while self._heap and len(chosen) < count:
            key, name = heapq.heappop(self._heap)
            entry = self.entries.get(name)
            if entry is None or entry.key != key:
                continue  # stale heap item
            if not runnable(entry):
                skipped.append((key, name))
                continue
            chosen.append(name)
            self.discard(name)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return chosen


class TargetGate:
    """The targets of the requests running now (here), and of those another
    worker holds (a shared transport's lease failed): passed over until
    ``until``, then tried again."""

    def __init__(self) -> None:
        self.busy: set[str] = set()
        self.elsewhere: dict[str, float] = {}   # target -> monotonic retry time

    def is_free(self, targets: Iterable[str]) -> bool:
        if self.elsewhere:
            now = time.monotonic()
            for target in [t for t, until in self.elsewhere.items() if until <= now]:
                del self.elsewhere[target]
        return not any(t in self.busy or t in self.elsewhere for t in targets)

    def held_elsewhere(self, targets: Iterable[str], for_s: float) -> None:
        until = time.monotonic() + for_s
        for target in targets:
            self.elsewhere[target] = until

    def next_retry(self) -> float | None:
        """Seconds until a target held elsewhere is tried again."""
        if not self.elsewhere:
            return None
        return max(0.0, min(self.elsewhere.values()) - time.monotonic())

    def acquire(self, targets: Iterable[str]) -> None:
        self.busy.update(targets)

    def release(self, targets: Iterable[str]) -> None:
        self.busy.difference_update(targets)
