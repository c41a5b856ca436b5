"""A FitsStorage archive database for the tests of the sample site package
(``docs/examples/fitsstorage_site``): their tables, their queue, their files.

``FitsArchive.create(cluster)`` makes a database of its own in a throwaway
PostgreSQL cluster (the ``pg_cluster`` fixture) holding
``tests/fitsstorage_schema.sql`` (their ORM's tables, restated), and a
login role with exactly the grants the site package's docstring names --
the tests parse them from it, so the documented grants are the ones
tested.  Rows are written as their ingester and web code write them
(``add_file``, ``add_upload``); ``pop`` is their ``Queue.pop``, restated as
SQL.  ``site_package`` makes the sample importable with the entry points
its ``pyproject.toml`` declares, as installing it would; ``start_site_worker``
runs a deployment's worker with it; ``readme_block`` is a code block of
README.rst that the tests run.
"""

from __future__ import annotations

import bz2
import datetime
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import PROJECT, TESTS
from .fitsfiles import simple_image

SITE = PROJECT / "docs" / "examples" / "fitsstorage_site"
SCHEMA = TESTS / "fitsstorage_schema.sql"
DSN_ENV = "FITSSTORAGE_SPOOLOPS_DSN"
# their OrmQueueMixin.fail_dt_false (datetime.max): "not failed"
FAIL_DT_FALSE = datetime.datetime.max
INGESTQUEUE_COLUMNS = ("id", "filename", "path", "inprogress", "fail_dt", "added",
                       "force_md5", "force", "after", "no_defer", "batch", "sortkey", "error",
                       "md5_before_header_update", "md5_after_header_update",
                       "header_update")

# their Queue.pop (fits_storage/queues/queue/queue.py:36-104) on ingestqueue,
# the SQL SQLAlchemy emitted for it on PostgreSQL; then, in the same
# transaction, inprogress = true and a commit
POP = """
SELECT ingestqueue.* FROM ingestqueue
WHERE ingestqueue.inprogress = false
  AND ingestqueue.fail_dt = %(fail_dt_false)s
  AND (ingestqueue.filename NOT IN (SELECT ingestqueue.filename FROM ingestqueue
        WHERE ingestqueue.fail_dt = %(fail_dt_false)s
          AND ingestqueue.inprogress = true AND ingestqueue.filename IS NOT NULL))
  AND ingestqueue.after < %(utcnow)s
ORDER BY ingestqueue.sortkey DESC
LIMIT 1 FOR UPDATE SKIP LOCKED
"""

_numbers = itertools.count(1)


def utcnow() -> datetime.datetime:
    """Their ``fits_storage.utcnow()``: naive UTC."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def documented_grants(role: str) -> list[str]:
    """The GRANT statements of the site package's docstring, for ``role``."""
    text = (SITE / "fitsstorage_site.py").read_text()
    grants = re.findall(r"^\s+(GRANT .+ TO spoolops_worker;)$", text, re.MULTILINE)
    assert grants, "the site package's docstring names no grants"
    return [g.replace("spoolops_worker", role) for g in grants]


