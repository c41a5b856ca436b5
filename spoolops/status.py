"""What the spool holds: counts, ages, the worker, problems; one request's story.

Read-only.  Used by ``spoolops status``, ``show``, ``ls`` and the metrics.
Trusts nothing it reads enough to act on it; parses request and reply files
only to display them.  Folders it may not read (``new/`` is not listable by
group members) are reported as unknown, with a problem saying why.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config
from .dispatch import user_name
from .lock import worker_alive
from .spool import (
    REASON_SUFFIX,
    REQUEST_SUFFIX,
    RUN_SUFFIX,
    STAGED_REPLY_SUFFIX,
    Spool,
    id_from_name,
    reason_file_name,
    utc_iso,
)
from .stats import fresh_stats, load_stats

STATES = ("queued", "running", "failed", "replies")
STATE_DIRS = {"queued": "new", "running": "active", "failed": "failed", "replies": "replies"}


@dataclass
class Entry:
    """One request file in one state folder."""

    state: str
    name: str
    id: str | None
    path: Path
    mtime: float


def list_entries(spool: Spool, state: str) -> list[Entry]:
    """Entries of a state folder, oldest first.  Raises PermissionError."""
    directory = spool.root / STATE_DIRS[state]
    entries = []
    with os.scandir(directory) as it:
        for de in it:
            name = de.name
            if state == "running" and name.endswith(RUN_SUFFIX):
                continue
            if state == "failed":
                if not name.endswith(REASON_SUFFIX):
                    continue  # count failures by their reason files
                name = name[: -len(REASON_SUFFIX)]
            try:
                mtime = de.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            entries.append(Entry(state, name, id_from_name(name), directory / name, mtime))
    entries.sort(key=lambda e: (e.mtime, e.name))
    return entries


def spool_status(config: Config, clock: Callable[[], float] = time.time,
                 refresh: bool = False) -> dict[str, Any]:
    """The ``status --json`` object of the design, plus a few extras.
    ``refresh``: ask the running worker for its counters as of now."""
    spool = Spool(config.root)
    now = clock()
    result: dict[str, Any] = {"root": str(config.root)}
    problems: list[str] = []
    unreadable = []
    for state in STATES:
        try:
            entries = list_entries(spool, state)
        except FileNotFoundError:
            problems.append(f"{spool.root / STATE_DIRS[state]} is missing: run 'spoolops init'")
            result[state] = {"count": None, "oldest_age_s": None}
            continue
        except PermissionError:
            unreadable.append(STATE_DIRS[state] + "/")
            result[state] = {"count": None, "oldest_age_s": None}
            continue
        oldest = round(max(0.0, now - entries[0].mtime), 3) if entries else None
        result[state] = {"count": len(entries), "oldest_age_s": oldest}
        if state == "queued":
            stuck = [e for e in entries if now - e.mtime > config.stuck_after]
            if stuck:
                problems.append(f"{len(stuck)} request(s) queued longer than stuck_after"
                                f" ({config.stuck_after:g} s); oldest {stuck[0].name}")
    alive, pid = worker_alive(spool.lock_path)
    result["worker"] = {"pid": pid, "alive": bool(alive)}
    stats = None
    if alive:
        stats = fresh_stats(spool.work, pid) if refresh and pid else load_stats(spool.work)
    if stats is not None:
        result["worker"]["uptime_s"] = round(max(0.0, now - stats.get("started_ts", now)), 1)
        result["worker"]["served"] = stats.get("served")
    if alive is None:
        problems.append(f"cannot tell whether a worker runs: {spool.lock_path} is not"
                        " readable (run as root or the worker user)")
    elif not alive:
        problems.append("no worker holds the lock (start 'spoolops worker' or its service)")
        running = result["running"]["count"]
        if running:
            problems.append(f"{running} orphan(s) in active/ with no worker: they are"
                            " recovered when a worker starts")
    if unreadable:
        problems.append(f"cannot list {', '.join(unreadable)} as this user (run as root or"
                        " the worker user)")
    result["problems"] = problems
    return result


def describe_entry(spool: Spool, entry: Entry, now: float) -> dict[str, Any]:
    """One line of ``spoolops ls``: id, op, submitter, age, priority, target."""
    row: dict[str, Any] = {"state": entry.state, "id": entry.id or entry.name, "op": None,
                           "user": None, "age_s": round(max(0.0, now - entry.mtime), 3),
                           "priority": None, "target": None}
    request = _read_json(entry.path) if entry.state != "replies" else None
    if entry.state == "replies":
        reply = _read_json(entry.path)
        if isinstance(reply, dict):
            row.update(op=reply.get("op"), user=reply.get("submitted_by"),
                       outcome="ok" if reply.get("ok") else (reply.get("error") or {}).get("type"))
    elif isinstance(request, dict):
        args = request.get("args") if isinstance(request.get("args"), dict) else {}
        row.update(op=request.get("op"), priority=request.get("priority", 0),
                   target=args.get("filename"))
    try:
        row["user"] = row["user"] or _owner(entry.path)
    except OSError:
        pass
    if entry.state == "running" and entry.id:
        run = _read_json(spool.active / (entry.id + RUN_SUFFIX))
        if isinstance(run, dict):
            row["target"] = ",".join(run.get("targets") or []) or row["target"]
            row["pid"] = run.get("pid")
    if entry.state == "failed":
        try:
            row["reason"] = (spool.failed / reason_file_name(entry.name)).read_text(
                errors="replace").strip()
        except OSError:
            row["reason"] = None
    return row


def _owner(path: Path) -> str:
    return user_name(os.lstat(path).st_uid)


def _read_json(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace")


def find_ids(spool: Spool, prefix: str) -> list[str]:
    """Request ids (or entry names) in any state that start with ``prefix``."""
    found: set[str] = set()
    for directory in (spool.new, spool.active, spool.failed, spool.replies, spool.work):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if not name.startswith(prefix):
                continue
            for suffix in (RUN_SUFFIX, REASON_SUFFIX, STAGED_REPLY_SUFFIX, REQUEST_SUFFIX):
                if name.endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            else:
                if directory != spool.failed:
                    continue
            found.add(name)
    # an exact match wins over longer ids sharing the prefix
    return [prefix] if prefix in found else sorted(found)


def describe_request(spool: Spool, rid: str) -> dict[str, Any] | None:
    """Where ``rid`` is and what it says; None if it is nowhere."""
    name = rid + REQUEST_SUFFIX
    where = [("queued", spool.new / name), ("running", spool.active / name),
             ("failed", spool.failed / name), ("done", spool.replies / name),
             ("finishing", spool.work / (rid + STAGED_REPLY_SUFFIX))]
    info: dict[str, Any] = {"id": rid, "state": None}
    for state, path in where:
        if os.path.lexists(path):
            info["state"] = state
            info["path"] = str(path)
            info["since"] = _mtime_iso(path)
            break
    reason_path = spool.failed / reason_file_name(name)
    if info["state"] is None and os.path.lexists(spool.failed / reason_file_name(rid)):
        reason_path = spool.failed / reason_file_name(rid)  # a non-request entry
        info["state"] = "failed"
    if info["state"] is None:
        return None
    try:
        info["owner"] = _owner(Path(info["path"])) if "path" in info else None
    except OSError:
        info["owner"] = None
    if info["state"] in ("queued", "running", "failed"):
        info["request"] = _read_json(spool.root / STATE_DIRS.get(info["state"], "failed") / name)
    if info["state"] == "running":
        info["run"] = _read_json(spool.active / (rid + RUN_SUFFIX))
    if os.path.lexists(spool.replies / name):
        info["reply"] = _read_json(spool.replies / name)
    if info["state"] == "finishing":
        info["reply"] = _read_json(spool.work / (rid + STAGED_REPLY_SUFFIX))
    if info["state"] == "failed":
        try:
            info["reason"] = reason_path.read_text(errors="replace").strip()
        except OSError:
            info["reason"] = None
    return info


def _mtime_iso(path: Path) -> str | None:
    try:
        return utc_iso(os.lstat(path).st_mtime)
    except OSError:
        return None
