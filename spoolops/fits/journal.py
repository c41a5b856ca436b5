"""Rollback journal for in-place header rewrites of large uncompressed files.

Why in place: copying a 1 GB file to change 80 bytes costs seconds of I/O and
doubles the space needed; when the edited header still fits in its existing
2880-byte blocks, only those blocks are rewritten, so an edit costs what the
header costs.  Why it is still crash-atomic: before the in-place write, the
old header blocks are saved in ``work/journals/<key>.journal`` together with
the file's identity (path, device, inode, size), the offset, and digests of
the old and new blocks; the journal is written under a temporary name,
fsynced, and renamed into place (so it is either whole or absent).  Only then
are the new blocks written and the file fsynced; the journal is removed last.
``recover_journals`` (run by the worker at start, under its lock, before any
request) puts the old blocks back wherever a journal remains, so a crash at
any moment leaves the old file or the new one.  It is idempotent.

Trusts: ``work/`` (the worker's own, mode 0700) and the paths recorded in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from .. import faults as fault
from ..workhome import JOURNALS_DIR

JOURNAL_DIR = JOURNALS_DIR
_SUFFIX = ".journal"
_TMP_SUFFIX = ".journal-tmp"
log = logging.getLogger("spoolops.fits")


def journal_path(work_dir: Path, real_path: str) -> Path:
    key = hashlib.sha256(os.fsencode(real_path)).hexdigest()[:32]
    return Path(work_dir) / JOURNAL_DIR / (key + _SUFFIX)


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fault.fsync(dfd)
    finally:
        os.close(dfd)


def write_journal(work_dir: Path, real_path: str, st: os.stat_result, offset: int,
                  old: bytes, new: bytes, durable: bool) -> Path:
    """Save the old blocks; on return the journal is durable (if ``durable``)."""
    final = journal_path(work_dir, real_path)
    final.parent.mkdir(mode=0o700, exist_ok=True)
    meta = {"version": 1, "path": real_path, "dev": st.st_dev, "ino": st.st_ino,
            "size": st.st_size, "offset": offset, "length": len(old),
            "old_sha256": hashlib.sha256(old).hexdigest(),
            "new_sha256": hashlib.sha256(new).hexdigest()}
    body = json.dumps(meta, sort_keys=True).encode() + b"\n" + old
    blob = body + hashlib.sha256(body).hexdigest().encode() + b"\n"
    tmp = final.with_name(final.name[:-len(_SUFFIX)] + _TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        fault.write(fd, blob)
        if durable:
            fault.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    if durable:
        _fsync_dir(final.parent)
    return final


def remove_journal(path: Path, durable: bool) -> None:
    path.unlink(missing_ok=True)
    if durable:
        _fsync_dir(path.parent)


def _load(path: Path) -> tuple[dict, bytes] | None:
    blob = path.read_bytes()
    if len(blob) < 66 or not blob.endswith(b"\n"):
        return None
    body = blob[:-65]     # the trailer is a sha256 hex digest and a newline
    digest = blob[-65:-1]
    if hashlib.sha256(body).hexdigest().encode() != digest:
        return None
    line, _, old = body.partition(b"\n")
    try:
        meta = json.loads(line)
    except ValueError:
        return None
    if len(old) != meta["length"] or hashlib.sha256(old).hexdigest() != meta["old_sha256"]:
        return None
    return meta, old


def recover_one(path: Path, durable: bool = True) -> str:
    """Replay (roll back) or discard one journal; returns what was done."""
    loaded = _load(path)
    if loaded is None:
        # Only possible after a power loss with durable=no: nothing to trust.
        remove_journal(path, durable)
        return f"discarded unreadable journal {path.name}"
    meta, old = loaded
    target = meta["path"]
    try:
        fd = os.open(target, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        remove_journal(path, durable)
        return f"discarded journal for vanished {target}"
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_dev != meta["dev"]
                or st.st_ino != meta["ino"] or st.st_size != meta["size"]):
            action = f"discarded journal for replaced {target}"
        elif os.pread(fd, meta["length"], meta["offset"]) == old:
            action = f"discarded journal, {target} unchanged"
        else:
            fault.pwrite(fd, old, meta["offset"])
            fault.fsync(fd)
            action = f"rolled back header of {target}"
    finally:
        os.close(fd)
    remove_journal(path, durable)
    log.warning("event=journal_recovered %s", action)
    return action


def recover_journals(work_dir: Path) -> list[str]:
    """Recover every journal in ``work_dir``; returns one line per journal."""
    jdir = Path(work_dir) / JOURNAL_DIR
    try:
        entries = sorted(jdir.iterdir())
    except FileNotFoundError:
        return []
    done = []
    for entry in entries:
        if entry.name.endswith(_TMP_SUFFIX):
            entry.unlink(missing_ok=True)      # never committed: no write began
            done.append(f"removed incomplete journal {entry.name}")
        elif entry.name.endswith(_SUFFIX):
            done.append(recover_one(entry))
    return done
