"""Baseline ``astropy-update``: header edits the way FitsStorage makes them today.

Plain ``.fits``: ``astropy.io.fits.open(mode="update")``, set the cards,
flush on close -- in place, no journal, no fsync (not crash-safe).
``.fits.bz2`` / ``.fits.gz``: decompress to a temporary file with Python's
``bz2``/``gzip`` module, edit it as above, recompress (single-threaded, one
stream) to a second temporary file, rename it over the original.  The
compression levels are spoolops's own (bzip2 9, gzip 6) so that the ratio
measures the method, not the level (Python's ``gzip`` default would be 9,
slower still).

Trusts: the path it is given (the bench's own files).
"""

from __future__ import annotations

import bz2
import gzip
import os
import shutil
import time
from typing import Any

from astropy.io import fits

LEVELS = {"bz2": 9, "gz": 6}


def _open(kind: str, path: str, mode: str) -> Any:
    if kind == "bz2":
        return bz2.open(path, mode, compresslevel=LEVELS["bz2"]) if "w" in mode \
            else bz2.open(path, mode)
    return gzip.open(path, mode, compresslevel=LEVELS["gz"]) if "w" in mode \
        else gzip.open(path, mode)


def edit(path: str, values: dict[str, Any]) -> float:
    """Set header cards of HDU 0; returns the seconds it took."""
    start = time.perf_counter()
    kind = "bz2" if path.endswith(".bz2") else "gz" if path.endswith(".gz") else ""
    if not kind:
        with fits.open(path, mode="update") as hdul:
            hdul[0].header.update(values)
        return time.perf_counter() - start
    plain, packed = path + ".edit.fits", path + ".edit.tmp"
    try:
        with _open(kind, path, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        with fits.open(plain, mode="update") as hdul:
            hdul[0].header.update(values)
        with open(plain, "rb") as src, _open(kind, packed, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(packed, path)
    finally:
        for tmp in (plain, packed):
            if os.path.exists(tmp):
                os.unlink(tmp)
    return time.perf_counter() - start
