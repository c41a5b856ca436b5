"""Apply header edits to a stored FITS file, crash-atomically.

Trusts: ``storage_root`` (configuration) and ``work_dir`` (the worker's own).
Distrusts: ``filename`` (confined with ``spoolops.confine``: no links, no
escape) and the file's content (may be damaged: ``OpFailed``, never a write).
Three ways to write, chosen per file:

* in place (plain ``.fits`` of at least ``INPLACE_MIN_BYTES`` whose edited
  header keeps its block count): only the header blocks are rewritten, under
  the rollback journal of ``journal.py``; the data unit is never read unless
  an md5 is asked for (``before_md5`` or ``md5``);
* copy (other plain files): a temporary file beside the original receives the
  bytes before the header, the new header, and the rest copied verbatim;
* compressed (``.gz``/``.bz2``): see ``compress.py``; if the file's first
  stream ends exactly after the edited header (a file spoolops wrote), only
  that stream is recompressed and the other compressed bytes are copied.

A temporary file is registered with ``spoolops.workhome.temps`` before it exists,
fsynced, given the original's owner, group and mode, and renamed over it.
Data bytes are copied, never decoded, so they cannot change.  DATASUM is kept
(the data are unchanged, and recomputing it would hide a corruption it should
reveal); CHECKSUM is recomputed from the new header's sum and DATASUM.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from .. import confine
from .. import faults as fault
from ..errors import BadRequest, Conflict, OpFailed
from ..workhome.temps import forget_temp, register_temp, temp_name
from . import cards, checksum, compress, journal
from .layout import Hdu, scan

INPLACE_MIN_BYTES = 4 * 1024 * 1024   # below this a copy is cheap and keeps readers safe
COPY_CHUNK = 8 * 1024 * 1024
PREFIX_LIMIT = 64 * 1024 * 1024       # largest first stream held in memory for a repeat edit


class Source:
    """Sequential reads of an fd by ``pread`` (the fd's offset is never used)."""

    def __init__(self, fd: int, size: int, pos: int = 0, md5: Any = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.fd, self.size, self.pos, self.md5 = fd, size, pos, md5
        self.progress = progress

    def read(self, n: int) -> bytes:
        data = os.pread(self.fd, min(n, COPY_CHUNK), self.pos)
        self.pos += len(data)
        if self.md5 is not None:
            self.md5.update(data)
        if self.progress is not None:
            self.progress(self.pos, self.size)
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise OpFailed("file is truncated inside a data unit")
        self.pos += n

    def chunks(self, end: int) -> Iterator[bytes]:
        while self.pos < end:
            data = self.read(min(COPY_CHUNK, end - self.pos))
            if not data:
                raise OpFailed("file shrank while being read")
            yield data


def _md5_of(fd: int, size: int) -> str:
    md5 = hashlib.md5()
    for _ in Source(fd, size, md5=md5).chunks(size):
        pass
    return md5.hexdigest()


def _discard(read: Callable[[int], bytes]) -> Callable[[int], None]:
    def skip(count: int) -> None:
        while count:
            data = read(min(count, COPY_CHUNK))
            if not data:
                raise OpFailed("file is truncated inside a data unit")
            count -= len(data)
    return skip


def _datasum(old: bytes, new: bytes, read_data: Callable[[], Iterator[bytes]]) -> int:
    stored = cards.stored_datasum(old)
    if stored is not None:
        return stored
    total = 0
    for chunk in read_data():
        total = checksum.sum32(chunk, total)
    return total


class _Temp:
    """A registered temporary file beside the target, published by rename."""

    def __init__(self, work_dir: Path, dfd: int, dir_real: str, name: str,
                 token: str, durable: bool) -> None:
        self.work_dir, self.dfd, self.durable, self.target = work_dir, dfd, durable, name
        self.name = temp_name(name, token or secrets.token_hex(6))
        self.path = os.path.join(dir_real, self.name)
        register_temp(work_dir, self.path, durable)
        self.fd = confine.open_file(dfd, self.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                    0o600, what="temporary file")
        self.md5 = hashlib.md5()

    def write(self, data: bytes) -> None:
        self.md5.update(data)
        fault.write(self.fd, data)

    def publish(self, st: os.stat_result) -> int:
        tst = os.fstat(self.fd)
        if (tst.st_uid, tst.st_gid) != (st.st_uid, st.st_gid):
            try:
                os.fchown(self.fd, st.st_uid, st.st_gid)
            except PermissionError:
                raise OpFailed(f"cannot give the new file owner {st.st_uid}:{st.st_gid}; "
                               "original left untouched") from None
        os.fchmod(self.fd, stat.S_IMODE(st.st_mode))   # after chown, which clears set-id bits
        if self.durable:
            fault.fsync(self.fd)
        size = os.fstat(self.fd).st_size
        os.close(self.fd)
        self.fd = -1
        os.replace(self.name, self.target, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        if self.durable:
            fault.fsync(self.dfd)
        forget_temp(self.work_dir, self.path)
        return size

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.name, dir_fd=self.dfd)
        except FileNotFoundError:
            pass
        forget_temp(self.work_dir, self.path)


def update_file(storage_root: Path, filename: str, edits: list[cards.Edit], *,
                work_dir: Path, durable: bool = True, reject_new: bool | Collection[str] = False,
                before_md5: str | None = None, hdu: int = 0, want_md5: bool = False,
                token: str = "", inplace_min: int | None = None,
                progress: Callable[[int, int], None] | None = None,
                layout: str = "single") -> dict[str, Any]:
    """Edit one HDU's header of ``storage_root/filename``; returns the op result.

    ``progress(done, total)`` is called with the bytes of the stored file
    read so far whenever the file is copied (the op throttles it)."""
    parts = confine.split_relative(filename, "filename")
    kind = compress.kind_of(parts[-1])
    if kind == "?":
        raise BadRequest("filename must end in .fits, .fits.gz or .fits.bz2")
    dfd = confine.open_dir(storage_root, parts[:-1])
    try:
        fd = confine.open_file(dfd, parts[-1], os.O_RDONLY)
        try:
            job = _Job(storage_root, parts, dfd, fd, work_dir, durable, token)
            job.progress, job.layout = progress, layout
            if inplace_min is None:
                inplace_min = INPLACE_MIN_BYTES
            return job.run(kind, edits, reject_new, before_md5, hdu, want_md5, inplace_min)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


class _Job:
    def __init__(self, root: Path, parts: list[str], dfd: int, fd: int,
                 work_dir: Path, durable: bool, token: str) -> None:
        self.parts, self.name, self.dfd, self.fd = parts, parts[-1], dfd, fd
        self.work_dir, self.durable, self.token = Path(work_dir), durable, token
        self.dir_real = os.path.join(os.path.realpath(root), *parts[:-1])
        self.real_path = os.path.join(self.dir_real, self.name)
        self.st = os.fstat(fd)
        self.progress: Callable[[int, int], None] | None = None
        self.layout = "single"

    def result(self, modified: bool, before: str | None, after: str | None, size: int,
               changes: list) -> dict[str, Any]:
        return {"filename": "/".join(self.parts), "modified": modified,
                "md5_before": before, "md5_after": after, "size": size,
                "changes": changes}

    def run(self, kind: str, edits: list[cards.Edit], reject_new: bool | Collection[str],
            before_md5: str | None, hdu: int, want_md5: bool, inplace_min: int
            ) -> dict[str, Any]:
        pending = journal.journal_path(self.work_dir, self.real_path)
        if pending.exists():     # a crash left it and recovery has not run yet
            journal.recover_one(pending, self.durable)
            self.st = os.fstat(self.fd)
        md5 = None
        if before_md5 is not None or want_md5:
            md5 = _md5_of(self.fd, self.st.st_size)
            if before_md5 is not None and md5 != before_md5:
                raise Conflict(f"md5 of {self.name} is {md5}, not {before_md5}")
        if kind:
            return self._compressed(kind, edits, reject_new, hdu, md5)
        return self._plain(edits, reject_new, hdu, md5, inplace_min)

    # -- plain FITS -------------------------------------------------------
    def _plain(self, edits: list[cards.Edit], reject_new: bool | Collection[str], hdu: int,
               md5: str | None, inplace_min: int) -> dict[str, Any]:
        size = self.st.st_size
        src = Source(self.fd, size)
        target = scan(src.read, src.skip, hdu)[-1]
        if target.end > size:
            raise OpFailed(f"file is truncated inside HDU {hdu}'s data")
        new, changes = cards.apply_edits(target.header, edits, reject_new)
        if not changes:
            return self.result(False, md5, md5, size, [])
        if cards.has_checksum(new):
            new = cards.seal(new, _datasum(target.header, new, lambda: Source(
                self.fd, size, target.data_offset).chunks(target.end)))
        if len(new) == len(target.header) and size >= inplace_min:
            return self._in_place(target, new, md5, changes)
        tmp = _Temp(self.work_dir, self.dfd, self.dir_real, self.name, self.token,
                    self.durable)
        try:
            before = hashlib.md5()
            src = Source(self.fd, size, md5=before, progress=self.progress)
            for chunk in src.chunks(target.header_offset):
                tmp.write(chunk)
            before.update(target.header)
            tmp.write(new)
            src.pos = target.data_offset
            for chunk in src.chunks(size):
                tmp.write(chunk)
            out_size = tmp.publish(self.st)
        except BaseException:
            tmp.discard()
            raise
        return self.result(True, before.hexdigest(), tmp.md5.hexdigest(), out_size, changes)

    def _in_place(self, target: Hdu, new: bytes, md5: str | None, changes: list
                  ) -> dict[str, Any]:
        after = None
        if md5 is not None:      # asked for: one pass, substituting the new header
            h = hashlib.md5()
            src = Source(self.fd, self.st.st_size)
            for chunk in src.chunks(target.header_offset):
                h.update(chunk)
            h.update(new)
            src.pos = target.data_offset
            for chunk in src.chunks(self.st.st_size):
                h.update(chunk)
            after = h.hexdigest()
        wfd = confine.open_file(self.dfd, self.name, os.O_RDWR)
        try:
            wst = os.fstat(wfd)
            if (wst.st_dev, wst.st_ino) != (self.st.st_dev, self.st.st_ino):
                raise OpFailed(f"{self.name} was replaced while being edited")
            jpath = journal.write_journal(self.work_dir, self.real_path, wst,
                                          target.header_offset, target.header, new,
                                          self.durable)
            fault.pwrite(wfd, new, target.header_offset)
            if self.durable:
                fault.fsync(wfd)
            journal.remove_journal(jpath, self.durable)
        finally:
            os.close(wfd)
        return self.result(True, md5, after, self.st.st_size, changes)

    # -- gzip / bzip2 -----------------------------------------------------
    def _compressed(self, kind: str, edits: list[cards.Edit], reject_new: bool | Collection[str],
                    hdu: int, md5: str | None) -> dict[str, Any]:
        size = self.st.st_size
        if os.pread(self.fd, 3, 0)[:len(compress.MAGIC[kind])] != compress.MAGIC[kind]:
            raise OpFailed(f"{self.name} is not {kind} data")
        dec = compress.Decompressed(kind, Source(self.fd, size, progress=self.progress).read)
        target = scan(dec.read, _discard(dec.read), hdu)[-1]
        new, changes = cards.apply_edits(target.header, edits, reject_new)
        if not changes:
            return self.result(False, md5, md5, size, [])

        def data() -> Iterator[bytes]:
            left = target.data_len
            while left:
                chunk = dec.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise OpFailed(f"file is truncated inside HDU {hdu}'s data")
                left -= len(chunk)
                yield chunk
        if cards.has_checksum(new):
            new = cards.seal(new, _datasum(target.header, new, data))
        first = None
        if self.layout == "streams" and target.data_offset <= PREFIX_LIMIT:
            first = compress.first_stream(kind, Source(self.fd, size).read, target.data_offset)
        tmp = _Temp(self.work_dir, self.dfd, self.dir_real, self.name, self.token,
                    self.durable)
        try:
            before = hashlib.md5()
            if first is not None and len(first[0]) == target.data_offset:
                prefix, raw_len = first
                tmp.write(compress.compress(kind, prefix[:target.header_offset] + new))
                src = Source(self.fd, size, md5=before, progress=self.progress)
                before.update(os.pread(self.fd, raw_len, 0))
                src.pos = raw_len
                for chunk in src.chunks(size):
                    tmp.write(chunk)
            else:
                # decompress and recompress on a thread at nice 10, like the
                # compressors: seconds of CPU must not delay other requests
                compress.in_background(self._recompress, kind, tmp, target, new, before)
            out_size = tmp.publish(self.st)
        except BaseException:
            tmp.discard()
            raise
        return self.result(True, before.hexdigest(), tmp.md5.hexdigest(), out_size, changes)

    def _recompress(self, kind: str, tmp: _Temp, target: Hdu, new: bytes, before: Any
                    ) -> None:
        src = Source(self.fd, self.st.st_size, md5=before, progress=self.progress)
        dec = compress.Decompressed(kind, src.read)
        lead = compress.Compressor(kind)
        left = target.header_offset
        while left:
            chunk = dec.read(min(left, COPY_CHUNK))
            if not chunk:
                raise OpFailed("file is truncated")
            left -= len(chunk)
            tmp.write(lead.feed(chunk))
        if dec.read(len(target.header)) != target.header:
            raise OpFailed("file changed while being edited")
        tmp.write(lead.feed(new))

        def rest() -> Iterator[bytes]:
            while chunk := dec.read(compress.CHUNK):
                yield chunk
        if self.layout == "streams":
            tmp.write(lead.finish())
            for stream in compress.parallel_compress(kind, rest()):
                tmp.write(stream)
        else:  # one stream, as bzip2/gzip write it: every reader, cfitsio too, reads it
            for piece in compress.single_stream(lead, rest()):
                tmp.write(piece)
        while src.read(COPY_CHUNK):    # hash any bytes the decoder did not need
            pass

