"""An upload's sidecar: FitsStorage's ``<filename>.json`` beside a misc file.

FitsStorage stages a misc file's metadata as ``<filename>.json`` beside the
upload.  ``ingest_upload`` copies it beside the stored file (``Sidecar``: in
place just before the file is published, never after) and removes the staged
one after the staged file.

Trusts: the open folders it is given (opened by the caller through
``spoolops.confine``) and the worker's ``work/``.  Distrusts: the staged
.json, which the web user can write: it must be a regular file with one
link, and at most ``MAX_SIDECAR`` bytes of what was opened are read.
"""

from __future__ import annotations

import os
import secrets
import stat

from .. import confine, faults
from ..errors import BadRequest, Conflict
from ..workhome.temps import forget_temp, register_temp
from . import OpContext
from .ingest_publish import temp_for
from .ingest_staged import check_staged_stat

SIDECAR = ".json"
MAX_SIDECAR = 1 << 20


class Sidecar:
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
        self.tname = temp_for(name, secrets.token_hex(8))
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


def stage_sidecar(ctx: OpContext, sdir: int, ddir: int, dest_parts: list[str],
                  filename: str) -> Sidecar | None:
    """The upload's metadata, staged beside the target; None when it has none."""
    name = filename + SIDECAR
    if len(name.encode()) > confine.MAX_COMPONENT:
        return None
    try:
        st = os.stat(name, dir_fd=sdir, follow_symlinks=False)
    except FileNotFoundError:
        return None
    check_staged_stat(st, name)
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
    return Sidecar(ctx, ddir, dest_parts, name, data)


def remove_staged_sidecar(ctx: OpContext, sdir: int, name: str) -> None:
    """Unlink the staged .json ``name``; a failure is logged, not raised (the
    upload is published already)."""
    try:
        os.unlink(name, dir_fd=sdir)
    except OSError as exc:
        ctx.log.warning("event=ingest_staged_not_removed filename=%s request=%s error=%r",
                        name, ctx.request_id, exc)
