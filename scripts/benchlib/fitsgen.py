"""Big FITS files for the bench: a realistic primary header and random data.

The header (~170 cards, 5 blocks) carries the keywords ``update_headers``
edits (RAWGEMQA, RAWPIREQ, ...), so an edit changes values but never the
header's size.  Data are big-endian int16 written in chunks (a 1 GB file
never sits in memory): uniform random for plain files, Gaussian noise
around a sky level for compressed ones (compresses ~2x, like real images
rather than like zeros).  Compressed files are single-stream, as ``gzip`` and
``bzip2`` write them, i.e. files spoolops has never edited.

Trusts: the paths it is given.
"""

from __future__ import annotations

import bz2
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from astropy.io import fits

WIDTH = 1024
BLOCK = 2880
CHUNK_ROWS = 16384          # 32 MB of int16 per chunk


def header(rows: int) -> bytes:
    h = fits.Header()
    h["SIMPLE"], h["BITPIX"], h["NAXIS"] = True, 16, 2
    h["NAXIS1"], h["NAXIS2"], h["EXTEND"] = WIDTH, rows, True
    h["OBJECT"], h["OBSERVAT"], h["INSTRUME"] = "NGC 1275", "Gemini-North", "GMOS-N"
    h["RAWGEMQA"], h["RAWPIREQ"] = "UNKNOWN", "UNKNOWN"
    h["RAWIQ"], h["RAWCC"], h["RAWBG"], h["RAWWV"] = "Any", "Any", "Any", "Any"
    h["RELEASE"] = "2027-01-01"
    for i in range(155):
        h[f"FILL{i:04d}"] = (i * 1.5, "filler keyword, as in a real instrument header")
    return h.tostring().encode("ascii")


def write_fits(path: Path, data_bytes: int, noise: bool = False, seed: int = 0) -> int:
    """A plain FITS file with ~``data_bytes`` of data; returns its size."""
    rows = max(1, data_bytes // (2 * WIDTH))
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(header(rows))
        done = 0
        while done < rows:
            n = min(CHUNK_ROWS, rows - done)
            if noise:
                chunk = rng.normal(1000.0, 20.0, n * WIDTH).astype(">i2")
            else:
                chunk = rng.integers(-32768, 32767, n * WIDTH, dtype=np.int16,
                                     endpoint=True).astype(">i2")
            f.write(chunk.tobytes())
            done += n
        pad = -f.tell() % BLOCK
        f.write(b"\0" * pad)
        return f.tell()


def _compress_file(src: Path, dst: Path, kind: str) -> None:
    comp = bz2.BZ2Compressor(9) if kind == "bz2" else zlib.compressobj(6, zlib.DEFLATED, 31)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(1 << 20):
            fout.write(comp.compress(block))
        fout.write(comp.flush())


def write_compressed(folder: Path, stem: str, data_bytes: int, kinds: tuple[str, ...]
                     ) -> dict[str, Path]:
    """``stem.fits.<kind>`` for each kind, compressed in parallel threads."""
    plain = folder / f"{stem}.plain.fits"
    write_fits(plain, data_bytes, noise=True, seed=1)
    out = {kind: folder / f"{stem}.fits.{kind}" for kind in kinds}
    with ThreadPoolExecutor(len(kinds)) as pool:
        for f in [pool.submit(_compress_file, plain, out[k], k) for k in kinds]:
            f.result()
    os.unlink(plain)
    return out
