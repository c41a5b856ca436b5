"""The spool as operators read it: counts, listings, one request's story, events.

Read-only, used by ``spoolops status``, ``ls``, ``show`` and ``tail``
through the transport interface -- often by root, who switches to the
worker user first (``cli.common.operator_config_of``).  Trusts nothing it
reads: members write ``new/`` and ``replies/`` (and what they rename into
``new/`` the worker moves to ``failed/`` under its own name), so every file
is read as ``files.read_untrusted`` reads (never through a link, never a
FIFO or device, at most ``MAX_VIEW_BYTES``) and parsed only to describe it;
what is not a plain file, or is too large, is shown as such, unread.  Files
may also vanish or be junk.  Folders this reader may not list (``new/`` and
``tmp/`` are not listable by group members) raise ``PermissionError`` for
the caller to report.  A mixin of ``SpoolTransport`` (its folders and names).
"""

from __future__ import annotations

import json
import os
import select
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

from ...files import UnsafeEntry, read_untrusted
from ...formats import parse_iso, utc_iso, valid_id
from ...users import user_name
from ..base import Entry, StateCount
from .names import (
    REASON_SUFFIX,
    REQUEST_SUFFIX,
    RUN_SUFFIX,
    STAGED_REPLY_SUFFIX,
    STATE_FOLDERS,
    WITHDRAWN_SUFFIX,
    id_from_name,
    reason_file_name,
)

# the largest file a view reads: a reply's limit (names.MAX_REPLY_BYTES), above
# every request's (max_request_bytes), run record's and reason's size
MAX_VIEW_BYTES = 16 * 1024 * 1024
_UNREAD = "<not read: {}>"

_WATCHED = {"new": flags.MOVED_TO | flags.CLOSE_WRITE | flags.DELETE,
            "active": flags.MOVED_TO,
            "failed": flags.MOVED_TO | flags.DELETE,
            "replies": flags.MOVED_TO | flags.DELETE,
            "tmp": flags.DELETE}
# suffixes of the files that belong to a request: run record, reason, staged reply
_SUFFIXES = (RUN_SUFFIX, REASON_SUFFIX, STAGED_REPLY_SUFFIX, REQUEST_SUFFIX)
_name_id = id_from_name


def _withdrawn_id(name: str) -> str | None:
    """The id of a cancelled request's ``tmp/ID.<random>.withdrawn``."""
    if not name.endswith(WITHDRAWN_SUFFIX):
        return None
    rid, _, token = name[: -len(WITHDRAWN_SUFFIX)].rpartition(".")
    return rid if valid_id(rid) and len(token) == 16 else None


def _read(path: Path | str) -> tuple[bytes | None, str | None]:
    """(bytes, None) of a plain file; (None, why) for what is not read (a
    link, a FIFO, a device, too large, not readable by this user); (None,
    None) if it is gone."""
    try:
        return read_untrusted(path, MAX_VIEW_BYTES, reader=f"uid {os.geteuid()}",
                              limit_name="what spoolops shows").data, None
    except UnsafeEntry as exc:
        return None, exc.reason
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"it cannot be read ({exc.strerror or exc})"


