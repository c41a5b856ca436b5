"""FITS CHECKSUM/DATASUM arithmetic (FITS standard 4.0, appendix J).

Pure functions over bytes: the 32-bit ones-complement sum of big-endian
words and its 16-character ASCII encoding.  Trusts nothing; reads no files.
Because the sum is additive, an HDU's CHECKSUM can be computed from the sum of
its (new) header plus the stored DATASUM, without reading the data unit.
"""

from __future__ import annotations

ZERO_CHECKSUM = "0000000000000000"
_MASK32 = 0xFFFFFFFF
_EXCLUDE = frozenset((0x3A, 0x3B, 0x3C, 0x3D, 0x3E, 0x3F, 0x40,
                      0x5B, 0x5C, 0x5D, 0x5E, 0x5F, 0x60))


def fold(total: int) -> int:
    """Fold carries back in (ones-complement addition)."""
    while total >> 32:
        total = (total & _MASK32) + (total >> 32)
    return total


def add(a: int, b: int) -> int:
    """Ones-complement sum of two partial sums."""
    return fold(a + b)


def sum32(data: bytes | bytearray | memoryview, start: int = 0) -> int:
    """Ones-complement sum of ``data`` (length a multiple of 4) added to ``start``."""
    # numpy is imported here, not with the module: it costs a tenth of a
    # second, and every worker, client and CLI start imports the FITS ops
    import numpy as np

    view = memoryview(data)
    if len(view) % 4:
        raise ValueError("checksummed regions are multiples of 4 bytes")
    total = start
    step = 1 << 30   # keeps the uint64 accumulator far from overflow
    for pos in range(0, len(view), step):
        words = np.frombuffer(view[pos:pos + step], dtype=">u4")
        total = fold(total + int(words.sum(dtype=np.uint64)))
    return total


def _encode_byte(byte: int) -> list[int]:
    quotient, remainder = byte // 4 + 0x30, byte % 4
    ch = [quotient + remainder, quotient, quotient, quotient]
    moved = True
    while moved:   # keep the characters alphanumeric, as the standard requires
        moved = False
        for j in (0, 2):
            if ch[j] in _EXCLUDE or ch[j + 1] in _EXCLUDE:
                ch[j] += 1
                ch[j + 1] -= 1
                moved = True
    return ch


def encode(value: int) -> str:
    """The 16-character ASCII encoding of a 32-bit value."""
    asc = [0] * 16
    for i in range(4):
        ch = _encode_byte((value >> ((3 - i) * 8)) & 0xFF)
        for j in range(4):
            asc[4 * j + i] = ch[j]
    return bytes(asc[15:] + asc[:15]).decode("ascii")


def checksum_value(header_sum_with_zeros: int, datasum: int) -> str:
    """CHECKSUM for a header whose CHECKSUM card holds ``ZERO_CHECKSUM``."""
    return encode(~add(header_sum_with_zeros, datasum) & _MASK32)
