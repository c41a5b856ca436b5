"""Copying an upload into its folder and publishing it, crash-atomic.

The copy is a new file created by the worker (so the worker user owns it)
with exactly ``file_mode``, under a hidden temporary name recorded with
``spoolops.workhome.temps`` (the worker's start-up cleanup removes it after
a crash).  It is streamed in ``CHUNK``s while its md5 is computed, fsynced,
checked against the staged file and the expected ``md5``, then published:
``link()`` + ``unlink(temp)`` without ``overwrite`` (the kernel refuses an
existing name, so a file that appeared meanwhile is never replaced) or
``rename()`` with it; the folder is fsynced last.  A full disk is
``OpFailed`` with nothing published.

Trusts: the open folder it is given (below ``storage_root``, opened by the
caller through ``spoolops.confine``) and the worker's ``work/``.
Distrusts: the staged file, which may change while it is copied (then
nothing is published), and the target name, which may appear meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

from .. import confine, faults
from ..errors import BadRequest, Conflict, OpFailed
from ..workhome.temps import forget_temp, register_temp, temp_name
from . import OpContext

CHUNK = 1 << 20
PROGRESS_INTERVAL = 1.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def temp_for(filename: str, token: str) -> str:
    """The hidden temporary name beside ``filename`` (``temp_name``)."""
    # the hidden temp name must still fit in NAME_MAX with the longest filenames
    budget = confine.MAX_COMPONENT - len(temp_name("", token).encode())
    raw = filename.encode("utf-8")
    if len(raw) > budget:
        filename = raw[:budget].decode("utf-8", "ignore")
    return temp_name(filename, token)


def _check_target(ddir: int, filename: str, overwrite: bool, rel: str) -> None:
    try:
        st = os.stat(filename, dir_fd=ddir, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise BadRequest(f"target is a symbolic link; refusing it: {rel}")
    if not overwrite:
        raise Conflict(f"target already exists: {rel} (set overwrite to replace it)")
    if not stat.S_ISREG(st.st_mode):
        raise Conflict(f"target exists and is not a regular file: {rel}")


def _no_space(exc: OSError, rel: str) -> OpFailed:
    return OpFailed(f"no space left on device while writing {rel} "
                    f"({os.strerror(exc.errno)}); nothing published, staged file kept")


def _stream(ctx: OpContext, src: int, dst: int, rel: str) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` in chunks; returns (bytes, md5 hex)."""
    total = os.fstat(src).st_size
    digest = hashlib.md5(usedforsecurity=False)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    last = time.monotonic()
    while True:
        n = os.readv(src, [buf])
        if n == 0:
            break
        chunk = view[:n]
        digest.update(chunk)
        written = 0
        while written < n:
            written += os.write(dst, chunk[written:])
        done += n
        faults.hit("bytes", n)
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL:
            ctx.progress(done, max(total, done))
            last = now
    ctx.progress(done, done)
    return done, digest.hexdigest()


def copy_and_publish(ctx: OpContext, sfd: int, ddir: int, dest_dir: str,
                     args: Mapping[str, Any], rel: str,
                     before_publish: Callable[[], None] | None = None) -> tuple[int, str]:
    """Copy the open staged file ``sfd`` into the folder ``ddir`` (whose real
    path is ``dest_dir``) as ``args["filename"]``; returns (size, md5).
    ``before_publish`` runs once the copy is accepted, just before it is
    published."""
    config = ctx.config
    filename, overwrite = args["filename"], args["overwrite"]
    tname = temp_for(filename, secrets.token_hex(8))
    tpath = os.path.join(dest_dir, tname)
    register_temp(ctx.work_dir, tpath, config.durable)
    temp_exists = False
    try:
        before = os.fstat(sfd)
        try:
            tfd = os.open(tname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, config.file_mode & 0o777, dir_fd=ddir)
            temp_exists = True
            try:
                os.fchmod(tfd, config.file_mode)  # exactly file_mode, whatever the umask
                size, md5 = _stream(ctx, sfd, tfd, rel)
                if config.durable:
                    faults.fsync(tfd)
            finally:
                os.close(tfd)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _no_space(exc, rel) from None
            raise
        after = os.fstat(sfd)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) \
                or size != after.st_size:
            raise Conflict(f"staged file changed while it was being copied: {filename}; "
                           "nothing published")
        if args["md5"] is not None and md5 != args["md5"]:
            raise Conflict(f"md5 mismatch for {filename}: expected {args['md5']}, "
                           f"staged file has {md5}; nothing published")
        _check_target(ddir, filename, overwrite, rel)
        if before_publish is not None:
            before_publish()        # accepted: its metadata goes in first
        faults.hit("ingest.before_publish")
        try:
            if overwrite:
                os.rename(tname, filename, src_dir_fd=ddir, dst_dir_fd=ddir)
                temp_exists = False
                faults.hit("ingest.after_publish")
            else:
                os.link(tname, filename, src_dir_fd=ddir, dst_dir_fd=ddir,
                        follow_symlinks=False)
                faults.hit("ingest.after_publish")
                os.unlink(tname, dir_fd=ddir)
                temp_exists = False
        except FileExistsError:
            raise Conflict(f"target already exists: {rel} (created meanwhile; "
                           "set overwrite to replace it)") from None
        except (IsADirectoryError, NotADirectoryError):
            raise Conflict(f"target exists and is not a regular file: {rel}") from None
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise Conflict(f"target exists and is a folder: {rel}") from None
            if exc.errno in _NO_SPACE:
                raise _no_space(exc, rel) from None
            raise
        if config.durable:
            faults.fsync(ddir)
        return size, md5
    finally:
        if temp_exists:
            try:
                os.unlink(tname, dir_fd=ddir)
            except FileNotFoundError:
                pass
        forget_temp(ctx.work_dir, tpath)