@dataclass
class FitsArchive:
    """A database of FitsStorage's tables in ``cluster``, and the worker's role."""

    cluster: Any
    dbname: str
    role: str

    @classmethod
    def create(cls, cluster: Any) -> FitsArchive:
        n = next(_numbers)
        archive = cls(cluster, f"fitsarchive_{os.getpid()}_{n}", f"fsa_{os.getpid()}_{n}_wrk")
        cluster.psql(f"CREATE DATABASE {archive.dbname}")
        cluster.psql(f"CREATE ROLE {archive.role} LOGIN")
        with archive.connect() as conn:
            conn.execute(SCHEMA.read_text())
            for grant in documented_grants(archive.role):
                conn.execute(grant)
        return archive

    def dsn(self, role: str | None = None) -> str:
        """The libpq string the worker's role connects with."""
        return self.cluster.dsn(self.dbname, role or self.role)

    def connect(self):
        """A connection as the cluster's superuser (autocommit), rows as dicts."""
        import psycopg
        from psycopg.rows import dict_row
        return psycopg.connect(self.dsn("postgres"), autocommit=True, row_factory=dict_row)

    def sql(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        with self.connect() as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def drop(self) -> None:
        self.cluster.psql(f"DROP DATABASE IF EXISTS {self.dbname} WITH (FORCE)")
        self.cluster.psql(f"DROP ROLE IF EXISTS {self.role}")

    # -- rows as their ingester and web code write them -----------------------

    def add_file(self, stored: str, data_label: str | None = None, present: bool = True,
                 canonical: bool = True, header: int = 1) -> int:
        """A diskfile for ``stored`` (path/filename below storage_root) of the
        file named as their ingester names it (the filename without .bz2),
        with ``header`` header rows; the diskfile's id."""
        path, _, filename = stored.rpartition("/")
        name = filename.removesuffix(".bz2")
        with self.connect() as conn:
            found = conn.execute("SELECT id FROM file WHERE name = %s", (name,)).fetchone()
            file_id = found["id"] if found else conn.execute(
                "INSERT INTO file (name) VALUES (%s) RETURNING id", (name,)).fetchone()["id"]
            diskfile_id = conn.execute(
                "INSERT INTO diskfile (file_id, filename, path, present, canonical,"
                " compressed, isfits, entrytime) VALUES (%s, %s, %s, %s, %s, %s, true, now())"
                " RETURNING id", (file_id, filename, path, present, canonical,
                                  filename.endswith(".bz2"))).fetchone()["id"]
            for _ in range(header):
                conn.execute("INSERT INTO header (diskfile_id, data_label) VALUES (%s, %s)",
                             (diskfile_id, data_label))
        return diskfile_id

    def add_upload(self, filename: str, path: str, processed_cal: bool = False) -> int:
        """The usagelog and fileuploadlog rows their ``upload_file`` commits
        before it queues ``ingest_upload``; the fileuploadlog id."""
        with self.connect() as conn:
            usagelog = conn.execute(
                "INSERT INTO usagelog (utdatetime, method, uri, this) VALUES (%s, 'POST', %s,"
                " 'upload_file') RETURNING id",
                (utcnow(), f"/upload_file/{path}/{filename}")).fetchone()["id"]
            return conn.execute(
                "INSERT INTO fileuploadlog (usagelog_id, ut_transfer_start, filename, path,"
                " processed_cal) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (usagelog, utcnow(), filename, path, processed_cal)).fetchone()["id"]

    def fileuploadlog(self, upload_id: int) -> dict[str, Any]:
        [row] = self.sql("SELECT * FROM fileuploadlog WHERE id = %s", (upload_id,))
        return row

    # -- their ingest queue -----------------------------------------------------

    def ingestqueue(self) -> list[dict[str, Any]]:
        return self.sql("SELECT * FROM ingestqueue ORDER BY id")

    def pop(self) -> dict[str, Any] | None:
        """Their ``Queue.pop`` on ingestqueue: the row it hands to the ingester
        (marked in progress, committed), or None."""
        with self.connect() as conn, conn.transaction():
            row = conn.execute(POP, {"fail_dt_false": FAIL_DT_FALSE,
                                     "utcnow": utcnow()}).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE ingestqueue SET inprogress = true WHERE id = %s", (row["id"],))
            row["inprogress"] = True
            return row


# -- FITS files as the archive keeps them -----------------------------------------

def archive_fits(path: Path, cards: Mapping[str, Any] | None = None, seed: int = 0) -> Path:
    """A small FITS file made by astropy (``fitsfiles.simple_image``) with
    ``cards`` in its primary header, bzip2-compressed when ``path`` ends in
    ``.bz2`` (one ordinary stream, as the archive's)."""
    from astropy.io import fits
    plain = path.with_name(path.name.removesuffix(".bz2"))
    simple_image(plain, shape=(16, 16), seed=seed)
    with fits.open(plain, mode="update") as hdul:
        for key, value in (cards or {}).items():
            hdul[0].header[key] = value
    if path.name.endswith(".bz2"):
        path.write_bytes(bz2.compress(plain.read_bytes()))
        plain.unlink()
    return path


# -- README's FitsStorage blocks, the site package installed for a worker ------------

def readme_block(label: str) -> str:
    """The code block after '.. test: LABEL' in README.rst, dedented."""
    text = (PROJECT / "README.rst").read_text()
    match = re.search(rf"^\.\. test: {label}\n\n\.\. code-block:: python\n\n((?:    .*\n|\n)+)",
                      text, re.MULTILINE)
    assert match, f"no '.. test: {label}' code block in README.rst"
    return "\n".join(line[4:] for line in match.group(1).splitlines()).strip() + "\n"



def site_package(where: Path) -> Path:
    """docs/examples/fitsstorage_site made importable, with the entry points its
    pyproject.toml declares (as installing it would)."""
    text = (SITE / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"$', text, re.MULTILINE).group(1)
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(SITE / "fitsstorage_site.py", where)
    dist = where / f"fitsstorage_spoolops_site-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fitsstorage-spoolops-site\n"
                                   f"Version: {version}\n")
    lines, group = [], None
    for line in text.splitlines():
        header = re.match(r'^\[project\.entry-points\."([^"]+)"\]$', line)
        if header:
            group = header.group(1)
            lines.append(f"[{group}]")
        elif line.startswith("["):
            group = None
        elif group and "=" in line:
            name, value = (part.strip() for part in line.split("=", 1))
            lines.append(f"{name} = {value.strip(chr(34))}")
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return where


def start_site_worker(dep: Any, archive: FitsArchive, **env: str) -> subprocess.Popen:
    """The deployment's worker (as the worker account) with the sample site
    package instead of the tests' site ops (one data_label resolver per
    worker) and ``$FITSSTORAGE_SPOOLOPS_DSN`` naming ``archive`` as its role."""
    from .accounts import WORKER
    code = site_package(dep.base / "sitepkg")
    subprocess.run(["chmod", "-R", "a+rX", str(code)], check=True)
    paths = [p for p in dep.env(WORKER)["PYTHONPATH"].split(os.pathsep)
             if not p.endswith("siteops")]
    return dep.start_worker(PYTHONPATH=os.pathsep.join([str(code), *paths]),
                            **{DSN_ENV: archive.dsn(), **env})
