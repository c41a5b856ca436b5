"""Filesystem primitives: exclusive creation, atomic replacement, fsync,
no-replace renames, opening a file someone hostile may have planted, and
making folders in a tree someone hostile may write to.

``read_untrusted`` opens a file the way Postfix's ``safe_open`` does:
``O_NOFOLLOW``, ``O_NONBLOCK``, then ``fstat``: a regular file with one
link, whose (dev, ino) agree with an ``lstat`` of the name, within a size
limit.  ``create_file`` gives a new file exactly its mode whatever the
umask.  ``ensure_tree`` (``spoolops init``, often as root) works on folder
descriptors: each folder is opened below its parent's descriptor without
following a link, and its owner and mode are changed through that
descriptor, so that nothing swapped in by name is ever changed.

Trusts the paths it is given up to their last component (callers confine
them; the folder above a tree ``ensure_tree`` makes is the administrator's),
and nothing below; knows no spool folder or file name.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from inotify_simple import INotify, parse_events

from .errors import SpoolSetupError
from .users import group_name, user_name

FILE_MODE = 0o640


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
        discard_new_file(fd, path)
        raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def discard_new_file(fd: int, path: str | os.PathLike) -> None:
    """Close and remove a file this process was creating (on a failure)."""
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
        discard_new_file(fd, path)
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
class FileBytes:
    """A file as read: its bytes and its fstat."""

    data: bytes
    st: os.stat_result


class UnsafeEntry(Exception):
    """A file that must not be trusted; ``reason`` is one sentence."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_untrusted(path: str | os.PathLike, max_bytes: int, check_name: bool = True,
                   reader: str = "this process", limit_name: str = "max_request_bytes"
                   ) -> FileBytes:
    """Read a file a group member may have planted, as Postfix's safe_open does:
    open with ``O_NOFOLLOW``, then ``fstat``: a regular file with one link
    whose (dev, ino) agree with an ``lstat`` of the name.  ``check_name=False``
    skips that last check for a file in a folder only the caller can rename
    into (``active/``), where nobody can swap it.  ``reader`` names the
    party that cannot read a file it has no permission for; ``limit_name``
    what ``max_bytes`` is, in the sentence saying a file is too large.

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
            raise UnsafeEntry(f"it is {st.st_size} bytes, more than {limit_name}"
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
            raise UnsafeEntry(f"it grew past {limit_name} ({max_bytes}) while being read")
        return FileBytes(data, st)
    finally:
        os.close(fd)


def _kind_name(kind: int) -> str:
    return {stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO",
            stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device",
            stat.S_IFBLK: "block device", stat.S_IFLNK: "symbolic link"
            }.get(kind, "special file")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def ensure_tree(root: Path, root_mode: int, folders: Sequence[tuple[str, int]], uid: int,
                gid: int, changes: list[str]) -> None:
    """Create or repair folder ``root`` and ``folders`` below it (relative
    paths, parents listed before their children, with their modes): owner
    ``uid``:``gid`` and exactly the mode (setgid included).  Each change made
    is appended to ``changes``; ``SpoolSetupError`` when it cannot be done.

    Everything below ``root``'s parent is reached through descriptors:
    ``openat(parent, name, O_DIRECTORY | O_NOFOLLOW)`` and then ``fstat``,
    ``fchown`` and ``fchmod`` on the folder opened.  Whoever can write a
    folder of the tree (the worker user owns it) may swap an entry for a
    symbolic link at any moment; a link is refused when it is opened, and
    a swap after that changes nothing we do, since nothing is done by name
    afterwards.  ``root`` itself must not be a link either (its parent may be
    reached through links: that path is the administrator's).
    """
    parent = _open_parent(root)
    opened: dict[str, int] = {}
    try:
        opened[""] = _ensure_at(parent, root.name, root, root_mode, uid, gid, changes)
        for relative, mode in folders:
            up, _, name = relative.rpartition("/")
            if up not in opened or not name:
                raise SpoolSetupError(f"{root / relative}: its parent folder must be listed"
                                      " before it")   # a caller's mistake, not the tree's
            opened[relative] = _ensure_at(opened[up], name, root / relative, mode, uid, gid,
                                          changes)
    finally:
        for fd in (parent, *opened.values()):
            os.close(fd)


def ensure_dir(path: Path, mode: int, uid: int, gid: int, changes: list[str]) -> None:
    """``ensure_tree`` of one folder: create or repair ``path`` (not a link),
    owner ``uid``:``gid``, exactly ``mode``; each change made appended to
    ``changes``.  ``SpoolSetupError`` when it cannot be done."""
    ensure_tree(path, mode, (), uid, gid, changes)


def _open_parent(root: Path) -> int:
    """The folder above a tree, created if missing (links followed: it is the
    administrator's path, e.g. /var/spool)."""
    parent = root.parent
    try:
        os.makedirs(parent, exist_ok=True)
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SpoolSetupError(f"cannot open or create {parent}:"
                              f" {exc.strerror or exc}") from None


def _ensure_at(parent_fd: int, name: str, shown: Path, mode: int, uid: int, gid: int,
               changes: list[str]) -> int:
    """Folder ``name`` below ``parent_fd``, created if missing, its owner and
    mode made right through its own descriptor (returned)."""
    try:
        fd = _open_dir_at(parent_fd, name, shown)
    except FileNotFoundError:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)  # widened below, after the owner is right
            changes.append(f"created {shown}")
        except FileExistsError:
            pass        # made meanwhile by someone else: opened and checked like any other
        except OSError as exc:
            raise SpoolSetupError(f"cannot create {shown}: {exc.strerror or exc}") from None
        try:
            fd = _open_dir_at(parent_fd, name, shown)
        except FileNotFoundError:
            raise SpoolSetupError(f"{shown} vanished as it was being created; run"
                                  " 'spoolops init' again") from None
    try:
        _repair(fd, shown, mode, uid, gid, changes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_dir_at(parent_fd: int, name: str, shown: Path) -> int:
    """Open folder ``name`` below ``parent_fd``, never through a link at
    ``name``; ``FileNotFoundError`` if there is nothing there."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise
    except PermissionError:
        raise SpoolSetupError(f"cannot open {shown}: permission denied; run 'spoolops init'"
                              " as root") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise SpoolSetupError(f"cannot open {shown}: {exc.strerror or exc}") from None
    # O_DIRECTORY | O_NOFOLLOW refuse a link (ENOTDIR, or ELOOP) and a non-folder
    # alike: say which, so that the operator knows what was found
    try:
        kind = stat.S_IFMT(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
    except OSError:
        kind = 0
    if kind == stat.S_IFLNK:
        raise SpoolSetupError(f"{shown} is a symbolic link, not a folder: nothing was changed"
                              " through it; remove it (and find out who put it there), then"
                              " run 'spoolops init' again")
    raise SpoolSetupError(f"{shown} exists and is not a directory (a {_kind_name(kind)});"
                          " move it away and run 'spoolops init' again")


def _repair(fd: int, shown: Path, mode: int, uid: int, gid: int, changes: list[str]) -> None:
    """Owner and mode of the folder open at ``fd``, changed through ``fd`` only."""
    st = os.fstat(fd)
    owner_wrong = (st.st_uid, st.st_gid) != (uid, gid)
    if owner_wrong:
        try:
            os.fchown(fd, uid, gid)
        except PermissionError:
            raise SpoolSetupError(f"cannot chown {shown} to {user_name(uid)}:{gid}:"
                                  " run 'spoolops init' as root") from None
        except OSError as exc:
            raise SpoolSetupError(f"cannot chown {shown}: {exc.strerror or exc}") from None
        changes.append(f"owner of {shown} set to {user_name(uid)}:{group_name(gid)}")
    if stat.S_IMODE(st.st_mode) != mode or owner_wrong:
        try:
            os.fchmod(fd, mode)  # chown clears setgid: always re-apply the mode
        except OSError as exc:
            raise SpoolSetupError(f"cannot chmod {shown} to {mode:04o}:"
                                  f" {exc.strerror or exc}") from None
        if stat.S_IMODE(st.st_mode) != mode:
            changes.append(f"mode of {shown} set to {mode:04o}")


def remove_quietly(path: str | os.PathLike) -> None:
    """Unlink ``path`` (never what a link points to); gone already is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
