"""Follow-up hooks that failed: kept, retried with backoff, until they succeed.

A follow-up hook (``spoolops.hooks``: e.g. FitsStorage's "queue this file
for re-ingest") that raises must not be forgotten: the file was changed and
the archive's database has to learn it.  The worker records the failed call
here -- op, cleaned arguments, result, targets, submitter -- before it
answers the request, and retries it later on its pool (the target locks
held, as the first call had them) with a growing delay (``BACKOFF_S``, then
hourly), across worker restarts, until the hook succeeds or an operator
gives up (``spoolops hooks drop``).  ``spoolops hooks`` lists the calls;
``status``, ``doctor`` and the metrics count them: ``pending`` (waiting for
its next try) and ``failed`` (``FAILED_AFTER`` tries or more: still retried,
hourly, and reported as a problem).

One JSON file per (request, hook) in ``<work>/hooks/``, named by the
request's id, its key (a digest of the request, as its memo) and a digest of
the hook's name; replaced atomically at every try (fsynced when durable).

Trusts: the worker's private folder, written only by the worker user; read
as hostile all the same (root's ``doctor`` reads it: no link is followed).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import UnsafeEntry, read_untrusted, write_atomic
from .formats import encode_json, utc_iso
from .workhome import HOOKS_DIR

LEDGER_DIR = HOOKS_DIR
# seconds before the 1st, 2nd, ... retry; then the last one, for ever
BACKOFF_S = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
FAILED_AFTER = 5       # tries that failed before a call counts as "failed"
MAX_CALL_BYTES = 16 * 1024 * 1024


@dataclass
class HookCall:
    """One hook call that has not succeeded yet."""

    id: str
    key: str
    hook: str
    op: str
    args: dict[str, Any]
    result: dict[str, Any]
    user: str
    targets: list[str] = field(default_factory=list)
    tries: int = 1
    first_failed: str = ""
    last_error: str = ""
    next_at: float = 0.0
    marker: str | None = None      # the request's pending mark (its batch waits)

    @property
    def state(self) -> str:
        return "failed" if self.tries >= FAILED_AFTER else "pending"

    def view(self) -> dict[str, Any]:
        """What ``spoolops hooks --json`` prints for it."""
        return {"id": self.id, "hook": self.hook, "op": self.op, "state": self.state,
                "tries": self.tries, "first_failed": self.first_failed,
                "last_error": self.last_error, "next_try": utc_iso(self.next_at),
                "targets": self.targets}


def delay_after(tries: int) -> float:
    return BACKOFF_S[min(tries, len(BACKOFF_S)) - 1]


class HookLedger:
    """The failed hook calls of one worker home (``work/``)."""

    def __init__(self, work_dir: str | os.PathLike, durable: bool = True,
                 cached: bool = False) -> None:
        """``cached`` (the worker): the calls are read once and then kept in
        memory with every change this process makes -- thousands may be kept
        while the archive's database is down, and the worker looks at them
        after every retry; ``reload()`` when another process changed them
        (``spoolops hooks retry``/``drop``)."""
        self.dir = Path(work_dir) / LEDGER_DIR
        self.durable = durable
        self._cache: dict[str, HookCall] | None = {} if cached else None
        self._loaded = False
        self._lock = threading.Lock()   # pool threads keep and retry calls

    def _path(self, rid: str, key: str, hook: str) -> Path:
        digest = hashlib.sha256(hook.encode()).hexdigest()[:12]
        return self.dir / f"{rid}~{key}~{digest}.json"

    def record(self, call: HookCall, error: str, now: float | None = None) -> HookCall:
        """A first failure: keep the call for a retry after the first delay."""
        now = time.time() if now is None else now
        call.first_failed = call.first_failed or utc_iso(now)
        call.last_error, call.next_at = error, now + delay_after(call.tries)
        self._save(call)
        return call

    def failed_again(self, call: HookCall, error: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        call.tries += 1
        call.last_error, call.next_at = error, now + delay_after(call.tries)
        self._save(call)

    def succeeded(self, call: HookCall) -> None:
        path = self._path(call.id, call.key, call.hook)
        self._remove(path)
        if self._cache is not None:
            with self._lock:
                self._cache.pop(path.name, None)

    def reload(self) -> None:
        self._loaded = False

    def _save(self, call: HookCall) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        path = self._path(call.id, call.key, call.hook)
        write_atomic(path.with_name(path.name + ".tmp"), path, encode_json(asdict(call)),
                     self.durable, mode=0o600, own_staging=True)
        if self._cache is not None:
            with self._lock:
                self._cache[path.name] = call

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def calls(self) -> list[HookCall]:
        """Every kept call, oldest first; unreadable files are skipped."""
        if self._cache is not None:
            with self._lock:
                if not self._loaded:
                    self._cache = {self._path(c.id, c.key, c.hook).name: c
                                   for c in self._read()}
                    self._loaded = True
                kept = list(self._cache.values())
            return sorted(kept, key=lambda c: (c.first_failed, c.id, c.hook))
        return self._read()

    def _read(self) -> list[HookCall]:
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                # as a hostile file, checked field by field: a crafted entry
                # must not stop the worker's retries or an operator's status
                data = read_untrusted(self.dir / name, MAX_CALL_BYTES, check_name=False,
                                      limit_name="a kept hook call's size").data
                call = HookCall(**json.loads(data))
            except (UnsafeEntry, OSError, ValueError, TypeError, RecursionError):
                continue
            if _well_formed(call):
                found.append(call)
        return sorted(found, key=lambda c: (c.first_failed, c.id, c.hook))

    def due(self, now: float | None = None) -> list[HookCall]:
        now = time.time() if now is None else now
        return [call for call in self.calls() if call.next_at <= now]

    def pending_for(self, rid: str) -> bool:
        return any(call.id == rid for call in self.calls())

    def next_due_in(self, now: float | None = None) -> float | None:
        now = time.time() if now is None else now
        calls = self.calls()
        return None if not calls else max(0.0, min(c.next_at for c in calls) - now)

    def counts(self) -> dict[str, int]:
        counts = {"pending": 0, "failed": 0}
        for call in self.calls():
            counts[call.state] += 1
        return counts

    def retry_now(self, rid: str | None = None) -> int:
        """Operators: try these calls (every one when ``rid`` is None) at once."""
        touched = 0
        for call in self.calls():
            if rid is None or call.id == rid:
                call.next_at = 0.0
                self._save(call)
                touched += 1
        return touched

    def drop(self, rid: str) -> int:
        """Operators give up on the hook calls of request ``rid``."""
        dropped = 0
        for call in self.calls():
            if call.id == rid:
                self.succeeded(call)
                dropped += 1
        return dropped


def _well_formed(call: HookCall) -> bool:
    texts = (call.id, call.key, call.hook, call.op, call.user, call.first_failed,
             call.last_error)
    return (all(isinstance(t, str) for t in texts) and isinstance(call.args, dict)
            and isinstance(call.result, dict) and isinstance(call.targets, list)
            and all(isinstance(t, str) for t in call.targets)
            and isinstance(call.tries, int) and not isinstance(call.tries, bool)
            and isinstance(call.next_at, (int, float)) and not isinstance(call.next_at, bool)
            and (call.marker is None or isinstance(call.marker, str)))
