"""gzip/bzip2: read any, write one stream or concatenated streams.

Two layouts, chosen by ``[storage] compressed_layout``:

``single`` (the default)
    one stream/member, as ``bzip2``/``gzip`` write it.  Every reader takes
    it -- cfitsio too (fitsverify, ds9, ...), which reads only the first
    stream of a concatenated file.  The compressor runs on a second thread,
    overlapping the decompression of the original.
``streams``
    a sequence of independent streams: the first holds every byte up to the
    end of the edited HDU's header, the rest ``CHUNK``-sized pieces compressed
    on two threads at nice 10 (zlib and bz2 release the GIL).  gzip, bzip2,
    Python and astropy read such files as one; cfitsio does not.  A later
    edit of the same HDU recompresses only the first stream and copies the
    others byte for byte (``first_stream`` finds where it ends).

Trusts nothing: compressed input may be damaged; errors become ``OpFailed``.
"""

from __future__ import annotations

import bz2
import os
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import OpFailed

T = TypeVar("T")

CHUNK = 1024 * 1024   # small pieces keep both cores busy to the end (0.04% larger)
WORKERS = 2
GZIP_LEVEL = 6
BZ2_LEVEL = 9
MAGIC = {"gz": b"\x1f\x8b", "bz2": b"BZh"}


def kind_of(name: str) -> str:
    """'' for plain FITS, 'gz' or 'bz2'; anything else is not ours to edit."""
    lower = name.lower()
    for suffix, kind in ((".fits", ""), (".fits.gz", "gz"), (".fits.bz2", "bz2")):
        if lower.endswith(suffix):
            return kind
    return "?"


def _decompressor(kind: str):
    return bz2.BZ2Decompressor() if kind == "bz2" else zlib.decompressobj(31)


def compress(kind: str, data: bytes) -> bytes:
    """One complete, independent stream/member."""
    if kind == "bz2":
        return bz2.compress(data, BZ2_LEVEL)
    comp = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


class Compressor:
    """One stream fed incrementally (for the leading header stream)."""

    def __init__(self, kind: str) -> None:
        self._c = (bz2.BZ2Compressor(BZ2_LEVEL) if kind == "bz2"
                   else zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31))

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def finish(self) -> bytes:
        return self._c.flush()


_niced = threading.local()


def lower_priority() -> None:
    """Run the calling thread at nice 10, once (threads made per call die with it):
    a long edit must not starve the worker's dispatch thread of a core.

    Not lower: a thread of this process may hold the GIL when it is
    preempted, and the dispatch thread then waits until it runs again.
    SCHED_IDLE (or nice 19) made echo p99 during an edit 15-20 % better on an
    idle machine, but on a machine kept busy by other processes such a
    thread gets 0.3 % (1.5 %) of a core, and the whole worker could stall
    behind it for a second."""
    if not getattr(_niced, "done", False):
        _niced.done = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass


def _compress_in_background(kind: str, data: bytes) -> bytes:
    lower_priority()
    return compress(kind, data)


def in_background(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a fresh thread at nice 10 (its result or exception)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_niced_call, fn, *args).result()


def _niced_call(fn: Callable[..., T], *args: Any) -> T:
    lower_priority()
    return fn(*args)


def parallel_compress(kind: str, chunks: Iterable[bytes], workers: int = WORKERS
                      ) -> Iterator[bytes]:
    """Compressed streams for ``chunks``, in order, at most 2*workers in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_compress_in_background, kind, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def single_stream(comp: Compressor, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Finish the stream ``comp`` with ``chunks``, compressing on a second
    thread while the caller produces the next chunk (decompression and
    compression both release the GIL, so the two overlap on two cores)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for chunk in chunks:
            if pending is not None:
                yield pending.result()
            pending = pool.submit(_niced_call, comp.feed, chunk)  # in order, one at a time
        if pending is not None:
            yield pending.result()
    yield comp.finish()


class _OneStream:
    """Decompress a single stream/member, ``max_length`` bytes at a time."""

    def __init__(self, kind: str, read_raw: Callable[[int], bytes], pending: bytes) -> None:
        self.kind = kind
        self.dec = _decompressor(kind)
        self.read_raw = read_raw
        self.pending = pending
        self.raw_in = len(pending)      # raw bytes handed to this stream so far

    def _more(self) -> bytes:
        data = self.read_raw(1 << 16)
        self.raw_in += len(data)
        if not data:
            raise OpFailed("compressed file is truncated")
        return data

    def step(self, max_length: int) -> bytes:
        try:
            if self.kind == "bz2":
                if self.dec.needs_input:
                    data, self.pending = self.pending or self._more(), b""
                else:
                    data = b""
                return self.dec.decompress(data, max_length)
            data = self.pending or self._more()
            out = self.dec.decompress(data, max_length)
            self.pending = self.dec.unconsumed_tail
            return out
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise OpFailed(f"compressed data is damaged: {exc}") from None

    @property
    def eof(self) -> bool:
        return self.dec.eof

    @property
    def leftover(self) -> bytes:
        return self.dec.unused_data

    @property
    def raw_len(self) -> int:
        """Length of this stream in the file (valid once ``eof``)."""
        return self.raw_in - len(self.dec.unused_data)


def first_stream(kind: str, read_raw: Callable[[int], bytes], limit: int
                 ) -> tuple[bytes, int] | None:
    """(decompressed bytes, compressed length) of the first stream, or None
    if it decompresses to more than ``limit`` bytes."""
    one = _OneStream(kind, read_raw, b"")
    out, got = [], 0
    while not one.eof:
        data = one.step(limit + 1 - got)
        out.append(data)
        got += len(data)
        if got > limit:
            return None
    return b"".join(out), one.raw_len


class Decompressed:
    """``read(n)`` over the decompressed bytes of concatenated streams."""

    def __init__(self, kind: str, read_raw: Callable[[int], bytes]) -> None:
        self._kind = kind
        self._read_raw = read_raw
        self._one: _OneStream | None = _OneStream(kind, read_raw, b"")
        self._buf = bytearray()

    def read(self, n: int) -> bytes:
        while len(self._buf) < n and self._one is not None:
            if self._one.eof:
                self._next_stream()
            else:
                self._buf += self._one.step(max(n - len(self._buf), 1 << 16))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _next_stream(self) -> None:
        rest = self._one.leftover or self._read_raw(1 << 16)
        if not rest:
            self._one = None
            return
        if self._kind == "gz" and not rest.strip(b"\0"):
            while rest:   # gzip allows zero padding after the last member
                if rest.strip(b"\0"):
                    raise OpFailed("garbage after the last gzip member")
                rest = self._read_raw(1 << 16)
            self._one = None
            return
        self._one = _OneStream(self._kind, self._read_raw, rest)
