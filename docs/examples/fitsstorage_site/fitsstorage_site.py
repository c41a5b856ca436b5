"""A FitsStorage site package for spoolops: a data_label resolver and the
follow-up hook that queues a changed file for re-ingest.

Not installed with spoolops: copy it into the archive's own package (or
install this folder, ``pip install docs/examples/fitsstorage_site``) where
the worker runs.  It reads the archive's database -- tables ``file``,
``diskfile``, ``header`` and ``ingestqueue``, as FitsStorage has them -- through
a DB-API connection named by ``$FITSSTORAGE_SPOOLOPS_DSN``: a libpq
connection string (psycopg), or ``sqlite:PATH`` (the tests use a small fake
archive made that way).

- ``resolve_data_label``: the one canonical, present file whose header has
  the data label (FitsStorage's own lookup); several are a ``Conflict``.
- ``queue_ingest``: after ``update_headers`` or ``ingest_upload`` succeeded,
  add the file to ``ingestqueue`` (with ``batch``, and the md5s of a header
  update), as FitsStorage's fileops worker does.  A row already waiting for
  the same file is left alone (their unique constraint), so a repeat does
  nothing.
"""

from __future__ import annotations

import os
import posixpath
import time
from typing import Any

from spoolops.errors import Conflict

PARAM = {"sqlite": "?", "psycopg": "%s"}


def connect() -> tuple[Any, str]:
    """(connection, DB-API paramstyle marker) for ``$FITSSTORAGE_SPOOLOPS_DSN``."""
    dsn = os.environ.get("FITSSTORAGE_SPOOLOPS_DSN", "")
    if dsn.startswith("sqlite:"):
        import sqlite3
        return sqlite3.connect(dsn[len("sqlite:"):], timeout=30), PARAM["sqlite"]
    import psycopg
    return psycopg.connect(dsn), PARAM["psycopg"]


def resolve_data_label(data_label: str, ctx: Any) -> str | None:
    """The stored file (relative to storage_root) whose header has ``data_label``."""
    conn, p = connect()
    try:
        rows = conn.execute(
            "SELECT diskfile.path, diskfile.filename FROM file"
            " JOIN diskfile ON diskfile.file_id = file.id"
            " JOIN header ON header.diskfile_id = diskfile.id"
            f" WHERE header.data_label = {p} AND diskfile.canonical AND diskfile.present",
            (data_label,)).fetchall()
    finally:
        conn.close()
    if len(rows) > 1:
        raise Conflict(f"data_label {data_label!r} names {len(rows)} files:"
                       f" {', '.join(posixpath.join(*r) for r in rows)}")
    return posixpath.join(*rows[0]) if rows else None


def queue_ingest(op: str, args: dict[str, Any], result: dict[str, Any], ctx: Any) -> None:
    """Queue the changed file for re-ingest (FitsStorage's IngestQueue.add)."""
    if op not in ("update_headers", "ingest_upload"):
        return
    stored = result["path"] if op == "ingest_upload" else result["filename"]
    path, filename = posixpath.split(stored)
    now = time.time()
    conn, p = connect()
    try:
        conn.execute(
            "INSERT INTO ingestqueue (filename, path, inprogress, added, after, batch,"
            " header_update, md5_before_header_update, md5_after_header_update)"
            f" SELECT {p}, {p}, false, {p}, {p}, {p}, {p}, {p}, {p}"
            " WHERE NOT EXISTS (SELECT 1 FROM ingestqueue WHERE filename = "
            f"{p} AND path = {p} AND NOT inprogress)",
            (filename, path, now, now, args.get("batch"), op == "update_headers",
             result.get("md5_before"), result.get("md5_after"), filename, path))
        conn.commit()
    finally:
        conn.close()
