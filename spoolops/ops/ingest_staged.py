"""The staged upload of ``ingest_upload``: finding it, and removing it.

The upload is staged as ``upload_staging_dir/<path>/<filename>`` (where
FitsStorage's current web code writes it) or ``upload_staging_dir/
<filename>`` (its older code); both present is a ``Conflict``.  It must be a
regular file with one link.  Once published, its name is unlinked only if it
still points at the file that was copied.

Trusts: the configured ``upload_staging_dir``.  Distrusts: its contents,
which the web user can write -- every folder is walked with
``spoolops.confine`` (no symbolic link at any level), and a file is looked at
with ``lstat`` before it is opened.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import Any

from .. import confine, faults
from ..config import Config
from ..errors import BadRequest, Conflict, NotFound
from . import OpContext


def find_staged(config: Config, args: Mapping[str, Any]) -> str:
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
    check_staged_stat(st, args["filename"])
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


def check_staged_stat(st: os.stat_result, filename: str) -> None:
    """``BadRequest`` unless ``st`` (an lstat) is a regular file with one link:
    a link would let the web user have the worker copy or remove another file."""
    if stat.S_ISLNK(st.st_mode):
        raise BadRequest(f"staged file is a symbolic link; refusing it: {filename}")
    if not stat.S_ISREG(st.st_mode):
        raise BadRequest(f"staged file is not a regular file: {filename}")
    if st.st_nlink != 1:
        raise BadRequest(f"staged file has {st.st_nlink} hard links; refusing it: {filename}")


def remove_staged(ctx: OpContext, sdir: int, sfd: int, filename: str) -> None:
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
