"""Following the spool live: one event per state change, from inotify.

Used by ``spoolops tail``.  Watches ``new/``, ``active/``, ``failed/``,
``replies/`` and ``tmp/`` and turns raw inotify events into request events:
queued, started (the run file appeared), finished (the reply was published,
with its outcome and duration), failed (a reason was written), and removals
(a reply collected, or anything the janitor deleted).

Read-only.  Trusts nothing it reads: files are parsed only to describe them
and may vanish or be junk.  Needs read access to the folders (root or the
worker user: group members cannot list ``new/``).
"""

from __future__ import annotations

import json
import select
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

from .spool import (
    REASON_SUFFIX,
    REQUEST_SUFFIX,
    RUN_SUFFIX,
    Spool,
    id_from_name,
    parse_iso,
    utc_iso,
)

_WATCHED = {"new": flags.MOVED_TO | flags.CLOSE_WRITE | flags.DELETE,
            "active": flags.MOVED_TO,
            "failed": flags.MOVED_TO | flags.DELETE,
            "replies": flags.MOVED_TO | flags.DELETE,
            "tmp": flags.DELETE}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _describe(folder: str, name: str, mask: int, spool: Spool) -> dict[str, Any] | None:
    path = spool.root / folder / name
    event: dict[str, Any] = {"time": utc_iso()}
    if mask & flags.DELETE:
        if folder == "replies" and id_from_name(name):
            return dict(event, event="removed", id=id_from_name(name),
                        where="replies/", note="collected by its client or removed by the janitor")
        if folder == "new":
            return dict(event, event="removed", id=id_from_name(name) or name, where="new/",
                        note="withdrawn (cancelled)")
        return dict(event, event="removed", id=name, where=f"{folder}/", note="janitor")
    if folder == "new" and not name.startswith("."):
        request = _load(path) or {}
        return dict(event, event="queued", id=id_from_name(name) or name,
                    op=request.get("op"), priority=request.get("priority", 0))
    if folder == "active" and name.endswith(RUN_SUFFIX):
        run = _load(path) or {}
        if run.get("progress"):
            return None  # progress rewrites are not new events
        return dict(event, event="started", id=name[: -len(RUN_SUFFIX)], op=run.get("op"),
                    pid=run.get("pid"), user=run.get("user"),
                    target=",".join(run.get("targets") or []) or None)
    if folder == "replies" and name.endswith(REQUEST_SUFFIX):
        reply = _load(path)
        if reply is None:  # collected before it could be read
            return dict(event, event="finished", id=id_from_name(name), ok=None,
                        note="collected by its client before tail could read it")
        duration = None
        try:
            duration = round(parse_iso(reply["finished_at"]) - parse_iso(reply["started_at"]), 3)
        except (KeyError, TypeError, ValueError):
            pass
        error = reply.get("error") or {}
        return dict(event, event="finished", id=reply.get("id") or id_from_name(name),
                    op=reply.get("op"), ok=bool(reply.get("ok")), error=error.get("type"),
                    message=error.get("message"), duration_s=duration)
    if folder == "failed" and name.endswith(REASON_SUFFIX):
        try:
            reason = path.read_text(errors="replace").strip()
        except OSError:
            reason = None
        return dict(event, event="failed", id=name[: -len(REASON_SUFFIX)], reason=reason)
    return None


def follow_spool(spool: Spool, should_stop: Callable[[], bool] = lambda: False,
                 poll_s: float = 0.5) -> Iterator[dict[str, Any]]:
    """Yield request events until ``should_stop()`` is true."""
    inotify = INotify()
    folders: dict[int, str] = {}
    try:
        for folder, mask in _WATCHED.items():
            folders[inotify.add_watch(spool.root / folder, mask)] = folder
        while not should_stop():
            ready, _, _ = select.select([inotify.fileno()], [], [], poll_s)
            if not ready:
                continue
            for ev in inotify.read(timeout=0):
                if ev.mask & flags.Q_OVERFLOW:
                    yield {"time": utc_iso(), "event": "overflow",
                           "note": "events were lost; run 'spoolops status'"}
                    continue
                folder = folders.get(ev.wd)
                if folder is None or not ev.name:
                    continue
                described = _describe(folder, ev.name, ev.mask, spool)
                if described is not None:
                    yield described
    finally:
        inotify.close()


