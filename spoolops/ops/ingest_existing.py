"""A target that already exists: a retry, a replacement, or a refusal.

``ingest_upload`` is safely repeatable: a target already holding the staged
bytes is a finished earlier run (``already``), checked before copying
gigabytes.  Other bytes are a ``Conflict`` without ``overwrite``.  The
comparison is made only where the submitter could read the target itself:
else the answer would tell it what a file it may not read holds.

Trusts: the open target folder it is given (opened by the caller through
``spoolops.confine``), the system's account database, and ``storage_root``.
Distrusts: the submitter, who learns nothing about a file it may not read.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
from collections.abc import Mapping
from typing import Any

from .. import confine
from ..errors import BadRequest, Conflict
from . import OpContext
from .ingest_publish import CHUNK


def same_as_target(ctx: OpContext, ddir: int, sfd: int, filename: str,
                   args: Mapping[str, Any], rel: str) -> tuple[int, str] | None:
    """(size, md5) when the target already holds exactly the staged bytes (a
    retried upload); None when it is absent or may be replaced.  A target
    with other bytes is a ``Conflict`` unless ``overwrite``.  Checked before
    copying gigabytes; the link() that publishes re-checks atomically."""
    try:
        st = os.stat(filename, dir_fd=ddir, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise BadRequest(f"target is a symbolic link; refusing it: {rel}")
    if not stat.S_ISREG(st.st_mode):
        raise Conflict(f"target exists and is not a regular file: {rel}")
    staged = os.fstat(sfd)
    if not readable_by(ctx.config.storage_root, rel, st, ctx.user):
        # comparing would tell the submitter whether a file it may not read
        # holds the bytes it guessed: the same answer whatever the bytes --
        # refused, or (overwrite) replaced without a word about what it held
        if not args["overwrite"]:
            raise Conflict(f"target already exists: {rel} (set overwrite to replace it)")
        ctx.memo.put("replacing", "")
        return None
    if not args["overwrite"] and st.st_size != staged.st_size:
        raise Conflict(f"target already exists with other contents: {rel} (set overwrite"
                       " to replace it)")
    tfd = confine.open_file(ddir, filename, what="target")
    try:
        target_md5 = md5_of(tfd)
    finally:
        os.close(tfd)
    if st.st_size == staged.st_size and target_md5 == md5_of(sfd) and \
            args["md5"] in (None, target_md5):
        return st.st_size, target_md5
    if not args["overwrite"]:
        raise Conflict(f"target already exists with other contents: {rel} (set overwrite"
                       " to replace it)")
    ctx.memo.put("replacing", target_md5)   # what the reply reports it replaced
    return None


def readable_by(root: Any, rel: str, st: os.stat_result, user: str) -> bool:
    """Whether ``user`` (a unix account) could read the stored file ``rel``
    itself: read permission on the file, and search permission on every
    folder from ``storage_root`` down to it.  A name with no account (a
    database role) gets what every account gets (the "other" bits)."""
    try:
        account: pwd.struct_passwd | None = pwd.getpwnam(user)
    except KeyError:
        account = None
    groups = set() if account is None else set(os.getgrouplist(user, account.pw_gid))

    def may(info: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if account is not None and account.pw_uid == info.st_uid:
            return bool(info.st_mode & bits[0])
        if info.st_gid in groups:
            return bool(info.st_mode & bits[1])
        return bool(info.st_mode & bits[2])

    search = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
    folder = os.path.realpath(root)
    try:
        for part in ["", *rel.split("/")[:-1]]:
            folder = os.path.join(folder, part) if part else folder
            if not may(os.stat(folder), search):
                return False
    except OSError:
        return False
    return may(st, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH))


def md5_of(fd: int) -> str:
    """The md5 (hex) of the whole open file, read by offset (the fd's own
    position is left alone)."""
    digest = hashlib.md5(usedforsecurity=False)
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()
