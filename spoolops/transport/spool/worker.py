"""The filesystem spool: the folders, the file names, and every rename between them.

This module is the only place that moves files through the spool, the way
CPython's ``mailbox.Maildir`` owns tmp/new/cur -- with the directory fsync
that ``mailbox.py`` skips (when ``durable``)::

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
shared inotify instance in ``spool.watch``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
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
    fsync_dir,
    pending_events,
    read_untrusted,
    rename_noreplace,
    write_atomic,
    write_new_file,
)
from ...formats import encode_json, utc_iso, valid_id
from ...users import user_name, worker_uid_of
from ...workhome import lock_path
from ..base import (
    Batch,
    Claimed,
    Orphan,
    Quarantined,
    Refused,
    StagedAnswers,
    Transport,
    WorkerLock,
)
from ..worklock import FlockWorkerLock
from .care import SpoolCare
from .client import SpoolClientSide
from .names import (
    DIR_MODES,
    REQUEST_SUFFIX,
    RUN_SUFFIX,
    STAGED_REPLY_SUFFIX,
    STATE_FOLDERS,
    id_from_name,
    reason_file_name,
)
from .view import SpoolView

log = logging.getLogger("spoolops.transport")

MAX_REPLY_BYTES = 16 * 1024 * 1024
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


class SpoolTransport(SpoolClientSide, SpoolCare, SpoolView, Transport, StagedAnswers):
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
        self._reply_gid: Any = _UNKNOWN
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
        """``[spool] worker_user``, else the owner of ``active/``."""
        if self._worker_uid is None:
            if self.worker_user:
                self._worker_uid = worker_uid_of(self.worker_user)
            else:
                try:
                    self._worker_uid = os.stat(self.active).st_uid
                except FileNotFoundError:
                    raise SpoolSetupError(f"no spool at {self.root}: run 'spoolops init'"
                                          ) from None
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
        _remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
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

    def reply(self, rid: str, reply: dict[str, Any], started: bool = True, *,
              deliver: bool = True, batch: Batch | None = None) -> None:
        if not deliver:
            self._retire(rid, started)
        elif self._answered_already(rid):
            # a retry after a failure past the publishing rename (an fsync's
            # error): the answer is out, maybe collected -- never a second one
            log.warning("event=reply_dropped id=%s note=%r", rid, "its request left active/"
                        " and no staged reply waits: it was answered already")
        else:
            self._stage_reply(rid, reply)
            self._publish_staged(rid, started)
        self._mine.discard(rid + REQUEST_SUFFIX)     # after it left active/
        # after the answer, off the waiting client's path: the batch's hooks
        # ran already (or are kept: then the mark stays, held); a mark a crash
        # leaves behind names no request, and the janitor removes it
        if batch is not None:
            if batch.held:
                self.hold_mark(batch.marker)
            else:
                self.release_mark(batch.marker)

    def _answered_already(self, rid: str) -> bool:
        """Neither the claimed request nor a staged reply is there: whatever
        answered it (this worker, before a failure it is retrying past)
        published its one reply.  (Recovery's answer to a request that is
        gone comes with the staged reply it replaces.)"""
        return not os.path.lexists(f"{self._active}/{rid}{REQUEST_SUFFIX}") and \
            not os.path.lexists(f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}")

    def release_batch(self, rid: str, batch: Batch) -> None:
        self.release_mark(batch.marker)

    def _retire(self, rid: str, started: bool) -> None:
        """A request that wants no reply is done: it leaves ``active/``, and
        nothing else is left of it (a crash before this re-runs it, as any)."""
        if started:
            _remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
        _remove_quietly(f"{self._active}/{rid}{REQUEST_SUFFIX}")
        if self.durable:
            fsync_dir(self._active)

    def _stage_reply(self, rid: str, reply: dict[str, Any], in_place: bool = True) -> None:
        """Write the finished reply to ``work/ID.reply``: from here on the
        request counts as done, even if the worker dies before publishing.

        Written in place (see the module docstring for why that is safe) by
        the worker while ``active/ID.json`` exists.  A staged reply already
        there, and every caller that may run beside a worker or after its
        request left ``active/`` (``in_place=False``: recovery, ``spoolops
        cancel``), go through a temporary file and a rename: a whole staged
        reply is never removed or cut."""
        path = f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}"
        data = encode_json(reply)
        gid = self._reply_group()
        if in_place:
            try:
                write_new_file(path, data, self.durable, gid=gid)
                return
            except FileExistsError:
                pass
        write_atomic(f"{path}.tmp", path, data, self.durable, own_staging=True, gid=gid)

    def _reply_group(self) -> int | None:
        """The group a staged reply must be given explicitly, or None when
        files made in ``work/`` get the submit group anyway (``work/`` is
        setgid to it, or it is this process's own group).  Replies keep
        their group when renamed into ``replies/``, and clients read them
        through it: a worker whose primary group is its own would otherwise
        answer in a group no client is in."""
        if self._reply_gid is _UNKNOWN:
            work, replies = os.stat(self._work), os.stat(self._replies)
            if (work.st_mode & stat.S_ISGID and work.st_gid == replies.st_gid) or \
                    (not work.st_mode & stat.S_ISGID and os.getegid() == replies.st_gid):
                self._reply_gid = None
            else:
                self._reply_gid = replies.st_gid
        return self._reply_gid

    def _publish_staged(self, rid: str, started: bool = True) -> None:
        """Retire ``active/ID.json`` (and its run file, if the op had one) and
        rename the staged reply into ``replies/``.

        The request is removed first so that a crash in between leaves a
        staged reply and no orphan (recovery publishes it): never two replies.
        With ``durable``, one fsync of ``replies/`` commits the lot on a
        journalling filesystem (ext4, xfs: metadata is journalled in order).
        """
        if started:
            _remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
        _remove_quietly(f"{self._active}/{rid}{REQUEST_SUFFIX}")
        self._publish_noreplace(rid, f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}")

    def _publish_noreplace(self, rid: str, staged: str) -> None:
        """Rename ``staged`` to ``replies/ID.json`` without replacing a reply
        the worker wrote.  Something else under that name (a member's plant)
        is removed first; a trusted reply already there means this is a second
        request with an answered id: its reply is kept in ``failed/`` with a
        reason, and the first one stays the one the client reads."""
        published = f"{self._replies}/{rid}{REQUEST_SUFFIX}"
        for _attempt in range(8):
            try:
                rename_noreplace(staged, published)
                break
            except FileExistsError:
                if self.collect(rid, remove=False, reader="the worker", quiet=True) is None:
                    self._clear_plant(published)   # not the worker's: a member's plant
                    continue
                name = f"{rid}.reply"
                kept_as = self._rename_into_failed(Path(staged).parent, Path(staged).name,
                                                   name)
                self._write_reason(kept_as, f"A reply to {rid} was already published and not"
                                   " yet collected; this reply, to a second request with the"
                                   " same id, was kept here instead")
                log.error("event=duplicate_reply id=%s kept=%s", rid, kept_as)
                break
        else:
            raise FileExistsError(errno.EEXIST, "replies/ keeps being planted", published)
        if self.durable:
            fsync_dir(self._replies)

    def _clear_plant(self, path: str) -> None:
        """Out of the reply's way: unlinked, or -- a folder, which a member
        may have filled with files the worker cannot remove -- renamed aside
        in ``replies/`` (the janitor reaps it after ``reply_ttl``)."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            log.warning("event=reply_plant_moved path=%s", path)
            os.rename(path, f"{self._replies}/.planted-{secrets.token_hex(8)}")

    def answer_withdrawn(self, rid: str, reply: dict[str, Any]) -> bool:
        """Publish an operator's ``Cancelled`` reply to a request just
        withdrawn from ``new/``: staged under a name of its own (never over
        one the worker staged) and published without replacing; never when
        a request with that id runs or was answered (the withdrawn file was
        then a duplicate, and the running one's reply is the answer).  The
        worker's ``active/`` is not touched."""
        if os.path.lexists(f"{self._active}/{rid}{REQUEST_SUFFIX}") or \
                self._id_in_use(rid) is not None:
            return False
        staged = f"{self._work}/{rid}.cancel.{os.getpid()}.tmp"
        _remove_quietly(staged)          # a leftover of a process with our pid
        write_new_file(staged, encode_json(reply), self.durable, gid=self._reply_group())
        try:
            rename_noreplace(staged, f"{self._replies}/{rid}{REQUEST_SUFFIX}")
        except FileExistsError:
            _remove_quietly(staged)
            return False
        if self.durable:
            fsync_dir(self._replies)
        return True

    def quarantine(self, entry: str, reason: str, claimed: bool) -> Quarantined:
        """Move ``new/NAME`` or ``active/NAME`` to ``failed/`` beside
        ``failed/NAME.reason`` (``NAME~2``... when ``NAME`` is taken there).

        An entry that cannot be moved stays where it is; the reason file is
        written all the same, and ``scan`` skips names that have one.
        """
        directory = self.active if claimed else self.new
        try:
            moved = self._quarantine(directory, entry, reason)
            if claimed:
                self._mine.discard(entry)
        except OSError as exc:
            # the reason could not be written (disk full): an entry still in
            # new/ is skipped from now on, not retried forever
            moved = not os.path.lexists(directory / entry)
            reason = f"{reason} (its reason file could not be written: {exc.strerror or exc})"
        if not moved and not claimed:
            self._skipped.add(entry)
        return Quarantined(entry, reason, moved)

    def _quarantine(self, directory: Path, name: str, reason: str) -> bool:
        moved, kept_as = True, name
        try:
            kept_as = self._rename_into_failed(directory, name)
        except FileNotFoundError:
            return True
        except OSError as exc:
            moved = False
            reason = (f"{reason.rstrip('.')}; it could not be moved out of"
                      f" {directory.name}/ ({exc.strerror or exc}), so it was left there"
                      " and will be skipped.")
        self._write_reason(kept_as, reason)
        if directory == self.active and moved:
            # its run file goes with it; an entry quarantined from new/ (say a
            # duplicate of a running id) must never touch what runs in active/
            _remove_quietly(self.active / (name + ".run"))
        return moved

    def _rename_into_failed(self, directory: Path, name: str, as_name: str | None = None
                            ) -> str:
        as_name = as_name or name
        for n in range(1, 100):
            dest = as_name if n == 1 else f"{as_name}~{n}"
            try:
                rename_noreplace(str(directory / name), str(self.failed / dest))
                return dest
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free name in failed/", name)

    def _write_reason(self, name: str, reason: str) -> None:
        line = " ".join(reason.split())
        if not line.endswith("."):
            line += "."
        text = f"{utc_iso()} {socket.gethostname()} pid {os.getpid()}: {line}\n"
        reason_name = reason_file_name(name)
        write_atomic(self.work / f"{reason_name}.tmp", self.failed / reason_name,
                     text.encode("utf-8", "backslashreplace"), self.durable, mode=0o644,
                     own_staging=True)

    def _has_reason(self, name: str) -> bool:
        return os.path.lexists(self.failed / reason_file_name(name))

    def fail(self, rid: str, reply: dict[str, Any], reason: str) -> None:
        """Stage the reply, move the request to ``failed/``, publish: a crash
        between the steps leaves a staged reply, which recovery finishes."""
        self._stage_reply(rid, reply, in_place=False)
        self._quarantine(self.active, rid + REQUEST_SUFFIX, reason)
        self._publish_staged(rid)
        self._mine.discard(rid + REQUEST_SUFFIX)

    # -- recovery (under the worker lock) ---------------------------------------------

    def unpublished(self) -> list[tuple[str, dict[str, Any] | None]]:
        ids = sorted(n[: -len(STAGED_REPLY_SUFFIX)] for n in os.listdir(self.work)
                     if n.endswith(STAGED_REPLY_SUFFIX) and
                     valid_id(n[: -len(STAGED_REPLY_SUFFIX)]))
        return [(rid, self._staged_reply(rid)) for rid in ids]

    def _staged_reply(self, rid: str) -> dict[str, Any] | None:
        """The staged reply of ``rid`` if it is whole (parses, names ``rid``);
        None if there is none or it was cut off while being written."""
        try:
            with open(f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}", "rb") as f:
                reply = json.loads(f.read())
        except (OSError, ValueError):
            return None
        return reply if isinstance(reply, dict) and reply.get("id") == rid else None

    def where(self, rid: str) -> str | None:
        name = rid + REQUEST_SUFFIX
        for state, folder in (("running", self.active), ("queued", self.new),
                              ("failed", self.failed)):
            if os.path.lexists(folder / name):
                return state
        return None

    def publish_recorded(self, rid: str) -> None:
        self._publish_staged(rid)

    def discard_recorded(self, rid: str) -> None:
        _remove_quietly(self.work / (rid + STAGED_REPLY_SUFFIX))

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

    def clear(self, rid: str) -> None:
        _remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
        _remove_quietly(f"{self._active}/{rid}{REQUEST_SUFFIX}")
        self._mine.discard(rid + REQUEST_SUFFIX)

    def drop_leftovers(self, dry_run: bool = False) -> list[str]:
        """Staging files in ``work/`` and run files whose request is gone."""
        found = [self.work / name for name in sorted(os.listdir(self.work))
                 if name.endswith(".tmp") and os.path.isfile(self.work / name)]
        found += [self.active / name for name in sorted(os.listdir(self.active))
                  if name.endswith(RUN_SUFFIX) and not os.path.lexists(
                      self.active / name[: -len(".run")])]
        if not dry_run:
            for path in found:
                _remove_quietly(path)
        return [str(path) for path in found]

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


def _remove_quietly(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


