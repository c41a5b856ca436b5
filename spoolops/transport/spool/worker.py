"""The filesystem spool: the folders, the file names, and every rename between them.

This module and its answering half (``spool.answers``: the one reply,
kept-aside requests, ``settle``) are the only places that move files through
the spool, the way CPython's ``mailbox.Maildir`` owns tmp/new/cur -- with the
directory fsync that ``mailbox.py`` skips (when ``durable``); the one rename
that publishes a request is the client's (``spool.client``)::

    client:  tmp/ID.json --publish--> new/ID.json
    worker:  new/ID.json --claim--> active/ID.json (+ active/ID.json.run)
             reply: work/ID.reply (written whole, fsynced)
             --reply--> unlink active/ID.json, rename to replies/ID.json
                        (never replacing a reply the worker wrote)
    client:  reads replies/ID.json, checks owner, id and submitter, unlinks it

A claimed request never goes back to ``new/`` (members may write there, and
could swap a request whose id they saw in ``active/`` for their own): one put
back to wait for a busy target, or re-queued by recovery, stays in
``active/`` with no run record and is served from there by the next claim.
An id that is running, answered and not yet collected, or kept in
``failed/`` is refused at claim: one id, one request, one reply.

Exactly one reply: a staged ``work/ID.reply`` means the operation finished;
it is only ever renamed into ``replies/``, so recovery can tell "finished,
not yet published" (staged reply present) from "cut off" (``active/ID.json``
alone).  The staged reply is written in place, not through a rename: while
it is being written ``active/ID.json`` still exists, and recovery drops a
staged reply that does not parse, so a cut-off write is just "cut off".

Trusts: ``work/`` and ``active/`` (only the worker writes them), nothing
found in ``tmp/``, ``new/`` or ``replies/`` (group-writable), which is read
as ``files.read_untrusted`` reads (Postfix's safe_open).  The folder and
file names below appear nowhere else in spoolops; reads for the operator's
views live in ``spool.view``, maintenance in ``spool.care``, the client's
side in ``spool.client`` and its shared inotify instance in ``spool.watch``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

from ...config import Config
from ...errors import SpoolSetupError
from ...files import (
    UnsafeEntry,
    pending_events,
    read_untrusted,
    remove_quietly,
    rename_noreplace,
    write_atomic,
)
from ...formats import encode_json
from ...users import user_name, worker_uid_of
from ...workhome import lock_path
from ..base import (
    Claimed,
    Orphan,
    Quarantined,
    Refused,
    Transport,
    WorkerLock,
)
from ..worklock import FlockWorkerLock
from .answers import SpoolAnswers
from .care import SpoolCare
from .client import SpoolClientSide
from .names import (
    DIR_MODES,
    REQUEST_SUFFIX,
    RUN_SUFFIX,
    STAGED_REPLY_SUFFIX,
    STATE_FOLDERS,
    id_from_name,
)
from .view import SpoolView

log = logging.getLogger("spoolops.transport")

WATCH_FLAGS = flags.MOVED_TO | flags.CLOSE_WRITE | flags.CREATE
_UNKNOWN = object()


class _WatchingLock(FlockWorkerLock):
    """The worker lock, whose release also stops the watch of ``new/``
    (the intake lasts as long as the worker's place, as over PostgreSQL)."""

    def __init__(self, path: Path, unwatch: Callable[[], None]) -> None:
        super().__init__(path)
        self._unwatch = unwatch

    def release(self) -> None:
        self._unwatch()
        super().release()


class SpoolTransport(SpoolClientSide, SpoolAnswers, SpoolCare, SpoolView, Transport):
    """One spool tree.  Client and worker both use it; each uses its half."""

    def __init__(self, root: str | os.PathLike, durable: bool = True,
                 max_request_bytes: int = 65536, worker_user: str = "") -> None:
        self.root = Path(root)
        self.durable = durable
        self.max_request_bytes = max_request_bytes
        self.worker_user = worker_user
        self.tmp = self.root / "tmp"
        self.new = self.root / "new"
        self.active = self.root / "active"
        self.failed = self.root / "failed"
        self.replies = self.root / "replies"
        self.work = self.work_dir = self.root / "work"
        self.lock_path = lock_path(self.work)
        # plain strings for the per-request path work (pathlib costs microseconds)
        self.pending = self.root / "pending"
        self._new, self._active, self._work, self._replies, self._tmp = (
            str(self.new), str(self.active), str(self.work), str(self.replies), str(self.tmp))
        self._pending = str(self.pending)
        self._worker_uid: int | None = None
        self._inotify: INotify | None = None
        self._skipped: set[str] = set()
        # claimed, not started, waiting in active/ (put back, or re-queued by
        # recovery): served from there, never returned to new/
        self._held: set[str] = set()
        # claimed by this process and not yet answered: an entry of active/
        # with no run record that is not among them was put there by
        # 'spoolops requeue', and the next scan adopts it
        self._mine: set[str] = set()

    submit_group_folders = True
    place_heading = "dir"

    @classmethod
    def from_config(cls, config: Config) -> SpoolTransport:
        return cls(config.root, config.durable, config.max_request_bytes, config.worker_user)

    @classmethod
    def ready_line(cls, config: Config, worker_user: str, group: str) -> str:
        return f"spool ready at {config.root} (worker {worker_user}, group {group})"

    def title(self) -> str:
        return f"spool {self.root}"

    def place_of(self, state: str) -> str:
        return STATE_FOLDERS[state] + "/"

    def __repr__(self) -> str:
        return f"SpoolTransport({str(self.root)!r})"

    # -- set-up -------------------------------------------------------------------

    def check_exists(self) -> None:
        for name in DIR_MODES:
            if not (self.root / name).is_dir():
                raise SpoolSetupError(
                    f"spool folder {self.root / name} is missing: run 'spoolops init'"
                    f" (root = {self.root})")

    def worker_uid(self) -> int:
        """``[spool] worker_user``, else the owner of ``active/`` -- the folder
        itself, never what a link in its place points at: the worker account
        owns the spool's root and could put one there, and root's commands
        take this uid to drop to, and to check a pid against before they
        signal it."""
        if self._worker_uid is None:
            if self.worker_user:
                self._worker_uid = worker_uid_of(self.worker_user)
            else:
                try:
                    st = os.lstat(self.active)
                except FileNotFoundError:
                    raise SpoolSetupError(f"no spool at {self.root}: run 'spoolops init'"
                                          ) from None
                if not stat.S_ISDIR(st.st_mode):
                    raise SpoolSetupError(
                        f"{self.active} is not a folder (a link or a file in its place): the"
                        " worker user cannot be told from it; set [spool] worker_user")
                self._worker_uid = st.st_uid
        return self._worker_uid

    def submit_gid(self) -> int:
        """The submit group: the group of ``tmp/`` (``spoolops init`` sets it)."""
        return os.stat(self.tmp).st_gid

    def check_worker(self) -> list[str]:
        """The worker's process must be in the submit group: it reads requests
        through it, and answers in it."""
        gid = self.submit_gid()
        if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
            raise SpoolSetupError(
                f"this worker process (uid {os.geteuid()}, groups"
                f" {sorted({os.getegid(), *os.getgroups()})}) is not in the submit group"
                f" (gid {gid}, the group of {self.tmp}): it could neither read requests"
                " nor answer in that group.  Add the worker user to the group"
                " (usermod -aG) and start the worker with its supplementary groups"
                " (systemd User=, setpriv --init-groups, runuser)")
        if self._reply_group() is not None:
            return [(f"path={self.work} action=chgrp_each_reply hint='work/ is not setgid to"
                    " the submit group: run spoolops init to repair it'")]
        return []

    # -- the worker: intake ---------------------------------------------------------

    def lock_worker(self, wait: bool, should_stop: Callable[[], bool]) -> WorkerLock:
        lock = _WatchingLock(self.lock_path, self._unwatch)
        lock.acquire(wait=wait, should_stop=should_stop)
        return lock

    def watch(self) -> int:
        # set before the first scan, so that nothing arrives unseen in between
        self._inotify = INotify(nonblocking=True)
        self._inotify.add_watch(self.new, WATCH_FLAGS)
        return self._inotify.fileno()

    def _unwatch(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def arrivals(self) -> list[str] | None:
        assert self._inotify is not None
        names = []
        for event in pending_events(self._inotify):
            if event.mask & flags.Q_OVERFLOW:
                return None
            name = event.name
            if not name or name in self._skipped:
                continue
            if event.mask & flags.CREATE and not event.mask & flags.ISDIR:
                # a regular file created in place is taken when closed; only
                # links, FIFOs and the like need the create event
                try:
                    st = os.lstat(f"{self._new}/{name}")
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    continue
            names.append(name)
        return names

    def scan(self) -> list[str]:
        """Everything in ``new/`` but what was left there and is skipped (an
        entry that could not be moved out, with its reason in ``failed/``),
        and the requests held in ``active/`` for this process."""
        self._adopt()
        names = list(self._held)
        with os.scandir(self.new) as it:
            for entry in it:
                name = entry.name
                if name in self._skipped:
                    continue
                if entry.is_dir(follow_symlinks=False) and self._has_reason(name):
                    self._skipped.add(name)
                    continue
                if name not in self._held:
                    names.append(name)
        return names

    def _adopt(self) -> None:
        """Hold what an operator re-queued into ``active/`` (no run record,
        claimed by no one here)."""
        try:
            names = os.listdir(self._active)
        except FileNotFoundError:
            return
        present = set(names)
        for name in names:
            if name.endswith(REQUEST_SUFFIX) and name not in self._mine and \
                    name + ".run" not in present and id_from_name(name) is not None:
                self._held.add(name)
                self._mine.add(name)

    def peek(self, entry: str) -> Claimed | None:
        if entry in self._held:
            return self.read_claimed(entry)
        try:
            f = read_untrusted(f"{self._new}/{entry}", self.max_request_bytes,
                               reader="the worker")
        except FileNotFoundError:
            return None
        except (UnsafeEntry, OSError):
            return Claimed(entry, id_from_name(entry) or entry, b"", "unknown", time.time_ns())
        return Claimed(entry, id_from_name(entry) or entry, f.data, user_name(f.st.st_uid),
                       min(f.st.st_mtime_ns, time.time_ns()))

    def claim(self, entry: str) -> Claimed | Refused | Quarantined | None:
        """Rename ``new/NAME`` to ``active/NAME`` and read it once (a request
        held in ``active/`` is read from there)."""
        if entry in self._held:
            self._held.discard(entry)
            return self.read_claimed(entry)
        rid = id_from_name(entry)
        if rid is None:
            # judged by its name alone, before any rename: a hostile name such
            # as 'ID.json.run' must never be renamed over a file in active/
            return self.quarantine(entry, "Its name is not <id>.json with an id matching"
                                   " ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$, so no reply can be"
                                   " addressed", claimed=False)
        used = self._id_in_use(rid)
        if used is not None:
            return self.quarantine(entry, f"Request id {rid} is in use ({used}); a second"
                                   " request with the same id was not run", claimed=False)
        try:
            rename_noreplace(f"{self._new}/{entry}", f"{self._active}/{entry}")
        except FileNotFoundError:
            return None               # cancelled, or taken by another worker
        except FileExistsError:
            return self.quarantine(entry, f"Request id {rid} is already running; a second"
                                   " request with the same id was not run", claimed=False)
        except OSError as exc:
            # e.g. a directory owned by another user: renaming it needs write
            # access to it (for its '..'), which the worker does not have
            what = "it is a directory" if os.path.isdir(f"{self._new}/{entry}") else \
                "it could not be claimed"
            return self.quarantine(entry, f"Not a request: {what} ({exc.strerror or exc})",
                                   claimed=False)
        path = f"{self._active}/{entry}"
        self._mine.add(entry)
        try:
            # only the worker renames into active/: what the name holds cannot be swapped
            f = read_untrusted(path, self.max_request_bytes, check_name=False,
                               reader="the worker")
        except FileNotFoundError:
            return None
        except UnsafeEntry as exc:
            st = _plain_file(path)
            problem = None if st is None else _unreadable_or_oversize(
                st, exc.reason, self.max_request_bytes)
            if problem is None:
                return self.quarantine(entry, f"Not a request: {exc.reason}", claimed=True)
            # the id is trustworthy (a plain file in our active/, its owner the
            # submitter): too large or unreadable is a bad request, answered
            return Refused(entry, rid, user_name(st.st_uid), min(st.st_mtime_ns, time.time_ns()), problem)
        except OSError as exc:
            return self.quarantine(entry, f"Could not read it: {exc.strerror or exc}",
                                   claimed=True)
        return Claimed(entry, rid, f.data, user_name(f.st.st_uid), min(f.st.st_mtime_ns, time.time_ns()))

    def _id_in_use(self, rid: str) -> str | None:
        """Where else ``rid`` lives (a running one is caught by the claim's
        rename itself): its reply, published or staged, or a kept request."""
        try:
            st = os.lstat(f"{self._replies}/{rid}{REQUEST_SUFFIX}")
        except FileNotFoundError:
            pass
        else:
            # the worker's own reply; a member's plant under that name blocks nothing
            if st.st_uid == self.worker_uid() and stat.S_ISREG(st.st_mode):
                return "a reply to it waits to be collected"
        for path, what in ((f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}", "it is answered"),
                           (f"{self.failed}/{rid}{REQUEST_SUFFIX}", "it is kept in failed/")):
            if os.path.lexists(path):
                return what
        return None

    def put_back(self, rid: str, targets: tuple[str, ...] | None = None) -> None:
        """Back in line, its place (the mtime) kept -- but held in ``active/``,
        never returned to ``new/``, where a member could swap it: the next
        claim of its name in this process serves it from there, and after a
        crash it is an orphan that never started, which recovery re-queues."""
        name = rid + REQUEST_SUFFIX
        if not os.path.lexists(f"{self._active}/{name}"):
            raise FileNotFoundError(errno.ENOENT, "not claimed", f"{self._active}/{name}")
        remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
        self._held.add(name)
        self._mine.add(name)

    # -- the worker: running and answering -------------------------------------------

    def start(self, rid: str, record: dict[str, Any], durable: bool) -> None:
        """``active/ID.json.run``: who runs it since when, replaced atomically."""
        write_atomic(f"{self._work}/{rid}.run.{os.getpid()}.tmp",
                     f"{self._active}/{rid}{RUN_SUFFIX}", encode_json(record), durable,
                     mode=0o644, own_staging=True)

    def progress(self, rid: str, record: dict[str, Any]) -> None:
        self.start(rid, record, durable=False)

    # -- reads for recovery (under the worker lock) ------------------------------------

    def where(self, rid: str) -> str | None:
        name = rid + REQUEST_SUFFIX
        for state, folder in (("running", self._active), ("queued", self._new),
                              ("failed", str(self.failed))):
            if os.path.lexists(f"{folder}/{name}"):
                return state
        return None

    def orphans(self) -> list[Orphan]:
        return [Orphan(name, id_from_name(name), os.path.lexists(self.active / (
            name + ".run")), str(self.active / name)) for name in sorted(os.listdir(self.active))
            if not name.endswith(RUN_SUFFIX)]

    def read_claimed(self, entry: str) -> Claimed | None:
        try:
            f = read_untrusted(f"{self._active}/{entry}", self.max_request_bytes,
                               check_name=False, reader="the worker")
        except (UnsafeEntry, OSError):
            return None
        rid = id_from_name(entry)
        return None if rid is None else Claimed(entry, rid, f.data, user_name(f.st.st_uid),
                                                f.st.st_mtime_ns)


def _plain_file(path: str) -> os.stat_result | None:
    """The lstat of ``path`` if it is a regular file with one link."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 else None


def _unreadable_or_oversize(st: os.stat_result, reason: str, limit: int) -> str | None:
    """What is wrong with a plain request file the worker could not read."""
    if st.st_size > limit:
        return f"request is {st.st_size} bytes, more than max_request_bytes ({limit})"
    if "permission denied" in reason:
        return (f"the worker may not read the request file (mode"
                f" {stat.S_IMODE(st.st_mode):04o}, group {st.st_gid}): a request must be"
                " readable by the submit group (0640)")
    return None



