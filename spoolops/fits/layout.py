"""Where the HDUs of a FITS byte stream are: header blocks and data sizes.

Trusts nothing: the bytes come from a data file that may be truncated or not
FITS at all.  Damage raises ``OpFailed`` (the file, not the request, is at
fault); asking for an HDU past the last one raises ``BadRequest``.  Works on
any ``read(n) -> bytes`` source, so compressed streams and plain files share
it; data units are skipped through a ``skip(n)`` callable that may copy them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BadRequest, OpFailed
from .cards import BLOCK, parse_header

MAX_HEADER_BLOCKS = 2000   # 5.8 MB of cards: anything bigger is not a header


@dataclass
class Hdu:
    index: int
    header_offset: int
    header: bytes          # whole blocks, END included
    data_len: int          # padded to whole blocks

    @property
    def data_offset(self) -> int:
        return self.header_offset + len(self.header)

    @property
    def end(self) -> int:
        return self.data_offset + self.data_len


def _read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_header(read: Callable[[int], bytes], index: int, offset: int) -> Hdu | None:
    """The header starting at ``offset``; None at a clean end of file."""
    blocks = []
    while True:
        block = _read_exact(read, BLOCK)
        if not blocks:
            if not block or (index > 0 and not block.startswith(b"XTENSION=")):
                return None    # end of file (or trailing padding): no such HDU
            if index == 0 and not block.startswith(b"SIMPLE  ="):
                raise OpFailed("not a FITS file (no SIMPLE card)")
        if len(block) < BLOCK:
            raise OpFailed(f"file is truncated inside the header of HDU {index}")
        blocks.append(block)
        if any(block[i:i + 8] == b"END     " for i in range(0, BLOCK, 80)):
            break
        if len(blocks) >= MAX_HEADER_BLOCKS:
            raise OpFailed(f"no END card in the header of HDU {index}")
    header = b"".join(blocks)
    return Hdu(index, offset, header, data_length(header, index))


def data_length(header: bytes, index: int) -> int:
    """Size of the data unit (padded), from BITPIX/NAXISn/PCOUNT/GCOUNT."""
    hdr = parse_header(header)
    try:
        bitpix = int(hdr["BITPIX"])
        naxis = int(hdr["NAXIS"])
        dims = [int(hdr[f"NAXIS{i}"]) for i in range(1, naxis + 1)]
        pcount = int(hdr.get("PCOUNT", 0))
        gcount = int(hdr.get("GCOUNT", 1))
    except (KeyError, ValueError, TypeError) as exc:
        raise OpFailed(f"HDU {index} has a malformed structural keyword: {exc}") from None
    if bitpix not in (8, 16, 32, 64, -32, -64) or naxis < 0 or naxis > 999 \
            or any(d < 0 for d in dims) or pcount < 0 or gcount < 0:
        raise OpFailed(f"HDU {index} has impossible BITPIX/NAXIS/PCOUNT/GCOUNT values")
    if naxis == 0:
        return 0
    if index == 0 and dims[0] == 0 and hdr.get("GROUPS") is True:
        dims = dims[1:]            # random groups: NAXIS1 = 0 is a placeholder
    size = abs(bitpix) // 8 * gcount * (pcount + math.prod(dims))
    return size + (-size % BLOCK)


def scan(read: Callable[[int], bytes], skip: Callable[[int], None], hdu: int) -> list[Hdu]:
    """Headers of HDUs 0..hdu, reading sequentially; data of earlier HDUs is
    passed to ``skip`` (which must consume exactly that many bytes)."""
    found: list[Hdu] = []
    offset = 0
    for index in range(hdu + 1):
        h = read_header(read, index, offset)
        if h is None:
            raise BadRequest(f"hdu {hdu} is beyond the file, which has {index} HDU(s)")
        found.append(h)
        if index < hdu:
            skip(h.data_len)
        offset = h.end
    return found