def _parse(data: bytes) -> Any:
    """Parsed JSON; the text if it is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return data.decode("utf-8", "replace")


def _shown(data: bytes | None, why: str | None, text: bool = False) -> Any:
    """What a view shows of a file ``_read`` gave: parsed JSON (the text if
    it is not JSON, or if ``text``); a line saying why it was not read; None
    if it is gone."""
    if why is not None:
        return _UNREAD.format(why)
    if data is None:
        return None
    return data.decode("utf-8", "replace").strip() if text else _parse(data)


def _load(path: Path | str, text: bool = False) -> Any:
    """``_shown`` of the file at ``path`` (``text``: a reason file)."""
    return _shown(*_read(path), text=text)


def _owner(path: Path) -> str | None:
    try:
        return user_name(os.lstat(path).st_uid)
    except OSError:
        return None


def _mtime_iso(path: Path) -> str | None:
    try:
        return utc_iso(os.lstat(path).st_mtime)
    except OSError:
        return None


class SpoolView:
    """Reads for the operator's views (mixed into ``SpoolTransport``)."""

    root: Path
    new: Path
    active: Path
    failed: Path
    replies: Path
    work: Path
    tmp: Path

    def _folder(self, state: str) -> Path:
        return self.root / STATE_FOLDERS[state]

    def _listing(self, state: str) -> list[tuple[str, Path, float]]:
        """(name, path, mtime) of one state, oldest first; PermissionError."""
        folder = self._folder(state)
        found = []
        with os.scandir(folder) as it:
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
                found.append((name, folder / name, mtime))
        found.sort(key=lambda item: (item[2], item[0]))
        return found

    def counts(self, now: float) -> dict[str, StateCount]:
        out = {}
        for state, folder in STATE_FOLDERS.items():
            try:
                listing = self._listing(state)
            except FileNotFoundError:
                out[state] = StateCount(None, where=str(self._folder(state)),
                                        problem="missing")
                continue
            except PermissionError:
                out[state] = StateCount(None, where=f"{folder}/", problem="unreadable")
                continue
            oldest = round(max(0.0, now - listing[0][2]), 3) if listing else None
            out[state] = StateCount(len(listing), oldest, where=f"{folder}/")
        return out

    def entries(self, state: str) -> list[Entry]:
        """One line of ``spoolops ls`` per entry: op, submitter, priority, target."""
        rows = []
        for name, path, mtime in self._listing(state):
            rid = _name_id(name)
            fields: dict[str, Any] = {"op": None, "user": None, "priority": None,
                                      "target": None}
            data, why = _read(path)
            body = None if data is None else _parse(data)
            if why is not None:
                fields["unread"] = why
            if state == "replies":
                if isinstance(body, dict):
                    error = body.get("error") or {}
                    fields.update(op=body.get("op"), user=body.get("submitted_by"),
                                  outcome="ok" if body.get("ok") else error.get("type"))
            elif isinstance(body, dict):
                args = body.get("args") if isinstance(body.get("args"), dict) else {}
                fields.update(op=body.get("op"), priority=body.get("priority", 0),
                              target=args.get("filename"))
            fields["user"] = fields["user"] or _owner(path)
            if state == "running" and rid:
                run = _load(self.active / (rid + RUN_SUFFIX))
                if isinstance(run, dict):
                    fields["target"] = ",".join(run.get("targets") or []) or fields["target"]
                    fields["pid"] = run.get("pid")
            if state == "failed":
                fields["reason"] = _load(self.failed / reason_file_name(name), text=True)
            rows.append(Entry(state, name, rid, mtime, fields))
        return rows

    def find(self, prefix: str) -> list[str]:
        found: set[str] = set()
        for directory in (self.new, self.active, self.failed, self.replies, self.work):
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if not name.startswith(prefix):
                    continue
                # ID.json.reason, ID.json.run: every suffix goes, to the id
                stripped = name
                while (suffix := next((x for x in _SUFFIXES if stripped.endswith(x)), None)):
                    stripped = stripped[: -len(suffix)]
                if stripped == name and directory != self.failed:
                    continue
                found.add(stripped)
        # an exact match wins over longer ids sharing the prefix
        return [prefix] if prefix in found else sorted(found)

    def describe(self, rid: str) -> dict[str, Any] | None:
        name = rid + REQUEST_SUFFIX
        where = [("queued", self.new / name), ("running", self.active / name),
                 ("failed", self.failed / name), ("done", self.replies / name),
                 ("finishing", self.work / (rid + STAGED_REPLY_SUFFIX))]
        info: dict[str, Any] = {"id": rid, "state": None}
        for state, path in where:
            if os.path.lexists(path):
                info.update(state=state, path=str(path), since=_mtime_iso(path))
                break
        reason_path = self.failed / reason_file_name(name)
        if info["state"] is None and os.path.lexists(self.failed / reason_file_name(rid)):
            reason_path = self.failed / reason_file_name(rid)   # an entry that was no request
            info["state"] = "failed"
        if info["state"] is None:
            return None
        info["owner"] = _owner(Path(info["path"])) if "path" in info else None
        unread: dict[str, str] = {}

        def load(label: str, path: Path, text: bool = False) -> Any:
            data, why = _read(path)
            if why is not None:
                unread[label] = why   # said apart too, for whoever reads --json
            return _shown(data, why, text)

        if info["state"] in ("queued", "running", "failed"):
            folder = {"queued": self.new, "running": self.active}.get(info["state"],
                                                                      self.failed)
            info["request"] = load("request", folder / name)
        if info["state"] == "running":
            info["run"] = load("run", self.active / (rid + RUN_SUFFIX))
        if os.path.lexists(self.replies / name):
            info["reply"] = load("reply", self.replies / name)
        if info["state"] == "finishing":
            info["reply"] = load("reply", self.work / (rid + STAGED_REPLY_SUFFIX))
        if info["state"] == "failed":
            info["reason"] = load("reason", reason_path, text=True)
        if unread:
            info["unread"] = unread
        return info

    def follow(self, should_stop: Callable[[], bool], poll_s: float = 0.5
               ) -> Iterator[dict[str, Any]]:
        """inotify on new/, active/, failed/, replies/ and tmp/, as request events."""
        inotify = INotify()
        folders: dict[int, str] = {}
        try:
            for folder, mask in _WATCHED.items():
                # DONT_FOLLOW: a folder swapped for a link is not watched through it
                folders[inotify.add_watch(self.root / folder,
                                          mask | flags.DONT_FOLLOW)] = folder
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
                    described = self._event(folder, ev.name, ev.mask)
                    if described is not None:
                        yield described
        finally:
            inotify.close()

    def _event(self, folder: str, name: str, mask: int) -> dict[str, Any] | None:
        path = self.root / folder / name
        event: dict[str, Any] = {"time": utc_iso()}
        if mask & flags.DELETE:
            if folder == "replies" and _name_id(name):
                return dict(event, event="removed", id=_name_id(name), where="replies/",
                            note="collected by its client or removed by the janitor")
            if folder == "new":
                return dict(event, event="removed", id=_name_id(name) or name, where="new/",
                            note="withdrawn (cancelled)")
            withdrawn = _withdrawn_id(name) if folder == "tmp" else None
            if withdrawn is not None:
                # a cancel moves new/ID.json aside (tmp/ID.<random>.withdrawn),
                # then removes it: the request left new/ withdrawn
                return dict(event, event="removed", id=withdrawn, where="new/",
                            note="withdrawn (cancelled)")
            return dict(event, event="removed", id=name, where=f"{folder}/", note="janitor")
        if folder == "new" and not name.startswith("."):
            request = _load(path)
            if request is None:
                # claimed before tail could read it: it is running now
                request = _load(self.root / "active" / name)
            request = request if isinstance(request, dict) else {}
            return dict(event, event="queued", id=_name_id(name) or name,
                        op=request.get("op"), priority=request.get("priority", 0))
        if folder == "active" and name.endswith(RUN_SUFFIX):
            run = _load(path)
            run = run if isinstance(run, dict) else {}
            if run.get("progress"):
                return None  # progress rewrites are not new events
            return dict(event, event="started", id=name[: -len(RUN_SUFFIX)],
                        op=run.get("op"), pid=run.get("pid"), user=run.get("user"),
                        target=",".join(run.get("targets") or []) or None)
        if folder == "replies" and name.endswith(REQUEST_SUFFIX):
            data, why = _read(path)
            reply = None if data is None else _parse(data)
            if not isinstance(reply, dict):
                if why is not None:
                    note = f"not read: {why}"
                elif data is None:
                    note = "collected by its client before tail could read it"
                else:
                    note = "not a JSON object"
                return dict(event, event="finished", id=_name_id(name), ok=None, note=note)
            duration = None
            try:
                duration = round(parse_iso(reply["finished_at"]) -
                                 parse_iso(reply["started_at"]), 3)
            except (KeyError, TypeError, ValueError):
                pass
            error = reply.get("error") or {}
            return dict(event, event="finished", id=reply.get("id") or _name_id(name),
                        op=reply.get("op"), ok=bool(reply.get("ok")), error=error.get("type"),
                        message=error.get("message"), duration_s=duration)
        if folder == "failed" and name.endswith(REASON_SUFFIX):
            return dict(event, event="failed", id=name[: -len(REASON_SUFFIX)],
                        reason=_load(path, text=True))
        return None

