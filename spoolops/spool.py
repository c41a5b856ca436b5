"""The spool protocol: the folders, file names, and every rename between them.

This module is the only place that moves files through the spool, the way
CPython's ``mailbox.Maildir`` owns tmp/new/cur -- with the directory fsync
that ``mailbox.py`` skips (when ``durable``):

    client:  tmp/ID.json --publish_request--> new/ID.json
    worker:  new/ID.json --claim_request--> active/ID.json (+ active/ID.json.run)
             reply: work/ID.reply (written whole, fsynced)
             --publish_reply--> unlink active/ID.json, rename to replies/ID.json
    client:  reads replies/ID.json, checks owner and id, unlinks it

Exactly one reply: a staged ``work/ID.reply`` means the operation finished; it
is only ever renamed into ``replies/``, so recovery can tell "finished, not yet
published" (staged reply present) from "cut off" (``active/ID.json`` alone).
The staged reply is written in place, not through a rename: while it is being
written ``active/ID.json`` still exists, and recovery drops a staged reply
that does not parse (``staged_reply``), so a cut-off write is just "cut off".

Trusts: nothing found in ``tmp/``, ``new/`` or ``replies/`` (group-writable).
Such files are opened as Postfix's ``safe_open`` does: ``O_NOFOLLOW``,
``O_NONBLOCK``, then ``fstat``: a regular file with one link, whose
(dev, ino) agree with an ``lstat`` of the name, within a size limit.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from inotify_simple import INotify, parse_events

from .errors import BadRequest, SpoolSetupError

log = logging.getLogger("spoolops.spool")

# name -> mode (owner: worker user, group: submit group)
DIR_MODES: dict[str, int] = {
    "tmp": 0o2730,
    "new": 0o2730,
    "active": 0o2750,
    "failed": 0o2750,
    "replies": 0o2770,
    # setgid like the rest, so that staged replies take the submit group
    # whatever the worker user's primary group (older trees: 0700)
    "work": 0o2700,
}
FILE_MODE = 0o640
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
REQUEST_SUFFIX = ".json"
RUN_SUFFIX = ".json.run"
REASON_SUFFIX = ".reason"
STAGED_REPLY_SUFFIX = ".reply"
WITHDRAWN_SUFFIX = ".withdrawn"   # tmp/ID.withdrawn: a cancelled request on its way out
LOCK_NAME = "worker.lock"
MAX_REPLY_BYTES = 16 * 1024 * 1024
_UNKNOWN = object()


def valid_id(rid: object) -> bool:
    return isinstance(rid, str) and ID_RE.match(rid) is not None


def id_from_name(name: str) -> str | None:
    """The request id a spool file name carries, or None if it carries none."""
    if name.endswith(REQUEST_SUFFIX):
        rid = name[: -len(REQUEST_SUFFIX)]
        if valid_id(rid):
            return rid
    return None


def reason_file_name(name: str) -> str:
    """``NAME.reason``; a name too long for the suffix is shortened with a hash."""
    full = name + REASON_SUFFIX
    if len(os.fsencode(full)) + len(".tmp") <= 255:
        return full
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.fsdecode(os.fsencode(name)[:200]) + f"~{digest}" + REASON_SUFFIX


def new_request_id(now: float | None = None) -> str:
    """UTC time + pid + random: sorts by time, never collides."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int(now % 1 * 1e6):06d}Z-{os.getpid()}-{secrets.token_hex(4)}"


def utc_iso(ts: float | None = None) -> str:
    """``2026-11-28T12:34:56.789Z`` (milliseconds, UTC)."""
    ts = time.time() if ts is None else ts
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ts))}.{int(ts % 1 * 1000):03d}Z"


