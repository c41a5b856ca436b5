"""Notes a request keeps for its own re-run after a crash.

An operation that has committed its change can note so (``ingest_upload``:
"published, with this md5"), and the worker notes which follow-up hooks have
run: a request cut off by a crash and re-run by recovery then finds its
notes, and neither repeats a hook nor mistakes its own finished work for an
error.  One small JSON file per request in ``<work>/memos/``, replaced
atomically (and fsynced when durable) at every note; removed once the
request's reply is published, and at worker start for requests that are
neither queued nor running any more.

Trusts: the worker's private folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import write_atomic
from ..formats import encode_json, valid_id
from . import MEMOS_DIR

MEMO_DIR = MEMOS_DIR


class Memo:
    """The notes of one request."""

    def __init__(self, work_dir: Path, rid: str, durable: bool, key: str = "") -> None:
        # (its path is made when first needed: every request validated gets
        # a Memo, and most never note anything)
        self._where = (work_dir, rid, key)
        self.durable = durable
        self._notes: dict[str, Any] | None = None
        self.kept = False          # a file holds notes: forget it once answered

    @property
    def path(self) -> Path:
        work_dir, rid, key = self._where
        return Path(work_dir) / MEMO_DIR / (f"{rid}~{key}.json" if key else f"{rid}.json")

    def get(self, key: str, default: Any = None) -> Any:
        return self._load().get(key, default)

    def put(self, key: str, value: Any) -> None:
        """Note ``key`` (durably, when durable) before going on."""
        notes = self._load()
        notes[key] = value
        self.kept = True
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.path.with_name(self.path.name + ".tmp"), self.path,
                     encode_json(notes), self.durable, mode=0o600, own_staging=True)

    def _load(self) -> dict[str, Any]:
        if self._notes is None:
            try:
                notes = json.loads(self.path.read_bytes())
                self.kept = True
            except (OSError, ValueError):
                notes = {}
            self._notes = notes if isinstance(notes, dict) else {}
        return self._notes


    def forget(self) -> None:
        """The request is answered: its notes are no longer needed."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def prune(work_dir: Path, pending: Callable[[str], bool]) -> int:
    """Remove the notes of requests for which ``pending(id)`` is false."""
    removed = 0
    try:
        names = os.listdir(Path(work_dir) / MEMO_DIR)
    except FileNotFoundError:
        return 0
    for name in names:
        rid = name[:-5].split("~", 1)[0] if name.endswith(".json") else None
        if rid is None or not valid_id(rid) or not pending(rid):
            try:
                os.unlink(Path(work_dir) / MEMO_DIR / name)
                removed += 1
            except FileNotFoundError:
                pass
    return removed
