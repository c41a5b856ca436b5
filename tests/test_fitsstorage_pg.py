"""The sample FitsStorage site package (``docs/examples/fitsstorage_site``)
against FitsStorage's own tables in PostgreSQL, and spoolops against their
own fileops tests.

What it is checked against: their ORM's tables restated as DDL
(``tests/fitsstorage_schema.sql``) in a database of the suite's throwaway
cluster, a login role with exactly the grants the package's docstring names
(``tests/support/fitsarchive.py``), their ``Queue.pop`` restated as SQL, and -- for
every column of an ``ingestqueue`` row -- what their
``IngestQueueEntry.__init__`` sets, with the sortkeys of their own test
table (``fits_storage_tests/code_tests/test_queueorms.py``, extended in our
research notes), written out here rather than computed by the code under
test.  FitsStorage 426e1308.

- In-process: the resolvers find what their ``FitsEditor._find_diskfile``
  finds (top folder, subfolder, processed_cals/, with and without .bz2;
  not present, not canonical, no header -> ``NotFound``; two -> ``Conflict``);
  the hook writes the row their ``IngestQueue.add`` would, once, in one
  transaction with the upload's ``fileuploadlog``; a database that refuses
  makes it raise.
- As real unix accounts (``accounts`` mark): the worker as ``spt_wrk`` with
  the site package and ``$FITSSTORAGE_SPOOLOPS_DSN``, their web handlers'
  calls as ``spt_web`` through ``spoolops.compat.fitsstorage`` -- once
  written out, once as README's blocks ('after', 'unchanged') run by three
  web processes at once; and their ``test_fileopser.py`` cases (echo,
  ingest_upload, update_headers) restated against that worker.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from astropy.io import fits
from support.accounts import WEB, WORKER, Deployment
from support.fitsarchive import (
    DSN_ENV,
    FAIL_DT_FALSE,
    INGESTQUEUE_COLUMNS,
    SITE,
    FitsArchive,
    archive_fits,
    documented_grants,
    readme_block,
    start_site_worker,
    utcnow,
)
from support.waiting import wait_for

from spoolops.errors import Conflict, NotFound
from spoolops.ops import OpContext
from spoolops.ops.headers import UPDATE_HEADERS
from spoolops.ops.ingest import INGEST_UPLOAD

# their sortkeys (test_queueorms.py:51-78, then the research notes' table,
# run against their code): written out, not computed
THEIR_SORTKEYS = [
    ("S20121122S9876_blah.fits", "z201211229876"),
    ("SDCH_20121020_9876.fits", "z201210209876"),
    ("img_20221020_12h23m34s.fits", "y2022102012h23m34s"),
    ("20001122_GN-2000A-Q-11_obslog.txt", "x20001122GN-2000A-Q-11"),
    ("blahblah", "aaaablahblah"),
    ("filename", "aaaafilename"),
    ("N20200127S0023.fits.bz2", "z202001270023"),
    ("N20200127S0023_bias.fits", "z202001270023"),
    ("N20200101S0002.fits", "z202001010002"),
    ("GN20200127S0023.fits", "aaaaGN20200127S0023.fits"),
    ("n20200127s0023.fits", "aaaan20200127s0023.fits"),
    ("miscfile_foo.pdf", "aaaamiscfile_foo.pdf"),
]


def check_entry(row: dict[str, Any], filename: str, path: str, sortkey: str, no_defer: bool,
                batch: str | None, between: tuple[datetime.datetime, datetime.datetime],
                inprogress: bool = False) -> None:
    """``row`` has every column as ``IngestQueueEntry(filename, path,
    no_defer=..., batch=...)`` sets it: added = after = utcnow() (naive UTC),
    not in progress, not failed (fail_dt_false), no force, no md5s, no
    header_update, no error."""
    assert set(row) == set(INGESTQUEUE_COLUMNS)
    want = {"filename": filename, "path": path, "inprogress": inprogress,
            "fail_dt": FAIL_DT_FALSE, "force_md5": False, "force": False,
            "no_defer": no_defer, "batch": batch, "sortkey": sortkey, "error": None,
            "md5_before_header_update": None, "md5_after_header_update": None,
            "header_update": None}
    assert {key: row[key] for key in want} == want, row
    assert row["added"].tzinfo is None and row["after"] == row["added"]
    assert between[0] <= row["added"] <= between[1], (row["added"], between)


# -- in-process: the site functions with a minimal context --------------------------

@pytest.fixture
def archive(pg_cluster):
    made = FitsArchive.create(pg_cluster)
    yield made
    made.drop()


@pytest.fixture
def site(archive: FitsArchive, monkeypatch: pytest.MonkeyPatch):
    """The site module, loaded from docs/examples, its DSN naming ``archive``."""
    monkeypatch.setenv(DSN_ENV, archive.dsn())
    spec = importlib.util.spec_from_file_location("fitsstorage_site",
                                                  SITE / "fitsstorage_site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



def test_filename_resolves_as_their_fitseditor_finds_it(site, archive: FitsArchive,
                                                         ctx: OpContext) -> None:
    archive.add_file("N20261129S0001.fits")
    # its older version, as their ingester leaves one: not canonical, not present
    archive.add_file("old/N20261129S0001.fits", present=False, canonical=False)
    archive.add_file("20261129/N20261129S0002.fits.bz2")
    archive.add_file("processed_cals/N20200127S0023_bias.fits")
    archive.add_file("N20261129S0004.fits", header=2)      # their Query counts files
    found = {"N20261129S0001.fits": "N20261129S0001.fits",
             "N20261129S0001.fits.bz2": "N20261129S0001.fits",   # .bz2 dropped, as theirs
             "N20261129S0002.fits": "20261129/N20261129S0002.fits.bz2",
             "N20261129S0002.fits.bz2": "20261129/N20261129S0002.fits.bz2",
             "N20200127S0023_bias.fits": "processed_cals/N20200127S0023_bias.fits",
             "N20261129S0004.fits": "N20261129S0004.fits"}
    assert {name: site.resolve_filename(name, ctx) for name in found} == found

    archive.add_file("N20261129S0005.fits", present=False)          # not present
    archive.add_file("N20261129S0006.fits", canonical=False)        # not canonical
    archive.add_file("N20261129S0008.fits", header=0)               # never got a header
    for missing in ("N20991231S9999.fits", "N20261129S0005.fits", "N20261129S0006.fits",
                    "N20261129S0008.fits", "20261129/N20261129S0002.fits",
                    "N20261129S0001.fits.gz", "x' OR '1'='1"):
        with pytest.raises(NotFound):
            site.resolve_filename(missing, ctx)

    # two present diskfiles of one file: the second one not canonical (their
    # second .one() sees both), or both canonical
    archive.add_file("N20261129S0009.fits")
    archive.add_file("dup/N20261129S0009.fits", canonical=False)
    archive.add_file("N20261129S0010.fits")
    archive.add_file("dup/N20261129S0010.fits")
    for ambiguous in ("N20261129S0009.fits", "N20261129S0010.fits.bz2"):
        with pytest.raises(Conflict):
            site.resolve_filename(ambiguous, ctx)


def test_data_label_resolves_the_same_way(site, archive: FitsArchive, ctx: OpContext) -> None:
    archive.add_file("N20261129S0001.fits", "GN-2026B-Q-1-1-001")
    archive.add_file("20261129/N20261129S0002.fits.bz2", "GN-2026B-Q-1-1-002")
    archive.add_file("processed_cals/N20200127S0023_bias.fits", "GN-CAL20200127-3-001")
    archive.add_file("N20261129S0004.fits", "GN-2026B-Q-1-1-004", header=2)
    found = {"GN-2026B-Q-1-1-001": "N20261129S0001.fits",
             "GN-2026B-Q-1-1-002": "20261129/N20261129S0002.fits.bz2",
             "GN-CAL20200127-3-001": "processed_cals/N20200127S0023_bias.fits",
             "GN-2026B-Q-1-1-004": "N20261129S0004.fits"}
    assert {label: site.resolve_data_label(label, ctx) for label in found} == found

    archive.add_file("N20261129S0005.fits", "GN-2026B-Q-1-1-005", present=False)
    archive.add_file("N20261129S0006.fits", "GN-2026B-Q-1-1-006", canonical=False)
    for missing in ("GN-none", "GN-2026B-Q-1-1-005", "GN-2026B-Q-1-1-006", "x' OR '1'='1"):
        with pytest.raises(NotFound):
            site.resolve_data_label(missing, ctx)

    archive.add_file("N20261129S0011.fits", "GN-2026B-Q-1-1-011")
    archive.add_file("N20261129S0012.fits", "GN-2026B-Q-1-1-011")  # two files, one label
    with pytest.raises(Conflict):
        site.resolve_data_label("GN-2026B-Q-1-1-011", ctx)


def test_update_headers_by_bare_name_then_the_row_ingestqueueentry_would_make(
        site, archive: FitsArchive, ctx: OpContext) -> None:
    """spoolops's own update_headers, in-process with the site's resolvers,
    edits the file their database names; the hook's row is their row, the
    one their pop hands out; a repeat adds nothing."""
    stored = "20261129/N20261129S0002.fits.bz2"
    (ctx.config.storage_root / "20261129").mkdir()
    archive_fits(ctx.config.storage_root / stored, {"RAWGEMQA": "UNKNOWN"})
    archive.add_file(stored, "GN-2026B-Q-1-1-002")
    ctx.resolvers = {"filename": site.resolve_filename, "data_label": site.resolve_data_label}
    by_label = UPDATE_HEADERS.validate({"data_label": "GN-2026B-Q-1-1-002",
                                        "qa_state": "Pass"}, ctx)
    clean = UPDATE_HEADERS.validate({"filename": "N20261129S0002.fits", "qa_state": "Fail",
                                     "batch": "nightly"}, ctx)
    assert by_label["filename"] == clean["filename"] == stored
    result = UPDATE_HEADERS.run(ctx, clean)
    assert result["modified"] is True
    assert fits.getheader(ctx.config.storage_root / stored)["RAWGEMQA"] == "BAD"

    before = utcnow()
    site.queue_ingest("update_headers", dict(clean), result, ctx)
    site.queue_ingest("update_headers", dict(clean), result, ctx)    # a retried hook
    after = utcnow()
    [row] = archive.ingestqueue()
    # their update_headers passes no batch (the request's "nightly" is not queued)
    check_entry(row, "N20261129S0002.fits.bz2", "20261129", "z202611290002", no_defer=True,
                batch=None, between=(before, after))
    assert archive.pop() == {**row, "inprogress": True}
    assert archive.pop() is None
    # edited again while its ingest runs: a new waiting row beside the one in
    # progress (their constraint allows it), which their pop holds back
    site.queue_ingest("update_headers", dict(clean), result, ctx)
    rows = archive.ingestqueue()
    assert [(r["id"] == row["id"], r["inprogress"]) for r in rows] == [(True, True),
                                                                      (False, False)]
    assert archive.pop() is None
    site.queue_ingest("echo", {}, {}, ctx)                       # not a change: nothing
    assert len(archive.ingestqueue()) == 2


def test_every_upload_row_and_their_sortkeys(site, archive: FitsArchive,
                                             ctx: OpContext) -> None:
    """spoolops's own ingest_upload, in-process, for each name of their
    sortkey table -- at the top, in a subfolder, as a processed calibration,
    with and without a fileuploadlog row: each row as IngestQueueEntry sets
    it (no_defer false, the upload's batch), the fileuploadlog row updated,
    and their pop hands the rows out highest sortkey first."""
    wheres = [("", False), ("sub/dir", False), ("", True)]
    expected = {}
    for n, (name, sortkey) in enumerate(THEIR_SORTKEYS):
        path, processed_cal = wheres[n % 3]
        staged = ctx.config.upload_staging_dir / path / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes(f"upload {n}".encode() * 100)
        upload_id = archive.add_upload(name, path, processed_cal) if n % 2 == 0 else None
        args = {"filename": name, "path": path, "processed_cal": processed_cal,
                "fileuploadlog_id": upload_id, "batch": f"batch-{n}" if n % 4 else None}
        clean = INGEST_UPLOAD.validate(args, ctx)
        result = INGEST_UPLOAD.run(ctx, clean)
        folder = "processed_cals" if processed_cal else path
        assert result["path"] == f"{folder}/{name}".lstrip("/")
        before = utcnow()
        site.queue_ingest("ingest_upload", dict(clean), result, ctx)
        site.queue_ingest("ingest_upload", dict(clean), result, ctx)    # a retried hook
        after = utcnow()
        [row] = [r for r in archive.ingestqueue() if r["filename"] == name]
        check_entry(row, name, folder, sortkey, no_defer=False, batch=args["batch"],
                    between=(before, after))
        expected[row["id"]] = row
        if upload_id is not None:
            log = archive.fileuploadlog(upload_id)
            assert (log["destination"], log["file_ok"]) == (result["path"], True)
    assert {r["id"] for r in archive.ingestqueue()} == set(expected)
    assert not [r for r in archive.sql("SELECT * FROM fileuploadlog")
                if r["destination"] is None or r["file_ok"] is not True]
    popped = []
    while (row := archive.pop()) is not None:
        assert row == {**expected[row["id"]], "inprogress": True}
        popped.append(row["sortkey"])
    assert popped == sorted((key for _, key in THEIR_SORTKEYS), reverse=True)


def test_a_missing_fileuploadlog_row_raises_and_queues_nothing(
        site, archive: FitsArchive, ctx: OpContext) -> None:
    result = {"filename": "N20261130S0001.fits", "path": "2026/N20261130S0001.fits",
              "size": 10, "md5": hashlib.md5(b"x").hexdigest()}
    args = {"filename": "N20261130S0001.fits", "path": "2026", "processed_cal": False,
            "fileuploadlog_id": 4242, "batch": None}
    with pytest.raises(LookupError, match="4242"):
        site.queue_ingest("ingest_upload", args, result, ctx)
    assert archive.ingestqueue() == []          # one transaction: the row went too


def test_a_database_that_refuses_makes_the_hook_and_resolvers_raise(
        site, archive: FitsArchive, ctx: OpContext, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg
    archive.add_file("N20261129S0001.fits", "GN-2026B-Q-1-1-001")
    upload_id = archive.add_upload("N20261130S0001.fits", "2026")
    header = ("update_headers", {"filename": "N20261129S0001.fits"},
              {"filename": "N20261129S0001.fits", "modified": True})
    upload = ("ingest_upload", {"filename": "N20261130S0001.fits", "path": "2026",
                                "processed_cal": False, "fileuploadlog_id": upload_id,
                                "batch": "b"},
              {"filename": "N20261130S0001.fits", "path": "2026/N20261130S0001.fits"})
    # each grant the docstring names is needed: without it, a raise and no row
    revokes = [("REVOKE INSERT ON ingestqueue FROM {role}", header),
               # the columns of their unique constraint, which ON CONFLICT names
               ("REVOKE SELECT (filename, path, inprogress, fail_dt) ON ingestqueue FROM {role}",
                header),
               ("REVOKE USAGE ON SEQUENCE ingestqueue_id_seq FROM {role}", header),
               ("REVOKE UPDATE (destination, file_ok) ON fileuploadlog FROM {role}", upload),
               ("REVOKE SELECT ON fileuploadlog FROM {role}", upload)]
    for revoke, (op, args, result) in revokes:
        archive.sql(revoke.format(role=archive.role))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            site.queue_ingest(op, args, result, ctx)
        assert archive.ingestqueue() == [], revoke
        for grant in documented_grants(archive.role):
            archive.sql(grant)
    for table in ("file", "diskfile", "header"):
        archive.sql(f"REVOKE SELECT ON {table} FROM {archive.role}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            site.resolve_filename("N20261129S0001.fits", ctx)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            site.resolve_data_label("GN-2026B-Q-1-1-001", ctx)
        archive.sql(f"GRANT SELECT ON {table} TO {archive.role}")
    assert site.resolve_data_label("GN-2026B-Q-1-1-001", ctx) == "N20261129S0001.fits"
    site.queue_ingest(*upload, ctx)                    # with the grants back: it works
    assert [r["filename"] for r in archive.ingestqueue()] == ["N20261130S0001.fits"]
    assert archive.fileuploadlog(upload_id)["file_ok"] is True

    monkeypatch.setenv(DSN_ENV, archive.dsn().replace(archive.dbname, "no_such_archive"))
    with pytest.raises(psycopg.OperationalError):
        site.queue_ingest(*header, ctx)
    monkeypatch.setenv(DSN_ENV, archive.dsn(role="no_such_role"))
    with pytest.raises(psycopg.OperationalError):
        site.resolve_filename("N20261129S0001.fits", ctx)
    monkeypatch.delenv(DSN_ENV)
    with pytest.raises(RuntimeError, match=DSN_ENV):
        site.queue_ingest(*header, ctx)
    assert len(archive.ingestqueue()) == 1


# -- as real unix accounts: their web code, our worker, their database -------------

def in_storage(dep: Deployment, stored: str, cards: dict[str, Any] | None = None) -> Path:
    """A FITS file in storage (folders too) owned by the worker user, as the
    archive's are."""
    worker = pwd.getpwnam(WORKER)
    path = dep.storage / stored
    folder = dep.storage
    for part in Path(stored).parent.parts:
        folder = folder / part
        folder.mkdir(exist_ok=True)
        os.chown(folder, worker.pw_uid, worker.pw_gid)
        os.chmod(folder, 0o755)
    archive_fits(path, cards)
    os.chown(path, worker.pw_uid, worker.pw_gid)
    os.chmod(path, 0o644)
    return path


def staged_by_web(dep: Deployment, rel: str, seed: int) -> bytes:
    """A FITS file staged at upload_staging_dir/REL by the web user, as their
    upload_file writes one (umask 002, folders 0775); its bytes."""
    src = archive_fits(dep.base / f"upload-{seed}.fits", {"OBJECT": f"upload {seed}"},
                       seed=seed)
    os.chmod(src, 0o644)
    done = dep.py(WEB, "import os, shutil, sys\nos.umask(0o002)\n"
                       "os.makedirs(os.path.dirname(sys.argv[2]), mode=0o775, exist_ok=True)\n"
                       "shutil.copyfile(sys.argv[1], sys.argv[2])\n",
                  str(src), str(dep.staging / rel))
    assert done.returncode == 0, done.stderr
    return src.read_bytes()


@pytest.fixture
def fitsstorage(fresh_deployment: Deployment, pg_cluster):
    """A deployment whose worker runs the sample site package against a
    FitsStorage database of its own."""
    archive = FitsArchive.create(pg_cluster)
    start_site_worker(fresh_deployment, archive)
    yield fresh_deployment, archive
    archive.drop()


def worker_log(dep: Deployment) -> str:
    return dep.workers[0].log_path.read_text(errors="replace")


def assert_clean_log(dep: Deployment) -> None:
    log = worker_log(dep)
    for bad in ("event=hook_failed", "event=entry_point_failed", "event=resolvers_ambiguous",
                "event=op_crashed"):
        assert bad not in log, log[-3000:]


WEB_HANDLERS = """
import json, sys
from spoolops.compat.fitsstorage import FileopsQueue, FileOpsRequest
session = logger = None
name, upload, path, fileuploadlog_id, batch = sys.argv[1:6]
fq = FileopsQueue(session=session, logger=logger)
# web/update_headers.py: args = {'filename': fn}; args.update(values)
args = {"filename": name}
args.update({"qa_state": "Pass", "raw_site": ["iq70", "cc50"],
             "generic": {"OBSERVER": "spt_web"}})
fq.add(FileOpsRequest(request="update_headers", args=args), filename=name,
       response_required=False)
# web/upload_file.py
fo_req = FileOpsRequest(request="ingest_upload",
                        args={"filename": upload, "path": path, "processed_cal": False,
                              "fileuploadlog_id": int(fileuploadlog_id)})
fq.add(fo_req, filename=upload, response_required=False, batch=batch)
print(json.dumps("queued"))
"""


@pytest.mark.accounts
def test_their_web_handlers_as_the_web_user_queue_their_ingest_rows(fitsstorage) -> None:
    """Their update_headers handler names a file of a subfolder by its bare
    name (flat args), their upload_file handler queues an upload with its
    fileuploadlog row and a batch: the worker edits and publishes, and their
    ingest queue holds exactly the rows their fileops worker would have
    added, handed out by their pop; fileuploadlog says where the file went."""
    dep, archive = fitsstorage
    stored = "20261129/N20261129S0007.fits.bz2"
    path = in_storage(dep, stored, {"RAWGEMQA": "UNKNOWN", "RAWPIREQ": "UNKNOWN"})
    archive.add_file(stored, "GN-2026B-Q-1-7-001")
    data = staged_by_web(dep, "20261130/N20261130S0001.fits", seed=1)
    upload_id = archive.add_upload("N20261130S0001.fits", "20261130")
    before = utcnow()
    assert dep.py_json(WEB, WEB_HANDLERS, "N20261129S0007.fits", "N20261130S0001.fits",
                       "20261130", str(upload_id), "batch-7") == "queued"
    try:
        wait_for(lambda: len(archive.ingestqueue()) == 2, timeout=120,
                 what="both files queued for ingest")
    except AssertionError:
        raise AssertionError(f"ingestqueue: {archive.ingestqueue()}; worker log:"
                             f" {worker_log(dep)[-3000:]}") from None
    after = utcnow()
    first, second, nothing = archive.pop(), archive.pop(), archive.pop()
    assert nothing is None
    # their pop: highest sortkey first -- the upload of the 30th, then the edit
    check_entry(first, "N20261130S0001.fits", "20261130", "z202611300001", no_defer=False,
                batch="batch-7", between=(before, after), inprogress=True)
    check_entry(second, "N20261129S0007.fits.bz2", "20261129", "z202611290007",
                no_defer=True, batch=None, between=(before, after), inprogress=True)
    log = archive.fileuploadlog(upload_id)
    assert (log["destination"], log["file_ok"]) == ("20261130/N20261130S0001.fits", True)
    hdr = fits.getheader(path)
    assert (hdr["RAWGEMQA"], hdr["RAWPIREQ"], hdr["RAWIQ"], hdr["RAWCC"], hdr["OBSERVER"]) \
        == ("USABLE", "YES", "70-percentile", "50-percentile", "spt_web")
    published = dep.storage / "20261130" / "N20261130S0001.fits"
    assert published.read_bytes() == data
    assert os.stat(published).st_uid == os.stat(path).st_uid == pwd.getpwnam(WORKER).pw_uid
    assert not (dep.staging / "20261130" / "N20261130S0001.fits").exists()
    assert_clean_log(dep)


README_HANDLER = """
import json, sys
n = int(sys.argv[1])
session = logger = None
files = sorted(json.loads(sys.argv[2]).items())[2 * n: 2 * n + 2]
payload = [{"filename": files[0][0], "values": {"qa_state": "Pass",
            "raw_site": ["iq70", "cc50"], "generic": [["OBSERVER", f"web {n}"]]}},
           {"data_label": files[1][1], "values": {"release": "2027-06-01",
            "generic": {"OBSERVER": f"web {n}"}}}]
filename, path, batch = f"N20261130S{n + 1:04d}.fits", "20261130", f"batch-{n}"
fileuploadlog_id = json.loads(sys.argv[3])[n]
"""


def ended(dep: Deployment, op: str) -> int:
    """How many requests of ``op`` the worker has answered ok (its hooks ran first)."""
    return sum(1 for line in worker_log(dep).splitlines()
               if "event=end " in line and f" op={op} " in line and " outcome=ok " in line)


@pytest.mark.accounts
def test_the_readme_handler_blocks_from_three_web_processes(fitsstorage) -> None:
    """README's FitsStorage blocks ('after' import, then 'unchanged'), run as
    the web user by three processes at once, plus our nested shape for the
    same files: every header edited, every upload published, and their
    ingest queue holds one row per changed file (a second edit while its
    row waits adds none), each as their fileops worker would have added it."""
    import subprocess
    dep, archive = fitsstorage
    names = {f"N20261129S{n:04d}.fits": f"GN-2026B-Q-1-1-{n:03d}" for n in range(1, 7)}
    stored = {}
    for i, name in enumerate(sorted(names)):
        # some at the top of storage_root, some in a night's folder and compressed
        stored[name] = name if i % 2 == 0 else f"20261129/{name}.bz2"
        in_storage(dep, stored[name], {"OBJECT": name})
        archive.add_file(stored[name], names[name])
    uploads = []
    for n in range(3):
        staged_by_web(dep, f"20261130/N20261130S{n + 1:04d}.fits", seed=10 + n)
        uploads.append(archive.add_upload(f"N20261130S{n + 1:04d}.fits", "20261130"))
    handler = readme_block("after") + README_HANDLER + readme_block("unchanged") + """
# our own shape too, through the same queue
fq.add(FileOpsRequest("update_headers", {"filename": files[0][0],
                                         "values": {"generic": {"NESTED": n}}}))
print(json.dumps("done"))
"""
    before = utcnow()
    procs = [subprocess.Popen(["runuser", "-u", WEB, "--", dep.accounts.python, "-c", handler,
                               str(n), json.dumps(names), json.dumps(uploads)],
                              env=dep.env(WEB), cwd="/", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for n in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0 and "done" in out, err
    try:
        wait_for(lambda: ended(dep, "update_headers") == 9 and ended(dep, "ingest_upload") == 3,
                 timeout=120, what="9 header edits and 3 uploads answered")
    except AssertionError:
        raise AssertionError(f"worker log: {worker_log(dep)[-3000:]}") from None
    after = utcnow()
    rows = {(r["path"], r["filename"]): r for r in archive.ingestqueue()}
    want = {}
    for k in range(1, 7):                    # the edits: their update_headers' rows
        folder, _, base = stored[f"N20261129S{k:04d}.fits"].rpartition("/")
        want[(folder, base)] = {"sortkey": f"z20261129{k:04d}", "no_defer": True,
                                "batch": None}
    for n in range(3):                       # the uploads: their ingest_upload's rows
        want[("20261130", f"N20261130S{n + 1:04d}.fits")] = {
            "sortkey": f"z20261130{n + 1:04d}", "no_defer": False, "batch": f"batch-{n}"}
    assert sorted(rows) == sorted(want)
    for (folder, base), expected in want.items():
        check_entry(rows[(folder, base)], base, folder, between=(before, after), **expected)
    popped = []
    while (row := archive.pop()) is not None:
        popped.append(row["filename"])
    assert popped == [f"N20261130S{n:04d}.fits" for n in (3, 2, 1)] + [
        stored[name].rpartition("/")[2] for name in sorted(names, reverse=True)]
    for n, upload_id in enumerate(uploads):
        log = archive.fileuploadlog(upload_id)
        assert (log["destination"], log["file_ok"]) == (
            f"20261130/N20261130S{n + 1:04d}.fits", True)
    for i, name in enumerate(sorted(names)):
        hdr = fits.getheader(dep.storage / stored[name])
        assert hdr["OBSERVER"].startswith("web ")
        if i % 2 == 0:
            assert (hdr["RAWGEMQA"], hdr["RAWIQ"], hdr["RAWCC"]) == (
                "USABLE", "70-percentile", "50-percentile")
            assert "NESTED" in hdr
        else:
            assert hdr["RELEASE"] == "2027-06-01"
    assert not list((dep.staging / "20261130").iterdir())
    assert_clean_log(dep)


# -- their own fileops tests (fits_storage_tests/code_tests/test_fileopser.py) ----------

THEIR_REQUEST = """
import json, sys
from spoolops.compat.fitsstorage import FileopsQueue, FileOpsRequest
fq = FileopsQueue(session=None, logger=None)
fqreq = FileOpsRequest(request=sys.argv[1], args=json.loads(sys.argv[2]))
fqe = fq.add(fqreq, response_required=True)
response = fq.poll_for_response(fqe.id, timeout=60)
print(json.dumps(None if response is None else response.dict()))
"""


def their_request(dep: Deployment, request: str, args: dict[str, Any]) -> dict[str, Any]:
    """``FileopsQueue.add(..., response_required=True)`` then
    ``poll_for_response``, as the web user; the response's dict."""
    response = dep.py_json(WEB, THEIR_REQUEST, request, json.dumps(args), timeout=180)
    assert response is not None, f"no response; worker log: {worker_log(dep)[-3000:]}"
    return response


@pytest.mark.accounts
def test_their_echo(fitsstorage) -> None:
    dep, _archive = fitsstorage
    response = their_request(dep, "echo", {"echo": "Hello, world"})
    assert response["ok"] is True
    assert response["error"] == ""
    assert response["value"] == "Hello, world"


@pytest.mark.accounts
def test_their_ingest_upload(fitsstorage) -> None:
    dep, archive = fitsstorage
    filename = "N20200127S0023.fits.bz2"
    data = staged_by_web(dep, filename, seed=2)
    ful = archive.add_upload(filename, "")
    args = {"filename": filename, "path": "", "fileuploadlog_id": ful,
            "processed_cal": False}
    before_ut = utcnow()
    response = their_request(dep, "ingest_upload", args)
    after_ut = utcnow()
    # the file, and their check that it was queued for ingest
    assert (dep.storage / filename).read_bytes() == data, response
    [iqe] = [r for r in archive.ingestqueue() if r["filename"] == filename]
    assert iqe["filename"] == filename
    assert iqe["inprogress"] is False
    assert iqe["fail_dt"] == FAIL_DT_FALSE                       # iqe.failed is False
    assert before_ut < iqe["added"] < after_ut
    assert_clean_log(dep)
    # their response
    assert response["ok"] is True
    assert response["error"] == ""
    assert response["value"] is True


@pytest.mark.accounts
def test_their_update_headers(fitsstorage) -> None:
    dep, archive = fitsstorage
    filename = "N20200127S0023.fits.bz2"
    path = in_storage(dep, filename, {"RAWGEMQA": "USABLE", "RAWPIREQ": "NO",
                                      "RELEASE": "2020-07-27", "RAWIQ": "70-percentile",
                                      "RAWCC": "50-percentile", "SSA": "B. Cooper"})
    archive.add_file(filename, "GN-2020A-Q-1-1-023")
    # their sanity check of the initial headers (qa_state() 'Usable')
    hdr = fits.getheader(path)
    assert (hdr["RAWGEMQA"], hdr["RAWPIREQ"], hdr["RELEASE"], hdr["RAWIQ"], hdr["RAWCC"],
            hdr["SSA"]) == ("USABLE", "NO", "2020-07-27", "70-percentile", "50-percentile",
                            "B. Cooper")
    assert "KANGAROO" not in hdr
    args = {"filename": filename, "qa_state": "Fail", "release": "2025-01-23",
            "raw_site": ["iqany", "cc80"],
            "generic": {"KANGAROO": "Jumpy", "SSA": "Mickey Mouse"}}
    before = utcnow()
    response = their_request(dep, "update_headers", args)
    after = utcnow()
    # their final headers (qa_state() 'Fail': RAWGEMQA BAD, RAWPIREQ NO)
    hdr = fits.getheader(path)
    assert (hdr["RAWGEMQA"], hdr["RAWPIREQ"], hdr["RELEASE"], hdr["RAWIQ"], hdr["RAWCC"],
            hdr["SSA"], hdr["KANGAROO"]) == ("BAD", "NO", "2025-01-23", "Any",
                                             "80-percentile", "Mickey Mouse", "Jumpy"), response
    # queued for ingest as their update_headers queues it
    [row] = archive.ingestqueue()
    check_entry(row, filename, "", "z202001270023", no_defer=True, batch=None,
                between=(before, after))
    assert_clean_log(dep)
    # their response
    assert response["ok"] is True
    assert response["error"] == ""
    assert response["value"] is None
