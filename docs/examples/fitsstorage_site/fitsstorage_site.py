"""A FitsStorage site package for spoolops: the two resolvers that find a
stored file the way FitsStorage's own ``update_headers`` finds it, and the
follow-up hook that queues each changed file for ingest, as their fileops
worker did.

Not installed with spoolops: install this folder where the worker runs
(``pip install docs/examples/fitsstorage_site``), or copy the module into
the archive's own package together with the entry points of its
``pyproject.toml``.  It uses the archive's PostgreSQL database (psycopg 3),
tables as FitsStorage's ORM defines them (``tests/fitsstorage_schema.sql``
restates them):

- ``resolve_filename`` (entry point ``filename``) and ``resolve_data_label``
  (entry point ``data_label``): the file a request names, as
  ``FitsEditor._find_diskfile`` (``fits_storage/server/fitseditor.py``)
  finds it -- the one ``file`` (``file.name`` = the name without a trailing
  ``.bz2``, or ``header.data_label`` = the label) that has a canonical
  ``diskfile`` with a ``header``; then that file's one present ``diskfile``.
  Returns ``diskfile.path/diskfile.filename`` (relative to storage_root);
  none is ``NotFound``, several are a ``Conflict``.
- ``queue_ingest`` (hook ``ingest_queue``): after ``update_headers`` or
  ``ingest_upload`` succeeded, one ``ingestqueue`` row with every column
  as their ``IngestQueueEntry.__init__`` sets it (``no_defer`` true after a
  header update, false after an upload; the upload's ``batch``), then, for
  an upload with a ``fileuploadlog_id``, that ``fileuploadlog`` row's
  ``destination`` and ``file_ok`` -- one transaction.  A row already
  waiting for the same file (their unique constraint on filename, path,
  inprogress, fail_dt) is not a failure: the file is queued once.  Any
  other failure raises -- a ``fileuploadlog`` row that is not there too
  (their web code commits it before it queues the request) -- so that
  spoolops runs the hook again later: it is idempotent.

Pointing it at their database: ``$FITSSTORAGE_SPOOLOPS_DSN`` in the
worker's environment (``Environment=`` in its systemd unit), a libpq
connection string or URI -- fits_storage's ``database_url`` without the
SQLAlchemy driver part, e.g. ``dbname=fitsdata`` for their
``postgresql:///fitsdata`` (on the socket, peer authentication: the role is
the worker's unix account).  It must be set: an empty one is refused rather
than left to libpq's defaults.  Connected as ``fitsdata`` (the role that
owns their tables, as their own services connect) nothing needs granting;
a role of its own needs exactly (PostgreSQL wants SELECT on the columns an
``ON CONFLICT`` names: here their unique constraint's)::

    GRANT SELECT ON file, diskfile, header TO spoolops_worker;
    GRANT INSERT, SELECT (filename, path, inprogress, fail_dt) ON ingestqueue TO spoolops_worker;
    GRANT USAGE ON SEQUENCE ingestqueue_id_seq TO spoolops_worker;
    GRANT SELECT, UPDATE (destination, file_ok) ON fileuploadlog TO spoolops_worker;

Trusts: the database the DSN names (what its tables say is where a file
is; spoolops still confines that path below storage_root) and the worker's
environment.  Distrusts: the names and labels in requests (bound as query
parameters, never spliced into SQL).  Each call opens its own connection
and closes it: there is no pool to go stale while the worker idles.
"""

from __future__ import annotations

import datetime
import os
import posixpath
import re
from typing import Any

import psycopg

from spoolops.errors import Conflict, NotFound

DSN_ENV = "FITSSTORAGE_SPOOLOPS_DSN"
# their OrmQueueMixin.fail_dt_false: "not failed" (NULL would defeat the
# unique constraint, which treats NULLs as distinct)
FAIL_DT_FALSE = datetime.datetime.max

# their sortkey_regex_dict (fits_storage/gemini_metadata_utils/
# telescope_instruments.py), in its order: re.match (anchored at the start
# only), and the LAST regex that matches wins (their loop has no break)
SORTKEY_REGEXES = (
    (re.compile(r'[NS](?P<date>\d{8})\w(?P<num>\d+).*'), "z"),          # N20200127S0023
    (re.compile(r'SDC[SHK]_(?P<date>\d{8})_(?P<num>\d+).*'), "z"),      # IGRINS
    (re.compile(r'(?P<date>\d{8})_(?P<num>.*)_obslog.txt'), "x"),       # obslogs
    (re.compile(r'img_(?P<date>\d{8})_(?P<num>\w+).*'), "y"),           # sky camera
)


def sortkey_from_filename(filename: str) -> str:
    """Their ``OrmQueueMixin.sortkey_from_filename``: the queue pops the
    highest key first, so science files ('z' + date + serial) go before sky
    camera ('y') and obslogs ('x'), and anything else ('aaaa' + name) last."""
    filename = filename.rpartition("/")[2]
    sortkey = "aaaa" + filename
    for regex, prefix in SORTKEY_REGEXES:
        m = regex.match(filename)
        if m:
            sortkey = prefix + m.group("date") + m.group("num")
    return sortkey


