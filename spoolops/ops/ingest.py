"""``ingest_upload``: publish a staged upload into the archive.

The staged file is ``upload_staging_dir/<path>/<filename>`` (where
FitsStorage's current web code writes it), else ``upload_staging_dir/
<filename>`` (its older code; a processed calibration has no ``path``, so it
is always there); both present is a ``Conflict``.  It is copied to
``storage_root/<path>/<filename>`` (``storage_root/<processed_cals_path>/
<filename>`` with ``processed_cal``).  The copy is a new file created by the
worker (so the worker user owns it) with exactly ``file_mode``; it is
streamed in 1 MiB chunks while its md5 is computed, fsynced, checked against
the expected ``md5``, published atomically, and the folder fsynced.  Only
then is the staged file removed.  Publishing without ``overwrite`` is
``link()`` + ``unlink(temp)``: the kernel refuses an existing name, so a
file that appeared meanwhile is never replaced (``Conflict``).  With
``overwrite`` it is ``rename()``.

Safely repeatable (idempotent): a retry whose target already holds the same
bytes is ``ok`` with ``already: true`` (the staged copy is removed) -- where
the submitter could read the target itself (else the answer would tell it
what a file it may not read holds: ``Conflict`` whatever the bytes), and a
request re-run after a crash that had already published finds its own note
of that (``memos``) even when the staged file is gone.  A target holding
other bytes stays a ``Conflict`` without ``overwrite``.

Result: ``filename``, ``path`` (the stored file relative to storage_root,
e.g. ``"2026/N20261128S0001.fits"``), ``size``, ``md5`` (of the bytes
published), and ``already`` when nothing had to be copied.
``fileuploadlog_id`` and ``batch`` (FitsStorage's) are passed on, untouched,
to the follow-up hooks.

Trusts: the configured roots.  Distrusts: every argument (untrusted JSON
from the submit group) and the contents of the staging folder, which the
web user can write: every path is walked with ``spoolops.confine`` (no
``..``, no absolute path, no symbolic link at any level); the staged file
must be a regular file with one link, and it is removed only if the name
still points at the file that was copied.  Folders missing below
storage_root are created with ``file_mode`` plus ``x`` wherever ``r`` is set
(0644 -> 0755), keeping an inherited setgid bit.

A crash at any moment leaves either nothing published (staged file intact)
or the complete file published; the temporary file is recorded with
``spoolops.workhome.temps`` so the worker's start-up cleanup removes it.
Fault points for crash tests: see ``spoolops.faults``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pwd
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from typing import Any

from .. import confine, faults
from ..config import Config
from ..errors import BadRequest, Conflict, NotFound, OpError, OpFailed
from ..workhome.temps import forget_temp, register_temp, temp_name
from . import SITE_DEFAULT, OpContext, Operation
from . import args as check

CHUNK = 1 << 20
SIDECAR = ".json"          # FitsStorage's misc-file metadata, beside the file
MAX_SIDECAR = 1 << 20
PROGRESS_INTERVAL = 1.0
_ARGS = ("filename", "path", "processed_cal", "md5", "overwrite", "fileuploadlog_id",
         "batch")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


# --- arguments -------------------------------------------------------------

def validate_ingest(args: Any, ctx: OpContext) -> dict[str, Any]:
    """Check types and the shape of every path; the staged file must exist."""
    args = check.object_args(args)
    check.only(args, _ARGS, "ingest_upload")
    filename = check.file_name(args, "filename")
    path_parts = check.relative_path(args, "path", allow_empty=True)
    processed_cal = check.flag(args, "processed_cal")
    # FitsStorage's shape (their callers always send fileuploadlog_id) gets
    # their meaning: an upload replaces the stored file (their shutil.move),
    # e.g. an exporter re-sending a changed file
    fitsstorage = "fileuploadlog_id" in args
    overwrite = check.flag(args, "overwrite") if args.get("overwrite") is not None \
        else fitsstorage
    if processed_cal and path_parts:
        raise BadRequest("path must be empty when processed_cal is true "
                         "(processed calibrations go to processed_cals_path)")
    md5 = check.md5(args, "md5")
    upload_id = args.get("fileuploadlog_id")
    if upload_id is not None and (isinstance(upload_id, bool) or not isinstance(upload_id,
                                                                                 int)):
        raise BadRequest("fileuploadlog_id must be an integer or null")
    clean = {"filename": filename, "path": "/".join(path_parts),
             "processed_cal": processed_cal, "md5": md5, "overwrite": overwrite,
             "fileuploadlog_id": upload_id, "batch": args.get("batch")}
    published = ctx.memo.get("published")
    try:
        clean["staged"] = _find_staged(ctx.config, clean)
    except NotFound:
        if published is None:
            raise
        # re-run after a crash: this request published its copy and removed
        # the staged file, then died before replying
        clean["staged"] = None
    return clean


def _staged_parts(args: Mapping[str, Any]) -> list[str]:
    return confine.split_relative(args["staged"], "staged", allow_empty=True)


def _dest_parts(args: Mapping[str, Any], config: Config) -> list[str]:
    if args["processed_cal"]:
        return confine.split_relative(config.processed_cals_path, "processed_cals_path",
                                      allow_empty=True)
    return confine.split_relative(args["path"], "path", allow_empty=True)


def _find_staged(config: Config, args: Mapping[str, Any]) -> str:
    """The folder (below upload_staging_dir) holding the staged file: the
    request's ``path``, else the top.  Early NotFound/BadRequest/Conflict,
    without opening the file."""
    places = [args["path"], ""] if args["path"] else [""]
    found = []
    for place in places:
        st = _staged_stat(config, place, args["filename"])
        if st is not None:
            found.append((place, st))
    if not found:
        where = " or ".join(f"{p}/{args['filename']}" if p else args["filename"]
                            for p in places)
        raise NotFound(f"staged file not found: {where} (in upload_staging_dir)")
    if len(found) > 1:
        raise Conflict(f"the upload is staged twice, as {args['path']}/{args['filename']} and"
                       f" as {args['filename']}: remove the one that is not meant")
    place, st = found[0]
    _check_staged_stat(st, args["filename"])
    return place


def _staged_stat(config: Config, place: str, filename: str) -> os.stat_result | None:
    try:
        sdir = confine.open_dir(config.upload_staging_dir,
                                confine.split_relative(place, "path", allow_empty=True))
    except NotFound:
        return None
    try:
        return os.stat(filename, dir_fd=sdir, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        os.close(sdir)


def _check_staged_stat(st: os.stat_result, filename: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise BadRequest(f"staged file is a symbolic link; refusing it: {filename}")
    if not stat.S_ISREG(st.st_mode):
        raise BadRequest(f"staged file is not a regular file: {filename}")
    if st.st_nlink != 1:
        raise BadRequest(f"staged file has {st.st_nlink} hard links; refusing it: {filename}")


def ingest_targets(args: Mapping[str, Any], ctx: OpContext) -> list[str]:
    """The destination's would-be real path and the staged file's path."""
    config = ctx.config
    dest = os.path.join(os.path.realpath(config.storage_root),
                        *_dest_parts(args, config), args["filename"])
    if args["staged"] is None:
        return [dest]
    staged = os.path.join(os.path.realpath(config.upload_staging_dir),
                          *_staged_parts(args), args["filename"])
    return [dest, staged]


# --- file system helpers ----------------------------------------------------

def dir_mode_for(file_mode: int) -> int:
    """Folder mode for a file mode: add ``x`` where ``r`` is set; owner always rwx."""
    mode = file_mode & 0o777
    return mode | ((mode & 0o444) >> 2) | 0o700


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


def _temp_for(filename: str, token: str) -> str:
    # the hidden temp name must still fit in NAME_MAX with the longest filenames
    budget = confine.MAX_COMPONENT - len(temp_name("", token).encode())
    raw = filename.encode("utf-8")
    if len(raw) > budget:
        filename = raw[:budget].decode("utf-8", "ignore")
    return temp_name(filename, token)


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


# --- the operation ----------------------------------------------------------

def _copy_and_publish(ctx: OpContext, sfd: int, ddir: int, dest_dir: str,
                      args: Mapping[str, Any], rel: str,
                      before_publish: Callable[[], None] | None = None) -> tuple[int, str]:
    config = ctx.config
    filename, overwrite = args["filename"], args["overwrite"]
    tname = _temp_for(filename, secrets.token_hex(8))
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


class _Sidecar:
    """``<filename>.json`` (FitsStorage's misc-file metadata) copied beside
    the stored file: written to a temporary file first, put in place only
    once the upload itself is accepted (``commit``, just before the file is
    published: a published file never lacks the .json that describes it, and
    a refused upload changes nothing), else removed (``discard``)."""

    def __init__(self, ctx: OpContext, ddir: int, dest_parts: list[str], name: str,
                 data: bytes) -> None:
        config = ctx.config
        self.ctx, self.ddir, self.name = ctx, ddir, name
        self.rel = "/".join([*dest_parts, name])
        self.tname = _temp_for(name, secrets.token_hex(8))
        self.tpath = os.path.join(os.path.realpath(config.storage_root), *dest_parts,
                                  self.tname)
        register_temp(ctx.work_dir, self.tpath, config.durable)
        self.open = True
        try:
            fd = os.open(self.tname, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, config.file_mode & 0o777, dir_fd=ddir)
            try:
                os.fchmod(fd, config.file_mode)
                os.write(fd, data)
                if config.durable:
                    faults.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        if not self.open:
            return
        try:
            st = os.stat(self.name, dir_fd=self.ddir, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise Conflict(f"{self.rel} exists and is not a regular file")
        except FileNotFoundError:
            pass
        os.rename(self.tname, self.name, src_dir_fd=self.ddir, dst_dir_fd=self.ddir)
        self.open = False
        forget_temp(self.ctx.work_dir, self.tpath)

    def discard(self) -> None:
        if not self.open:
            return
        try:
            os.unlink(self.tname, dir_fd=self.ddir)
        except FileNotFoundError:
            pass
        self.open = False
        forget_temp(self.ctx.work_dir, self.tpath)


def _stage_sidecar(ctx: OpContext, sdir: int, ddir: int, dest_parts: list[str],
                   filename: str) -> _Sidecar | None:
    """The upload's metadata, staged beside the target; None when it has none."""
    name = filename + SIDECAR
    if len(name.encode()) > confine.MAX_COMPONENT:
        return None
    try:
        st = os.stat(name, dir_fd=sdir, follow_symlinks=False)
    except FileNotFoundError:
        return None
    _check_staged_stat(st, name)
    src = confine.open_file(sdir, name, what="staged metadata")
    try:
        # the size of what was opened, not of what the name held a moment ago
        if os.fstat(src).st_size > MAX_SIDECAR:
            raise BadRequest(f"{name} is more than {MAX_SIDECAR} bytes for metadata")
        data = os.pread(src, MAX_SIDECAR + 1, 0)
    finally:
        os.close(src)
    if len(data) > MAX_SIDECAR:
        raise BadRequest(f"{name} is more than {MAX_SIDECAR} bytes for metadata")
    return _Sidecar(ctx, ddir, dest_parts, name, data)


def _remove_staged_sidecar(ctx: OpContext, sdir: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=sdir)
    except OSError as exc:
        ctx.log.warning("event=ingest_staged_not_removed filename=%s request=%s error=%r",
                        name, ctx.request_id, exc)


def _remove_staged(ctx: OpContext, sdir: int, sfd: int, filename: str) -> None:
    """Unlink the staged name, but only if it still is the file we copied.

    The file is already published: a failure here is logged, not raised,
    since the client must not believe the ingest failed and retry it.
    """
    faults.hit("ingest.before_staged_unlink")
    try:
        st = os.stat(filename, dir_fd=sdir, follow_symlinks=False)
        ours = os.fstat(sfd)
        if (st.st_dev, st.st_ino) != (ours.st_dev, ours.st_ino):
            ctx.log.warning("event=ingest_staged_replaced filename=%s request=%s: staged "
                            "name now points at another file; left in place",
                            filename, ctx.request_id)
            return
        os.unlink(filename, dir_fd=sdir)
        faults.hit("ingest.after_staged_unlink")
        if ctx.config.durable:
            faults.fsync(sdir)
    except OSError as exc:
        ctx.log.warning("event=ingest_staged_not_removed filename=%s request=%s error=%r",
                        filename, ctx.request_id, exc)


def run_ingest(ctx: OpContext, args: dict[str, Any]) -> dict[str, Any]:
    """Copy, verify, publish, then remove the staged file (see the module doc)."""
    config = ctx.config
    filename = args["filename"]
    dest_parts = _dest_parts(args, config)
    rel = "/".join([*dest_parts, filename])
    if args["staged"] is None:          # published by a run a crash cut off
        return _published_before(ctx, dest_parts, rel, filename)
    sdir = confine.open_dir(config.upload_staging_dir, _staged_parts(args))
    try:
        sfd = confine.open_file(sdir, filename, what="staged file")
        try:
            ddir = confine.open_dir(config.storage_root, dest_parts, True,
                                  dir_mode_for(config.file_mode), config.durable)
            staged_meta = _stage_sidecar(ctx, sdir, ddir, dest_parts, filename)
            sidecar = None if staged_meta is None else staged_meta.rel
            commit_meta = staged_meta.commit if staged_meta is not None else None
            try:
                already = _same_as_target(ctx, ddir, sfd, filename, args, rel)
                if already is None:
                    dest_dir = os.path.join(os.path.realpath(config.storage_root),
                                            *dest_parts)
                    size, md5 = _copy_and_publish(ctx, sfd, ddir, dest_dir, args, rel,
                                                  before_publish=commit_meta)
                else:
                    size, md5 = already
                    if commit_meta is not None:
                        commit_meta()
            finally:
                if staged_meta is not None:
                    staged_meta.discard()      # refused: the stored metadata stays
                os.close(ddir)
            if already is None:
                ctx.log.info("event=ingest_published path=%s size=%d md5=%s request=%s",
                             rel, size, md5, ctx.request_id)
            ctx.memo.put("published", {"path": rel, "size": size, "md5": md5,
                                       "place": args["staged"], "sidecar": sidecar})
            _remove_staged(ctx, sdir, sfd, filename)
            if sidecar is not None:
                _remove_staged_sidecar(ctx, sdir, filename + SIDECAR)
        finally:
            os.close(sfd)
    finally:
        os.close(sdir)
    return _result(ctx, filename, rel, size, md5, already is not None, sidecar)


def _result(ctx: OpContext, filename: str, rel: str, size: int, md5: str, already: bool,
            sidecar: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {"filename": filename, "path": rel, "size": size, "md5": md5}
    if already:
        result["already"] = True
    replaced = ctx.memo.get("replacing")
    if replaced == "":
        result["replaced"] = True       # a file the submitter may not read: no md5
    elif replaced is not None and replaced != md5:
        result["replaced_md5"] = replaced
    if sidecar is not None:
        result["sidecar"] = sidecar
    return result


def _same_as_target(ctx: OpContext, ddir: int, sfd: int, filename: str,
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
    if not _readable_by(ctx.config.storage_root, rel, st, ctx.user):
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
        target_md5 = _md5_of(tfd)
    finally:
        os.close(tfd)
    if st.st_size == staged.st_size and target_md5 == _md5_of(sfd) and \
            args["md5"] in (None, target_md5):
        return st.st_size, target_md5
    if not args["overwrite"]:
        raise Conflict(f"target already exists with other contents: {rel} (set overwrite"
                       " to replace it)")
    ctx.memo.put("replacing", target_md5)   # what the reply reports it replaced
    return None


def _readable_by(root: Any, rel: str, st: os.stat_result, user: str) -> bool:
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


def _md5_of(fd: int) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def _published_before(ctx: OpContext, dest_parts: list[str], rel: str,
                      filename: str) -> dict[str, Any]:
    """A re-run after a crash: the earlier run noted what it published, and
    the target still holds it (the staged file is gone)."""
    note = ctx.memo.get("published")
    ddir = confine.open_dir(ctx.config.storage_root, dest_parts)
    try:
        tfd = confine.open_file(ddir, filename, what="target")
        try:
            size, md5 = os.fstat(tfd).st_size, _md5_of(tfd)
        finally:
            os.close(tfd)
    finally:
        os.close(ddir)
    if note.get("path") != rel or (size, md5) != (note.get("size"), note.get("md5")):
        raise Conflict(f"{rel} no longer holds what this request published; the staged"
                       " file is gone")
    sidecar = note.get("sidecar")
    if sidecar is not None and isinstance(note.get("place"), str):
        # cut off between removing the staged file and its metadata
        try:
            sdir = confine.open_dir(ctx.config.upload_staging_dir, confine.split_relative(
                note["place"], "path", allow_empty=True))
        except OpError:
            pass
        else:
            try:
                if os.path.lexists(f"/proc/self/fd/{sdir}/{filename}{SIDECAR}"):
                    _remove_staged_sidecar(ctx, sdir, filename + SIDECAR)
            finally:
                os.close(sdir)
    return _result(ctx, filename, rel, size, md5, True, sidecar)


INGEST_UPLOAD = Operation(
    name="ingest_upload",
    run=run_ingest,
    validate=validate_ingest,
    targets=ingest_targets,
    allowed_users=SITE_DEFAULT,
    idempotent=True,
    follow_up=True,
    description="Copy a staged upload into storage_root (md5-checked, fsynced, "
                "published atomically), then remove the staged file.",
    schema={"filename": "file name in upload_staging_dir",
            "path": "folder below storage_root, and below upload_staging_dir where"
                    " it was staged (optional)",
            "processed_cal": "bool (optional): to processed_cals_path",
            "md5": "expected md5, 32 hex digits (optional)",
            "overwrite": "bool (optional, default false)",
            "fileuploadlog_id": "int (optional): passed on to the follow-up hooks",
            "batch": "any (optional): passed on to the follow-up hooks"},
)