def parse_iso(text: str) -> float:
    """Seconds since the epoch from an ISO 8601 time; naive times are UTC."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)  # noqa: UP017 - datetime.UTC is 3.11+
    return dt.timestamp()


_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


@functools.lru_cache(maxsize=256)
def _key_line_start(key: str) -> str:
    return f"  {_encode(key)}: "


def encode_json(obj: Any) -> bytes:
    """UTF-8 JSON, one top-level key per line, with a trailing newline: small
    files that ``cat`` and ``grep`` well.  (Nested values stay on their key's
    line, so the C encoder does all the work: ``indent`` would not use it.)"""
    if isinstance(obj, dict) and obj and all(type(k) is str for k in obj):
        body = ",\n".join([_key_line_start(k) + _encode(v) for k, v in obj.items()])
        # a lone surrogate (from a "\\udc80" escape in a request) becomes that
        # escape again: still valid JSON, decoded to the same string
        return f"{{\n{body}\n}}\n".encode("utf-8", "backslashreplace")
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
            ).encode("utf-8", "backslashreplace")


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file(path: str | os.PathLike, mode: int = FILE_MODE, gid: int | None = None
                ) -> int:
    """Create ``path`` exclusively (never through a link) with exactly ``mode``
    whatever the umask (a web server's umask of 077 must not hide a request
    from the worker), and group ``gid`` if given.  Returns the descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)
        if gid is not None:
            os.fchown(fd, -1, gid)
    except BaseException:
        _discard(fd, path)
        raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _discard(fd: int, path: str | os.PathLike) -> None:
    os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


def write_new_file(path: str | os.PathLike, data: bytes, durable: bool,
                   mode: int = FILE_MODE, gid: int | None = None) -> None:
    """Create ``path`` exclusively (never through a link) and write ``data``."""
    fd = create_file(path, mode, gid)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    except BaseException:
        _discard(fd, path)
        raise
    os.close(fd)


def write_atomic(staging: str | os.PathLike, final: str | os.PathLike, data: bytes,
                 durable: bool, mode: int = FILE_MODE, own_staging: bool = False,
                 gid: int | None = None) -> None:
    """Write ``staging``, then rename it to ``final`` (same filesystem): readers
    of ``final`` see the old file or the whole new one, never a part.

    ``own_staging``: the staging name is private to this process (in
    ``work/``), so a leftover from a crash may be removed first.
    """
    if own_staging:
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass
    write_new_file(staging, data, durable, mode, gid)
    try:
        os.rename(staging, final)
    except BaseException:
        try:
            os.unlink(staging)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(os.path.dirname(final))


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_noreplace_supported = [_renameat2 is not None]


def rename_noreplace(src: str, dst: str) -> None:
    """``rename(src, dst)`` that fails with ``FileExistsError`` instead of
    replacing ``dst``: atomic with ``renameat2(RENAME_NOREPLACE)`` (ext4, xfs,
    btrfs, tmpfs).  Elsewhere the fallback checks first, which is only safe
    when no other process renames into ``dst``'s folder (the worker's own)."""
    if _noreplace_supported[0]:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                      _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        # EINVAL/ENOSYS: this filesystem or kernel lacks it; EPERM: a seccomp
        # filter (systemd SystemCallFilter=) may refuse the call itself
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            raise OSError(err, os.strerror(err), src, None, dst)
        _rename_checked(src, dst)
        _noreplace_supported[0] = False  # the plain rename worked: use it from now on
        return
    _rename_checked(src, dst)


def _rename_checked(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), src, None, dst)
    os.rename(src, dst)


def pending_events(inotify: INotify) -> list:
    """The events queued on a non-blocking inotify instance, with one read()
    (``INotify.read`` asks FIONREAD first: another system call per wake-up)."""
    try:
        return parse_events(os.read(inotify.fileno(), 1 << 16))
    except BlockingIOError:
        return []


@dataclass(frozen=True)
class SpoolFile:
    """A file read from the spool: its bytes and its fstat."""

    data: bytes
    st: os.stat_result


