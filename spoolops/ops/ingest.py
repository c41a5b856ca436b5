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

This module is the operation: its arguments, targets and the order of the
steps.  The steps live beside it: ``ingest_staged`` (finding and removing
the staged file), ``ingest_existing`` (a target already there),
``ingest_sidecar`` (FitsStorage's ``.json``) and ``ingest_publish`` (the
copy and its atomic publication).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .. import confine
from ..config import Config
from ..errors import BadRequest, Conflict, NotFound, OpError
from . import SITE_DEFAULT, OpContext, Operation
from . import args as check
from .ingest_existing import md5_of, same_as_target
from .ingest_publish import copy_and_publish
from .ingest_sidecar import SIDECAR, remove_staged_sidecar, stage_sidecar
from .ingest_staged import find_staged, remove_staged

_ARGS = ("filename", "path", "processed_cal", "md5", "overwrite", "fileuploadlog_id",
         "batch")


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
        clean["staged"] = find_staged(ctx.config, clean)
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


def dir_mode_for(file_mode: int) -> int:
    """Folder mode for a file mode: add ``x`` where ``r`` is set; owner always rwx."""
    mode = file_mode & 0o777
    return mode | ((mode & 0o444) >> 2) | 0o700


# --- the operation ----------------------------------------------------------

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
            staged_meta = stage_sidecar(ctx, sdir, ddir, dest_parts, filename)
            sidecar = None if staged_meta is None else staged_meta.rel
            commit_meta = staged_meta.commit if staged_meta is not None else None
            try:
                already = same_as_target(ctx, ddir, sfd, filename, args, rel)
                if already is None:
                    dest_dir = os.path.join(os.path.realpath(config.storage_root),
                                            *dest_parts)
                    size, md5 = copy_and_publish(ctx, sfd, ddir, dest_dir, args, rel,
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
            remove_staged(ctx, sdir, sfd, filename)
            if sidecar is not None:
                remove_staged_sidecar(ctx, sdir, filename + SIDECAR)
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


def _published_before(ctx: OpContext, dest_parts: list[str], rel: str,
                      filename: str) -> dict[str, Any]:
    """A re-run after a crash: the earlier run noted what it published, and
    the target still holds it (the staged file is gone)."""
    note = ctx.memo.get("published")
    ddir = confine.open_dir(ctx.config.storage_root, dest_parts)
    try:
        tfd = confine.open_file(ddir, filename, what="target")
        try:
            size, md5 = os.fstat(tfd).st_size, md5_of(tfd)
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
                    remove_staged_sidecar(ctx, sdir, filename + SIDECAR)
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
