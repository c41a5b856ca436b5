"""Temporary files outside ``work/``, recorded so that a crash leaves none.

An operation that stages a file beside its target (in ``storage_root``) or
anywhere else outside the worker's own folder first records the temporary
file's absolute path in ``work/temps/``; it forgets the record once the file
has been renamed into place or removed.  On start-up, under the worker lock,
``cleanup_temps`` removes every recorded file that still exists: only files
whose names carry ``TEMP_MARK``, and never through a symbolic link.

Trusts: ``work/`` (mode 0700, the worker user's own).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ..files import fsync_dir, write_new_file
from . import TEMPS_DIR

TEMP_MARK = ".spoolops-tmp"
RECORD_DIR = TEMPS_DIR


def temp_name(target_name: str, token: str) -> str:
    """A hidden temporary name beside ``target_name``, e.g. ``.x.fits.<token>.spoolops-tmp``."""
    return f".{target_name}.{token}{TEMP_MARK}"


def _record_path(work_dir: Path, path: str) -> Path:
    digest = hashlib.sha256(os.fsencode(path)).hexdigest()[:32]
    return Path(work_dir) / RECORD_DIR / digest


def register_temp(work_dir: Path, path: str | os.PathLike, durable: bool = True) -> None:
    """Record ``path`` (absolute) before the temporary file is created."""
    path = os.path.abspath(path)
    record = _record_path(work_dir, path)
    record.parent.mkdir(mode=0o700, exist_ok=True)
    record.unlink(missing_ok=True)  # a stale record for the same path: ours to replace
    write_new_file(record, os.fsencode(path) + b"\n", durable, mode=0o600)
    if durable:
        fsync_dir(record.parent)


def forget_temp(work_dir: Path, path: str | os.PathLike) -> None:
    """Drop the record once the temporary file is gone or published."""
    try:
        os.unlink(_record_path(work_dir, os.path.abspath(path)))
    except FileNotFoundError:
        pass


def cleanup_temps(work_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Remove recorded temporary files left by a crash.  Returns the paths
    removed, and (path, error) for those that could not be: a read-only
    mount or a permission problem is reported, never fatal, and the record
    stays so that a later run retries."""
    removed: list[str] = []
    errors: list[tuple[str, str]] = []
    record_dir = Path(work_dir) / RECORD_DIR
    try:
        records = list(record_dir.iterdir())
    except FileNotFoundError:
        return removed, errors
    for record in records:
        try:
            path = os.fsdecode(record.read_bytes().rstrip(b"\n"))
        except OSError:
            continue
        if TEMP_MARK in os.path.basename(path):
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode):
                    os.unlink(path)
                    removed.append(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append((path, exc.strerror or str(exc)))
                continue
        try:
            record.unlink(missing_ok=True)
        except OSError as exc:
            errors.append((str(record), exc.strerror or str(exc)))
    return removed, errors