def utcnow() -> datetime.datetime:
    """Their ``fits_storage.utcnow``: naive UTC, as the queue columns hold it."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def connect() -> psycopg.Connection:
    """A new connection to the archive's database (``$FITSSTORAGE_SPOOLOPS_DSN``).
    As a context manager it commits on success, rolls back on an exception,
    and closes."""
    dsn = os.environ.get(DSN_ENV, "").strip()
    if not dsn:
        raise RuntimeError(f"${DSN_ENV} is not set: the libpq connection string of"
                           " FitsStorage's database (e.g. 'dbname=fitsdata')")
    return psycopg.connect(dsn)


# -- resolvers --------------------------------------------------------------------

def resolve_filename(name: str, ctx: Any) -> str:
    """The stored file (relative to storage_root) of the file named ``name``
    (their File.name has no ``.bz2``; a given ``.bz2`` is dropped, as theirs)."""
    return _find_diskfile("file.name = %s", name.removesuffix(".bz2"), f"filename {name!r}")


def resolve_data_label(data_label: str, ctx: Any) -> str:
    """The stored file (relative to storage_root) whose header has ``data_label``."""
    return _find_diskfile("header.data_label = %s", data_label, f"data_label {data_label!r}")


def _find_diskfile(condition: str, value: str, what: str) -> str:
    """``FitsEditor._find_diskfile``: first the one file with a canonical
    diskfile that has a header and matches (their legacy ``Query.one()``
    counts distinct files, whatever the number of header rows), then that
    file's one present diskfile (canonical or not, as theirs)."""
    with connect() as conn:
        files = conn.execute(
            "SELECT DISTINCT file.id FROM file"
            " JOIN diskfile ON file.id = diskfile.file_id"
            " JOIN header ON diskfile.id = header.diskfile_id"
            f" WHERE diskfile.canonical = true AND {condition} ORDER BY file.id",
            (value,)).fetchall()
        if not files:
            raise NotFound(f"the archive has no canonical file with {what}")
        if len(files) > 1:
            raise Conflict(f"{what} names {len(files)} files in the archive (file ids"
                           f" {', '.join(str(f[0]) for f in files)}): the request is"
                           " ambiguous")
        disks = conn.execute(
            "SELECT path, filename FROM diskfile WHERE file_id = %s AND present = true"
            " ORDER BY id", (files[0][0],)).fetchall()
    stored = [posixpath.join(path or "", filename or "") for path, filename in disks]
    if not stored:
        raise NotFound(f"the archive has no present file with {what}")
    if len(stored) > 1:
        raise Conflict(f"{what} has {len(stored)} present files in the archive:"
                       f" {', '.join(stored)}")
    return stored[0]


# -- the follow-up hook -----------------------------------------------------------

INSERT_INGEST = (
    "INSERT INTO ingestqueue (filename, path, added, inprogress, force_md5, force, after,"
    " no_defer, batch, fail_dt, sortkey, header_update, md5_before_header_update,"
    " md5_after_header_update)"
    " VALUES (%(filename)s, %(path)s, %(added)s, false, false, false, %(added)s,"
    " %(no_defer)s, %(batch)s, %(fail_dt)s, %(sortkey)s, NULL, NULL, NULL)"
    # their unique constraint: a row already waiting for this file is the one
    # they would have kept too (their IngestQueue.add rolls back and returns None)
    " ON CONFLICT (filename, path, inprogress, fail_dt) DO NOTHING")


def queue_ingest(op: str, args: dict[str, Any], result: dict[str, Any], ctx: Any) -> None:
    """Queue the changed file for ingest, as their fileops worker did after
    ``update_headers`` and ``ingest_upload``; other operations are ignored."""
    if op == "update_headers":
        # theirs: IngestQueue.add(diskfile.filename, diskfile.path, no_defer=True)
        # -- no batch (their worker copies the request's batch into the args,
        # but update_headers does not pass it on), no header_update, no md5s
        stored, no_defer, batch = result["filename"], True, None
    elif op == "ingest_upload":
        # theirs: IngestQueue.add(filename, path, no_defer=False, batch=batch)
        stored, no_defer, batch = result["path"], False, args.get("batch")
    else:
        return
    path, filename = posixpath.split(stored)
    row = {"filename": filename, "path": path, "added": utcnow(), "no_defer": no_defer,
           "batch": batch, "fail_dt": FAIL_DT_FALSE,
           "sortkey": sortkey_from_filename(filename)}
    upload_id = args.get("fileuploadlog_id") if op == "ingest_upload" else None
    with connect() as conn:                  # one transaction: all of it or nothing
        conn.execute(INSERT_INGEST, row)
        if upload_id:                        # theirs: "if fileuploadlog_id:"
            # theirs sets destination (relative to storage_root) and file_ok,
            # and loses both when the file was already queued (their rollback);
            # here they are set either way.  Their "ingestqueue_id" is not a column.
            done = conn.execute("UPDATE fileuploadlog SET destination = %s, file_ok = true"
                                " WHERE id = %s", (stored, upload_id))
            if done.rowcount != 1:
                # their web code commits the row before it queues the request:
                # a missing one means the DSN names another database
                raise LookupError(f"no fileuploadlog row {upload_id} in the database"
                                  f" ${DSN_ENV} names (uploaded {stored})")