class UnsafeEntry(Exception):
    """A spool entry that must not be trusted; ``reason`` is one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_untrusted(path: str | os.PathLike, max_bytes: int, check_name: bool = True,
                   reader: str = "this process") -> SpoolFile:
    """Read a file a group member may have planted, as Postfix's safe_open does:
    open with ``O_NOFOLLOW``, then ``fstat``: a regular file with one link
    whose (dev, ino) agree with an ``lstat`` of the name.  ``check_name=False``
    skips that last check for a file in a folder only the caller can rename
    into (``active/``), where nobody can swap it.  ``reader`` names the
    party that cannot read a file it has no permission for.

    Raises ``UnsafeEntry`` (symlink, FIFO, socket, directory, hard link,
    swapped while being opened, too large) or ``FileNotFoundError``.
    """
    # O_NONBLOCK: a FIFO opens without waiting for a writer (and is refused
    # below); O_NOCTTY: a tty never becomes ours.  Only root can make device
    # nodes, and group members cannot hard-link across filesystems.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY |
                     os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeEntry("it is a symbolic link") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV):
            try:
                kind = stat.S_IFMT(os.lstat(path).st_mode)
            except OSError:
                kind = 0
            if kind not in (0, stat.S_IFREG):
                raise UnsafeEntry(f"it is not a regular file but a {_kind_name(kind)}") from None
            raise UnsafeEntry(f"it cannot be opened as a regular file ({exc.strerror})") from None
        if exc.errno == errno.EACCES:
            raise UnsafeEntry(f"{reader} may not read it (permission denied)") from None
        raise
    try:
        st = os.fstat(fd)
        kind = stat.S_IFMT(st.st_mode)
        if kind != stat.S_IFREG:
            raise UnsafeEntry(f"it is not a regular file but a {_kind_name(kind)}")
        if st.st_nlink != 1:
            raise UnsafeEntry(f"it has {st.st_nlink} hard links (a request file has one)")
        if check_name:
            try:
                lst = os.lstat(path)
            except FileNotFoundError:
                raise UnsafeEntry("it was removed or swapped while being opened") from None
            if (lst.st_dev, lst.st_ino) != (st.st_dev, st.st_ino):
                raise UnsafeEntry("it was swapped for another file while being opened")
        if st.st_size > max_bytes:
            raise UnsafeEntry(f"it is {st.st_size} bytes, more than max_request_bytes"
                              f" ({max_bytes})")
        # a short read of a regular file is its end: one read() in the common case
        data = os.read(fd, st.st_size + 1)
        if len(data) > st.st_size:  # it grew since the fstat
            chunks = [data]
            got = len(data)
            while got <= max_bytes:
                chunk = os.read(fd, min(max_bytes + 1 - got, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            data = b"".join(chunks)
        if len(data) > max_bytes:
            raise UnsafeEntry(f"it grew past max_request_bytes ({max_bytes}) while being read")
        return SpoolFile(data, st)
    finally:
        os.close(fd)


def _kind_name(kind: int) -> str:
    return {stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO", stat.S_IFSOCK: "socket",
            stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
            stat.S_IFLNK: "symbolic link"}.get(kind, "special file")


class Spool:
    """One spool tree.  Client and worker both use it; each uses its half."""

    def __init__(self, root: str | os.PathLike, durable: bool = True,
                 max_request_bytes: int = 65536) -> None:
        self.root = Path(root)
        self.durable = durable
        self.max_request_bytes = max_request_bytes
        self.tmp = self.root / "tmp"
        self.new = self.root / "new"
        self.active = self.root / "active"
        self.failed = self.root / "failed"
        self.replies = self.root / "replies"
        self.work = self.root / "work"
        self.lock_path = self.work / LOCK_NAME
        # plain strings for the per-request path work (pathlib costs microseconds)
        self._new, self._active, self._work, self._replies, self._tmp = (
            str(self.new), str(self.active), str(self.work), str(self.replies), str(self.tmp))
        self._reply_gid: Any = _UNKNOWN

    def worker_uid(self, worker_user: str = "") -> int:
        """The uid the worker runs as: ``[spool] worker_user``, else the owner
        of ``active/``.  Replies are trusted only when owned by it."""
        if worker_user:
            try:
                return pwd.getpwnam(worker_user).pw_uid
            except KeyError:
                raise SpoolSetupError(f"[spool] worker_user {worker_user!r} is not a user"
                                      " on this machine") from None
        try:
            return os.stat(self.active).st_uid
        except FileNotFoundError:
            raise SpoolSetupError(f"no spool at {self.root}: run 'spoolops init'") from None

    def check_exists(self) -> None:
        for name in DIR_MODES:
            if not (self.root / name).is_dir():
                raise SpoolSetupError(
                    f"spool folder {self.root / name} is missing: run 'spoolops init'"
                    f" (root = {self.root})")

    # -- client side --------------------------------------------------------

    def publish_request(self, request: dict[str, Any]) -> str:
        """Write ``tmp/ID.json`` and rename it into ``new/``: the one rename
        that publishes a request.  Returns the id once the request is queued
        (and, with ``durable``, on disk); raises if nothing was queued.

        Durable without reading ``new/`` (mode 2730: members may not open it
        to fsync it): the file is fsynced before the rename (its bytes), and
        again after it.  A rename changes the renamed inode (its ctime), so
        on ext4 and xfs that second fsync commits the journal transaction
        that holds the rename itself.
        """
        rid = request["id"]
        if not valid_id(rid):
            raise BadRequest(f"invalid request id {rid!r}")
        data = encode_json(request)
        if len(data) > self.max_request_bytes:
            raise BadRequest(f"request is {len(data)} bytes, more than max_request_bytes"
                             f" ({self.max_request_bytes})")
        name = rid + REQUEST_SUFFIX
        staging, queued = f"{self._tmp}/{name}", f"{self._new}/{name}"
        fd = create_file(staging)
        try:
            write_all(fd, data)
            if self.durable:
                os.fsync(fd)
                # kept for the fsync after the rename: read-only, so that its
                # close is no IN_CLOSE_WRITE in new/ (a second wake-up per request)
                check = os.open(staging, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except BaseException:
            _discard(fd, staging)
            raise
        os.close(fd)   # before the rename: its IN_CLOSE_WRITE is in tmp/, unwatched
        try:
            os.rename(staging, queued)
        except BaseException:
            if self.durable:
                os.close(check)
            self._remove_quietly(staging)
            raise
        if not self.durable:
            return rid
        try:
            os.fsync(check)
        except OSError:
            # queued but perhaps not on disk: take it back so that the caller's
            # error is true ("nothing queued"); if the worker has claimed it
            # already it is accepted, and runs
            try:
                os.unlink(queued)
            except FileNotFoundError:
                return rid
            raise
        finally:
            os.close(check)
        return rid

    def withdraw_request(self, rid: str) -> bool:
        """Cancel: take ``new/ID.json`` out of the queue.  Atomic against
        ``claim_request``'s rename, so either the worker has it or nobody
        ever will.  With ``durable`` the removal is moved aside to ``tmp/``
        first and that file fsynced (which commits the rename, as in
        ``publish_request``): a cancel reported done survives a power cut."""
        if not valid_id(rid):
            return False
        queued = f"{self._new}/{rid}{REQUEST_SUFFIX}"
        if not self.durable:
            try:
                os.unlink(queued)
            except FileNotFoundError:
                return False
            return True
        aside = f"{self._tmp}/{rid}{WITHDRAWN_SUFFIX}"
        try:
            os.rename(queued, aside)
        except FileNotFoundError:
            return False
        try:
            fd = os.open(aside, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            # not the submitter's own file: root or the worker user, who own tmp/
            fsync_dir(self._tmp)
        else:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._remove_quietly(aside)
        return True

    def reply_path(self, rid: str) -> Path:
        return self.replies / (rid + REQUEST_SUFFIX)

    def read_reply(self, rid: str, reader: str = "this process") -> SpoolFile:
        """The reply's bytes and fstat (FileNotFoundError if not there yet)."""
        return read_untrusted(f"{self._replies}/{rid}{REQUEST_SUFFIX}", MAX_REPLY_BYTES,
                              reader=reader)

    def published_reply(self, rid: str, worker_uid: int, reader: str = "this process"
                        ) -> dict[str, Any] | None:
        """The reply published for ``rid`` if it is one to trust: a plain file
        owned by the worker user, a JSON object whose ``id`` is ``rid``.
        None when there is none yet, or only something else under its name
        (``replies/`` is group-writable: anyone in the group may plant one).
        Raises ``SpoolSetupError`` when the worker's own reply cannot be read
        by this process: a deployment fault no retry will mend."""
        try:
            f = self.read_reply(rid, reader)
        except FileNotFoundError:
            return None
        except (UnsafeEntry, BlockingIOError) as exc:  # BlockingIOError: a lease on it
            try:
                st = os.lstat(self.reply_path(rid))
            except OSError:
                st = None
            if isinstance(exc, UnsafeEntry) and "permission denied" in exc.reason and \
                    st is not None and st.st_uid == worker_uid:
                raise SpoolSetupError(
                    f"the reply {self.reply_path(rid)} from the worker cannot be read by"
                    f" {reader} (mode {stat.S_IMODE(st.st_mode):04o}, gid {st.st_gid}):"
                    " replies must carry the submit group; run 'spoolops doctor'") from None
            log.warning("ignoring untrustworthy reply file for %s: %s", rid, exc)
            return None
        if f.st.st_uid != worker_uid:
            log.warning("ignoring reply for %s owned by uid %d, not the worker's (%d)",
                        rid, f.st.st_uid, worker_uid)
            return None
        try:
            obj = json.loads(f.data)
        except ValueError:
            log.warning("ignoring reply for %s that is not valid JSON", rid)
            return None
        if not isinstance(obj, dict) or obj.get("id") != rid:
            log.warning("ignoring reply for %s whose id does not match", rid)
            return None
        return obj

    def remove_reply(self, rid: str) -> None:
        """Delete a collected reply.  (Any member of the group may unlink in
        ``replies/`` anyway, so checking which file the name holds first
        would protect nothing.)"""
        self._remove_quietly(f"{self._replies}/{rid}{REQUEST_SUFFIX}")

    # -- worker side --------------------------------------------------------

    def scan_new(self) -> list[os.DirEntry]:
        """Everything in ``new/`` (the truth; inotify is only a hint)."""
        with os.scandir(self.new) as it:
            return list(it)

    def claim_request(self, name: str) -> bool:
        """Rename ``new/NAME`` to ``active/NAME``.  False if someone else took
        it first or it was cancelled (ENOENT is not an error);
        ``FileExistsError`` if a request of that name is already running
        (never replaced)."""
        try:
            rename_noreplace(f"{self._new}/{name}", f"{self._active}/{name}")
        except FileNotFoundError:
            return False
        return True

    def unclaim_request(self, name: str) -> None:
        """Put a claimed, not yet started request back in line (mtime kept)."""
        os.rename(self.active / name, self.new / name)
        self._remove_quietly(self.active / (name + ".run"))

    def read_claimed(self, name: str) -> SpoolFile:
        # only the worker renames into active/: what the name holds cannot be swapped
        return read_untrusted(f"{self._active}/{name}", self.max_request_bytes,
                              check_name=False, reader="the worker")

    def read_queued(self, name: str) -> SpoolFile:
        return read_untrusted(self.new / name, self.max_request_bytes, reader="the worker")

    def write_run_info(self, rid: str, info: dict[str, Any], durable: bool = False) -> None:
        """``active/ID.json.run``: who runs it since when, replaced atomically."""
        staging = self.work / f"{rid}.run.{os.getpid()}.tmp"
        write_atomic(staging, self.active / (rid + RUN_SUFFIX), encode_json(info),
                     durable, mode=0o644, own_staging=True)

    def stage_reply(self, rid: str, reply: dict[str, Any], in_place: bool = True) -> None:
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
        gid = self.reply_gid()
        if in_place:
            try:
                write_new_file(path, data, self.durable, gid=gid)
                return
            except FileExistsError:
                pass
        write_atomic(f"{path}.tmp", path, data, self.durable, own_staging=True, gid=gid)

    def reply_gid(self) -> int | None:
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

    def staged_reply(self, rid: str) -> dict[str, Any] | None:
        """The staged reply of ``rid`` if it is whole (parses, names ``rid``);
        None if there is none or it was cut off while being written."""
        try:
            with open(f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}", "rb") as f:
                reply = json.loads(f.read())
        except (OSError, ValueError):
            return None
        return reply if isinstance(reply, dict) and reply.get("id") == rid else None

    def publish_reply(self, rid: str, run_file: bool = True) -> None:
        """Retire ``active/ID.json`` (and its run file, if the op had one) and
        rename the staged reply into ``replies/``.

        The request is removed first so that a crash in between leaves a
        staged reply and no orphan (recovery publishes it): never two replies.
        With ``durable``, one fsync of ``replies/`` commits the lot on a
        journalling filesystem (ext4, xfs: metadata is journalled in order).
        """
        if run_file:
            self._remove_quietly(f"{self._active}/{rid}{RUN_SUFFIX}")
        self._remove_quietly(f"{self._active}/{rid}{REQUEST_SUFFIX}")
        os.rename(f"{self._work}/{rid}{STAGED_REPLY_SUFFIX}",
                  f"{self._replies}/{rid}{REQUEST_SUFFIX}")
        if self.durable:
            fsync_dir(self.replies)

    def staged_replies(self) -> list[str]:
        """Ids with a staged reply in ``work/`` (finished, not yet published)."""
        return sorted(n[: -len(STAGED_REPLY_SUFFIX)] for n in os.listdir(self.work)
                      if n.endswith(STAGED_REPLY_SUFFIX) and
                      valid_id(n[: -len(STAGED_REPLY_SUFFIX)]))

    def quarantine(self, directory: Path, name: str, reason: str) -> bool:
        """Move ``directory/NAME`` to ``failed/NAME`` with ``failed/NAME.reason``.

        Entries that cannot be moved stay where they are; the reason file is
        written all the same, and the scanner skips names that have one.
        Returns True if the entry was moved.
        """
        moved, kept_as = True, name
        try:
            kept_as = self._rename_into_failed(directory, name)
        except FileNotFoundError:
            return False
        except OSError as exc:
            moved = False
            reason = (f"{reason.rstrip('.')}; it could not be moved out of"
                      f" {directory.name}/ ({exc.strerror or exc}), so it was left there"
                      " and will be skipped.")
        self.write_reason(kept_as, reason)
        if directory == self.active and moved:
            # its run file goes with it; an entry quarantined from new/ (say a
            # duplicate of a running id) must never touch what runs in active/
            self._remove_quietly(self.active / (name + ".run"))
        return moved

    def _rename_into_failed(self, directory: Path, name: str) -> str:
        """Move ``directory/NAME`` into ``failed/`` without replacing anything
        there; the name it got (``NAME``, or ``NAME~2``... when ``NAME`` is
        taken, e.g. by a quarantined duplicate of the same id)."""
        for n in range(1, 100):
            dest = name if n == 1 else f"{name}~{n}"
            try:
                rename_noreplace(str(directory / name), str(self.failed / dest))
                return dest
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free name in failed/", name)

    def write_reason(self, name: str, reason: str) -> None:
        line = " ".join(reason.split())
        if not line.endswith("."):
            line += "."
        text = f"{utc_iso()} {socket.gethostname()} pid {os.getpid()}: {line}\n"
        reason_name = reason_file_name(name)
        write_atomic(self.work / f"{reason_name}.tmp", self.failed / reason_name,
                     text.encode("utf-8", "backslashreplace"), self.durable, mode=0o644,
                     own_staging=True)

    def has_reason(self, name: str) -> bool:
        return os.path.lexists(self.failed / reason_file_name(name))

    def requeue_failed(self, name: str) -> bool:
        """Move ``failed/NAME`` back to ``new/`` (mtime kept) and drop its reason."""
        try:
            os.rename(self.failed / name, self.new / name)
        except FileNotFoundError:
            return False
        self._remove_quietly(self.failed / reason_file_name(name))
        return True

    @staticmethod
    def _remove_quietly(path: str | os.PathLike) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
