"""The drop-in for Gemini FitsStorage: its request shapes, its follow-up
ingest, retries that are safe, and its queue API (``spoolops.compat``).

Operation-level checks run the operations in-process on real files (as
``test_update_headers.py`` does); everything about hooks, resolvers,
crashes and the compat API runs a real worker.  The site package of
``docs/examples/fitsstorage_site`` is exercised against their tables in a
real PostgreSQL in ``test_fitsstorage_pg.py``, which also runs their web
handlers as real accounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from astropy.io import fits
from support import fitsfiles
from support.env import SpoolEnv, make_spool_env
from support.requires import require_fitsverify
from support.waiting import wait_for

from spoolops import BadRequest, Conflict, NotFound
from spoolops.ops import OpContext
from spoolops.ops.headers import UPDATE_HEADERS
from spoolops.ops.ingest import INGEST_UPLOAD
from spoolops.transport.spool.names import HELD_SUFFIX

PROJECT = Path(__file__).resolve().parent.parent
SITE = PROJECT / "docs" / "examples" / "fitsstorage_site"
KINDS = ["", "gz", "bz2"]
# every value key, the way each shape sends it
NESTED = {"values": {"qa_state": "pass", "raw_site": ["iq70", "cc50"],
                     "release": "2027-01-01",
                     "generic": {"OBSERVER": "Flat Form", "SEQNUM": 7}}}
FLAT = {"qa_state": "Pass", "raw_site": ["iq70", "cc50"], "release": "2027-01-01",
        "generic": [["OBSERVER", "Flat Form"], ["SEQNUM", 7]]}



def stored(ctx: OpContext, name: str, kind: str = "", seed: int = 0) -> str:
    src = fitsfiles.simple_image(ctx.work_dir.parent / f"src-{seed}.fits", seed=seed)
    dest = ctx.config.storage_root / name
    shutil.copyfile(src, dest)
    if kind:
        packed = fitsfiles.compress_file(dest, kind)
        dest.unlink()
        dest = packed
    return dest.name


def edit(ctx: OpContext, **args) -> dict:
    return UPDATE_HEADERS.run(ctx, UPDATE_HEADERS.validate(args, ctx))


# -- the request shapes ----------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_flat_and_nested_shapes_give_byte_identical_files(ctx: OpContext, kind: str) -> None:
    require_fitsverify()
    a = stored(ctx, "a.fits", kind)
    b = stored(ctx, "b.fits", kind)
    assert (ctx.config.storage_root / a).read_bytes() == (ctx.config.storage_root / b
                                                          ).read_bytes()
    nested = edit(ctx, filename=a, **NESTED)
    flat = edit(ctx, filename=b, **FLAT)
    assert nested["changes"] == flat["changes"] and nested["modified"] and flat["modified"]
    data_a = (ctx.config.storage_root / a).read_bytes()
    assert data_a == (ctx.config.storage_root / b).read_bytes()
    hdr = fits.getheader(ctx.config.storage_root / a)
    assert (hdr["RAWGEMQA"], hdr["RAWPIREQ"], hdr["RAWIQ"], hdr["RAWCC"], hdr["RELEASE"],
            hdr["OBSERVER"], hdr["SEQNUM"]) == ("USABLE", "YES", "70-percentile",
                                                "50-percentile", "2027-01-01", "Flat Form", 7)
    assert fitsfiles.fitsverify_errors(ctx.config.storage_root / a) == 0


@pytest.mark.parametrize("key,value", [("qa_state", "FAIL"), ("raw_site", "bgany"),
                                       ("raw_site", ["wv20", "bg80"]),
                                       ("release", "2028-02-29"),
                                       ("generic", {"OBJECT": "x"}),
                                       ("generic", [["OBJECT", "x"], ["AIRMASS", 1.5]])])
def test_each_value_key_in_each_shape(ctx: OpContext, key: str, value: object) -> None:
    one = stored(ctx, "one.fits")
    two = stored(ctx, "two.fits")
    assert edit(ctx, filename=one, values={key: value})["changes"] == \
        edit(ctx, filename=two, **{key: value})["changes"]


def test_shapes_are_never_mixed_and_unknown_keys_stay_errors(ctx: OpContext) -> None:
    name = stored(ctx, "m.fits")
    for bad in ({"values": {"qa_state": "Pass"}, "release": "2027-01-01"},
                {"qa_stat": "Pass"}, {"values": {"qa_state": "Pass"}, "bogus": 1},
                {"generic": [["OBJECT", "a"], ["object", "b"]]},
                {"generic": [["OBJECT"]]}, {"generic": []}):
        with pytest.raises(BadRequest):
            UPDATE_HEADERS.validate({"filename": name, **bad}, ctx)


def test_pair_list_keeps_its_order(ctx: OpContext) -> None:
    name = stored(ctx, "order.fits")
    result = edit(ctx, filename=name, generic=[["ZEBRA", 1], ["ALPHA", 2], ["MIDDLE", 3]])
    assert [c["keyword"] for c in result["changes"]] == ["ZEBRA", "ALPHA", "MIDDLE"]
    keys = list(fits.getheader(ctx.config.storage_root / name))
    assert keys.index("ZEBRA") < keys.index("ALPHA") < keys.index("MIDDLE")


@pytest.mark.parametrize("kind", ["gz", "bz2"])
def test_a_name_without_bz2_finds_the_stored_file(ctx: OpContext, kind: str) -> None:
    packed = stored(ctx, "N1.fits", kind)
    assert packed == f"N1.fits.{kind}"
    result = edit(ctx, filename="N1.fits", values={"qa_state": "Check"})
    assert result["filename"] == packed
    assert fits.getheader(ctx.config.storage_root / packed)["RAWGEMQA"] == "CHECK"
    stored(ctx, "N1.fits")                               # now two candidates
    with pytest.raises(Conflict, match="could be any of"):
        UPDATE_HEADERS.validate({"filename": "N1.fits", "qa_state": "Pass"}, ctx)
    with pytest.raises(NotFound):
        UPDATE_HEADERS.validate({"filename": "N9.fits", "qa_state": "Pass"}, ctx)


def test_data_label_needs_a_resolver(ctx: OpContext) -> None:
    name = stored(ctx, "dl.fits")
    with pytest.raises(BadRequest, match="no resolver"):
        UPDATE_HEADERS.validate({"data_label": "GN-2026B-Q-1-1-001", "qa_state": "Pass"}, ctx)
    ctx.resolvers = {"data_label": lambda label, c: {"GN-2026B-Q-1-1-001": name}.get(label)}
    clean = UPDATE_HEADERS.validate({"data_label": "GN-2026B-Q-1-1-001", "qa_state": "Pass"},
                                    ctx)
    assert clean["filename"] == name and clean["data_label"] == "GN-2026B-Q-1-1-001"
    with pytest.raises(NotFound):
        UPDATE_HEADERS.validate({"data_label": "GN-none", "qa_state": "Pass"}, ctx)
    with pytest.raises(BadRequest, match="one of them"):
        UPDATE_HEADERS.validate({"data_label": "x", "filename": name, "qa_state": "Pass"}, ctx)


# -- ingest_upload: where FitsStorage stages, and retries ------------------------------

def stage(ctx: OpContext, rel: str, data: bytes) -> Path:
    path = ctx.config.upload_staging_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def ingest(ctx: OpContext, **args) -> dict:
    return INGEST_UPLOAD.run(ctx, INGEST_UPLOAD.validate(args, ctx))


def test_staged_at_path_else_at_the_top_never_both(ctx: OpContext) -> None:
    stage(ctx, "2026/a.fits", b"current web code")
    assert ingest(ctx, filename="a.fits", path="2026")["path"] == "2026/a.fits"
    stage(ctx, "b.fits", b"older web code")
    assert ingest(ctx, filename="b.fits", path="2026")["path"] == "2026/b.fits"
    stage(ctx, "cal.fits", b"a processed calibration")
    result = ingest(ctx, filename="cal.fits", processed_cal=True, fileuploadlog_id=12,
                    batch="nightly")
    assert result["path"] == "processed_cals/cal.fits"
    stage(ctx, "2026/c.fits", b"one")
    stage(ctx, "c.fits", b"two")
    with pytest.raises(Conflict, match="staged twice"):
        INGEST_UPLOAD.validate({"filename": "c.fits", "path": "2026"}, ctx)


def test_a_repeated_upload_is_ok_already_and_other_bytes_conflict(ctx: OpContext) -> None:
    data = b"x" * 5000
    md5 = hashlib.md5(data).hexdigest()
    stage(ctx, "2026/r.fits", data)
    first = ingest(ctx, filename="r.fits", path="2026", md5=md5)
    assert "already" not in first
    stage(ctx, "2026/r.fits", data)                        # the same upload, again
    again = ingest(ctx, filename="r.fits", path="2026", md5=md5)
    assert again["already"] is True and again["md5"] == md5
    assert not (ctx.config.upload_staging_dir / "2026" / "r.fits").exists()
    stage(ctx, "2026/r.fits", b"y" * 5000)                 # other bytes
    with pytest.raises(Conflict, match="other contents"):
        ingest(ctx, filename="r.fits", path="2026")
    assert (ctx.config.storage_root / "2026" / "r.fits").read_bytes() == data
    assert INGEST_UPLOAD.idempotent


# -- their meanings for their shapes (issue 18) ----------------------------------------

def test_their_null_writes_a_keyword_with_no_value_ours_deletes(ctx: OpContext) -> None:
    """FitsStorage's ``header[kw] = None``: the card stays, with no value
    (a valid FITS card; fitsverify objects only where the standard reserves a
    keyword for strings, e.g. OBJECT, as it would for their own edit)."""
    judge = require_fitsverify()
    name = stored(ctx, "blank.fits")
    path = ctx.config.storage_root / name
    edit(ctx, filename=name, generic={"OBSNOTE": "x", "NEWBLANK": "y"})
    result = edit(ctx, filename=name, generic={"OBSNOTE": None, "NEWBLANK": None})
    hdr = fits.getheader(path)
    assert "OBSNOTE" in hdr and hdr["OBSNOTE"] is None and "NEWBLANK" in hdr
    assert isinstance(hdr.cards["OBSNOTE"].value, fits.card.Undefined)
    assert result["modified"] is True
    assert edit(ctx, filename=name, generic={"OBSNOTE": None})["modified"] is False
    assert judge and fitsfiles.fitsverify_errors(path) == 0
    edit(ctx, filename=name, values={"generic": {"OBSNOTE": None}})      # ours: delete
    assert "OBSNOTE" not in fits.getheader(path)


def test_their_reject_new_guards_only_generic(ctx: OpContext) -> None:
    name = stored(ctx, "guard.fits")
    path = ctx.config.storage_root / name
    assert "RAWGEMQA" not in fits.getheader(path)
    edit(ctx, filename=name, qa_state="Pass", reject_new=True)          # theirs: written
    assert fits.getheader(path)["RAWGEMQA"] == "USABLE"
    with pytest.raises(Conflict, match="NEWKW"):
        edit(ctx, filename=name, qa_state="Fail", generic={"NEWKW": 1}, reject_new=True)
    assert fits.getheader(path)["RAWGEMQA"] == "USABLE"                 # all or nothing
    with pytest.raises(Conflict, match="RELEASE"):                       # ours: every card
        edit(ctx, filename=name, values={"release": "2027-01-01"}, reject_new=True)


def test_their_release_dates_are_strptime_dates_written_as_given(ctx: OpContext) -> None:
    name = stored(ctx, "rel.fits")
    edit(ctx, filename=name, release="2024-1-5")
    assert fits.getheader(ctx.config.storage_root / name)["RELEASE"] == "2024-1-5"
    for bad in ("2024-13-01", "tomorrow", 20240105):
        with pytest.raises(BadRequest):
            edit(ctx, filename=name, release=bad)
    with pytest.raises(BadRequest):
        edit(ctx, filename=name, values={"release": "2024-1-5"})        # ours: YYYY-MM-DD


def test_a_filename_resolver_finds_files_in_any_folder(ctx: OpContext) -> None:
    (ctx.config.storage_root / "processed_cals").mkdir()
    name = stored(ctx, "N20261129S0001_bias.fits")
    os.rename(ctx.config.storage_root / name, ctx.config.storage_root / "processed_cals" / name)
    with pytest.raises(NotFound):
        UPDATE_HEADERS.validate({"filename": name, "qa_state": "Pass"}, ctx)
    where = {name: f"processed_cals/{name}"}
    ctx.resolvers = {"filename": lambda n, c: where.get(n.removesuffix(".bz2"))}
    clean = UPDATE_HEADERS.validate({"filename": name + ".bz2", "qa_state": "Pass"}, ctx)
    assert clean["filename"] == f"processed_cals/{name}"
    with pytest.raises(NotFound):
        UPDATE_HEADERS.validate({"filename": "N1.fits", "qa_state": "Pass"}, ctx)
    ctx.resolvers = {"filename": lambda n, c: "../etc/passwd.fits"}
    with pytest.raises(BadRequest):                  # a resolver's answer is confined too
        UPDATE_HEADERS.validate({"filename": name, "qa_state": "Pass"}, ctx)


def test_their_upload_replaces_and_says_what_it_replaced(ctx: OpContext) -> None:
    old, new = b"old" * 1000, b"newer" * 1000
    stage(ctx, "2026/e.fits", old)
    ingest(ctx, filename="e.fits", path="2026", fileuploadlog_id=1, processed_cal=False)
    stage(ctx, "2026/e.fits", new)
    with pytest.raises(Conflict):                                      # ours: never replaces
        ingest(ctx, filename="e.fits", path="2026")
    result = ingest(ctx, filename="e.fits", path="2026", fileuploadlog_id=2,
                    processed_cal=False)
    target = ctx.config.storage_root / "2026" / "e.fits"
    assert target.read_bytes() == new
    assert result["replaced_md5"] == hashlib.md5(old).hexdigest()
    assert result["md5"] == hashlib.md5(new).hexdigest()
    assert oct(target.stat().st_mode & 0o777) == oct(ctx.config.file_mode)
    assert not (ctx.config.upload_staging_dir / "2026" / "e.fits").exists()


def test_a_misc_file_takes_its_metadata_along(ctx: OpContext) -> None:
    stage(ctx, "miscfile_notes.pdf", b"%PDF-1.4 notes")
    meta = json.dumps({"filename": "notes.pdf", "is_misc": "True", "release": "2027-01-01",
                       "description": "d", "program": "GN-2026B-Q-1"}).encode()
    stage(ctx, "miscfile_notes.pdf.json", meta)
    result = ingest(ctx, filename="miscfile_notes.pdf", path="", fileuploadlog_id=5,
                    processed_cal=False)
    assert result["sidecar"] == "miscfile_notes.pdf.json"
    assert (ctx.config.storage_root / "miscfile_notes.pdf.json").read_bytes() == meta
    assert (ctx.config.storage_root / "miscfile_notes.pdf").read_bytes() == b"%PDF-1.4 notes"
    assert not list(ctx.config.upload_staging_dir.iterdir())


def test_kept_hook_calls_back_off_and_count_as_failed_after_five_tries(tmp_path: Path
                                                                       ) -> None:
    from spoolops.hookledger import BACKOFF_S, FAILED_AFTER, HookCall, HookLedger
    ledger = HookLedger(tmp_path, durable=False)
    call = ledger.record(HookCall("r1", "k", "ingest_queue", "update_headers", {"a": 1},
                                  {"b": 2}, "fitsweb"), "OperationalError: down", now=1000.0)
    assert ledger.due(now=1000.0) == [] and ledger.due(now=1000.0 + BACKOFF_S[0])
    for n in range(2, FAILED_AFTER + 1):
        assert ledger.counts() == {"pending": 1, "failed": 0}
        ledger.failed_again(call, f"down {n}", now=2000.0)
        assert ledger.calls()[0].next_at == 2000.0 + BACKOFF_S[n - 1]
    assert ledger.counts() == {"pending": 0, "failed": 1}
    assert ledger.retry_now("r1") == 1 and ledger.due(now=0.0)
    assert ledger.drop("r1") == 1 and ledger.calls() == []


# -- hooks, resolver and crashes through a real worker ----------------------------------

@pytest.fixture
def site(tmp_path: Path):
    env = make_spool_env(tmp_path / "tree", durable=True)
    env.hook_log = tmp_path / "hooks.jsonl"
    env.labels = tmp_path / "labels.json"
    yield env
    env.close()


def _worker(env: SpoolEnv, *args: str, **extra: str):
    return env.start_worker(*args, SPOOLOPS_TEST_HOOK_LOG=str(env.hook_log),
                            SPOOLOPS_TEST_LABELS=str(env.labels), **extra)


def _hook_calls(env: SpoolEnv) -> list[dict]:
    if not env.hook_log.exists():
        return []
    return [json.loads(line) for line in env.hook_log.read_text().splitlines()]


def _fits_in_storage(env: SpoolEnv, name: str) -> Path:
    src = fitsfiles.simple_image(env.base / f"src-{name}", shape=(32, 32))
    dest = env.config.storage_root / name
    shutil.copyfile(src, dest)
    return dest


def test_hooks_get_op_args_result_once_and_data_label_resolves(site: SpoolEnv) -> None:
    path = _fits_in_storage(site, "h.fits")
    site.labels.write_text(json.dumps({"GS-2026B-Q-7-1-001": "h.fits"}))
    _worker(site)
    client = site.client()
    result = client.call("update_headers", {"data_label": "GS-2026B-Q-7-1-001",
                                            "qa_state": "Fail", "batch": "b1"}, timeout=60)
    assert result["filename"] == "h.fits" and fits.getheader(path)["RAWGEMQA"] == "BAD"
    stage_dir = site.config.upload_staging_dir / "2026"
    stage_dir.mkdir()
    (stage_dir / "u.fits").write_bytes(path.read_bytes())
    client.call("ingest_upload", {"filename": "u.fits", "path": "2026",
                                  "fileuploadlog_id": 41, "batch": "b2"}, timeout=60)
    assert client.call("echo", {"x": 1}, timeout=30) == {"x": 1}     # no hook for echo
    calls = _hook_calls(site)
    assert [c["op"] for c in calls] == ["update_headers", "ingest_upload"]
    assert calls[0]["args"]["batch"] == "b1" and calls[0]["result"]["filename"] == "h.fits"
    assert calls[0]["args"]["data_label"] == "GS-2026B-Q-7-1-001"
    assert (calls[1]["args"]["fileuploadlog_id"], calls[1]["args"]["batch"]) == (41, "b2")
    assert calls[1]["result"]["path"] == "2026/u.fits"


def test_a_failing_hook_leaves_the_change_and_warns(site: SpoolEnv) -> None:
    path = _fits_in_storage(site, "w.fits")
    _worker(site, SPOOLOPS_TEST_HOOK_FAIL="1")
    reply = site.client().call_reply("update_headers", {"filename": "w.fits",
                                                        "qa_state": "Pass"}, timeout=60)
    assert reply.ok and reply.result["modified"] is True
    assert reply.raw["warnings"] == [{"hook": "record", "error": "RuntimeError: deliberate"
                                      " failure of a follow-up hook", "retrying": True}]
    assert reply.raw["hooks"] == {"record": "retrying"}
    assert fits.getheader(path)["RAWGEMQA"] == "USABLE"
    log = site.workers[0].log_path.read_text()
    assert "event=hook_failed" in log and "hook=record" in log


@pytest.mark.parametrize("point", ["follow_up.start:1", "follow_up.noted:1"])
def test_hooks_run_once_per_change_across_a_crash(site: SpoolEnv, point: str) -> None:
    """SIGKILL after the change is committed -- before the hooks, or after a
    hook and its note -- then restart: the request is re-run (idempotent)
    and the hook has run exactly once."""
    path = _fits_in_storage(site, "k.fits")
    first = _worker(site, SPOOLOPS_FAULT=point)
    client = site.client()
    rid = client.submit("update_headers", {"filename": "k.fits", "qa_state": "Check"})
    assert first.wait(60) == -signal.SIGKILL
    assert fits.getheader(path)["RAWGEMQA"] == "CHECK"           # committed before the kill
    _worker(site)
    reply = client.wait(rid, timeout=60)
    assert reply.ok and reply.result["modified"] is False        # the re-run found it done
    assert [c["id"] for c in _hook_calls(site)] == [rid]


@pytest.mark.parametrize("point", ["bytes:1048577", "ingest.after_publish:1",
                                   "ingest.after_staged_unlink:1"])
def test_a_crash_during_ingest_is_re_run_to_completion(site: SpoolEnv, point: str) -> None:
    data = os.urandom(3 * 1024 * 1024)
    staged = site.config.upload_staging_dir / "big.fits"
    staged.write_bytes(data)
    first = _worker(site, SPOOLOPS_FAULT=point)
    client = site.client()
    rid = client.submit("ingest_upload", {"filename": "big.fits", "path": "2026"})
    assert first.wait(60) == -signal.SIGKILL
    _worker(site)
    reply = client.wait(rid, timeout=60)
    assert reply.ok, reply.error                                  # not Interrupted
    assert (site.config.storage_root / "2026" / "big.fits").read_bytes() == data
    assert not staged.exists()
    assert reply.result["md5"] == hashlib.md5(data).hexdigest()
    assert len(_hook_calls(site)) == 1


# -- the compat API and the sample site package ------------------------------------------

def test_compat_queue_api_returns_their_shapes(site: SpoolEnv) -> None:
    _fits_in_storage(site, "c.fits")
    _worker(site)
    code = """
import json
from spoolops.compat.fitsstorage import FileOpsRequest, FileopsQueue, submit
fq = FileopsQueue(session=None, logger=None)
fqe = fq.add(FileOpsRequest(request="echo", args={"echo": "Hello, world"}),
             response_required=True)
ping = fq.poll_for_response(fqe.id).dict()
bad = fq.poll_for_response(fq.add(FileOpsRequest("update_headers",
                                                 {"filename": "c.fits", "qa_state": "??"}),
                                  response_required=True).id)
flat = submit({"request": "update_headers", "args": {"filename": "c.fits",
               "raw_site": "iq20"}}, response_required=True, batch="b9")
rid = submit({"request": "echo", "args": {}})
print(json.dumps([ping, bad.dict(), flat, isinstance(rid, str)]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, env=site.env())
    assert done.returncode == 0, done.stderr
    ping, bad, flat, async_id = json.loads(done.stdout.strip().splitlines()[-1])
    # their worker's values (test_fileopser.py asserts them)
    assert ping == {"ok": True, "error": "", "value": "Hello, world"}
    assert bad["ok"] is False and bad["error"].startswith("BadRequest: qa_state")
    assert flat == {"ok": True, "error": "", "value": None} and async_id
    assert _hook_calls(site)[-1]["args"]["batch"] == "b9"


def test_a_failed_hook_is_kept_and_retried_until_it_succeeds(site: SpoolEnv,
                                                             tmp_path: Path) -> None:
    """The archive's database is down: the edit stands, the reply says the
    hook is retrying, status and metrics count it; a restarted worker still
    has it; once the database is back, 'hooks retry' runs it and it is gone."""
    path = _fits_in_storage(site, "k.fits")
    down = tmp_path / "database-down"
    down.write_text("")
    worker = _worker(site, SPOOLOPS_TEST_HOOK_FAIL=str(down))
    reply = site.client().call_reply("update_headers", {"filename": "k.fits",
                                                        "qa_state": "Fail"}, timeout=60)
    assert reply.ok and reply.raw["hooks"] == {"record": "retrying"}
    assert fits.getheader(path)["RAWGEMQA"] == "BAD"
    listed = json.loads(site.spoolops("hooks", "--json").stdout)
    assert [(c["id"], c["hook"], c["state"], c["tries"]) for c in listed] == [
        (reply.id, "record", "pending", 1)]
    status = json.loads(site.spoolops("status", "--json").stdout)
    assert status["hooks"] == {"pending": 1, "failed": 0}
    assert 'spoolops_hooks{state="pending"} 1' in site.spoolops("status",
                                                               "--prometheus").stdout
    site.stop_worker(worker, signal.SIGKILL)
    down.unlink()                                        # the database is back
    worker = _worker(site, SPOOLOPS_TEST_HOOK_FAIL=str(down))
    assert site.spoolops("hooks", "retry", "--all").returncode == 0
    wait_for(lambda: not json.loads(site.spoolops("hooks", "--json").stdout), timeout=60,
             what="the kept hook call to succeed")
    calls = [c for c in _hook_calls(site) if c["id"] == reply.id]
    assert len(calls) == 2 and calls[1]["args"]["filename"] == "k.fits"
    assert json.loads(site.spoolops("status", "--json").stdout)["hooks"] == {
        "pending": 0, "failed": 0}
    assert "event=hook_retried" in worker.log_path.read_text()


def test_fire_and_forget_leaves_nothing_behind(site: SpoolEnv) -> None:
    """Every production caller of theirs sends response_required=False: the
    worker answers nobody and nothing of the request stays in the spool,
    failures included (they reach the log and the metrics)."""
    path = _fits_in_storage(site, "f.fits")
    worker = _worker(site)
    code = """
import json
from spoolops.compat.fitsstorage import FileOpsRequest, FileopsQueue
fq = FileopsQueue(session=None, logger=None)
ok = fq.add(FileOpsRequest("update_headers", {"filename": "f.fits", "qa_state": "Fail"}))
bad = fq.add(FileOpsRequest("update_headers", {"filename": "f.fits", "qa_state": "??"}))
print(json.dumps([ok.id, bad.id]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, env=site.env())
    assert done.returncode == 0, done.stderr
    ok, bad = json.loads(done.stdout.strip().splitlines()[-1])
    log = site.wait_log(worker, f"id={bad} op=update_headers")
    site.wait_log(worker, f"event=end id={ok}")
    wait_for(lambda: not list(site.spool.pending.iterdir()), what="the marks to go")
    assert fits.getheader(path)["RAWGEMQA"] == "BAD"
    sp = site.spool
    for folder in (sp.new, sp.active, sp.replies, sp.failed, sp.tmp, sp.pending):
        assert list(folder.iterdir()) == [], folder
    assert "error=BadRequest" in log
    metrics = site.spoolops("status", "--prometheus").stdout
    assert 'spoolops_served_total{op="update_headers",outcome="BadRequest"} 1' in metrics
    assert 'spoolops_served_total{op="update_headers",outcome="ok"} 1' in metrics


def test_pending_batches_and_queue_length_with_no_worker(site: SpoolEnv) -> None:
    """What their reducer's after_batch gate reads: true while no worker runs,
    and until a request's hooks are done; any member may ask (real accounts:
    ``test_fitsstorage_threats``' flood of marks, read by another member)."""
    from spoolops.compat import fitsstorage as compat
    _fits_in_storage(site, "p.fits")
    client = site.client()
    assert client.pending_batches() == set() and client.queue_length() == 0
    client.submit("update_headers", {"filename": "p.fits", "qa_state": "Pass",
                                     "batch": "night-1"}, reply=False)
    client.submit("echo", {"batch": "cal-2"})
    client.submit("echo", {})
    assert client.pending_batches() == {"night-1", "cal-2"} and client.queue_length() == 3
    compat._client = client
    try:
        assert compat.pending_batches() == {"night-1", "cal-2"} and compat.queue_length() == 3
    finally:
        compat._client = None
    _worker(site, "--once")
    site.workers[-1].wait(60)
    assert client.pending_batches() == set() and client.queue_length() == 0


def _edit_while_the_database_is_down(site: SpoolEnv, tmp_path: Path, name: str,
                                     batch: str):
    """A worker whose hook fails while the file ``down`` exists, and an edit
    of ``name`` in ``batch`` answered with its hook kept for a retry: the
    client, the reply and ``down``."""
    _fits_in_storage(site, name)
    down = tmp_path / "database-down"
    down.write_text("")
    _worker(site, SPOOLOPS_TEST_HOOK_FAIL=str(down))
    client = site.client()
    reply = client.call_reply("update_headers", {"filename": name, "qa_state": "Pass",
                                                 "batch": batch}, timeout=60)
    assert reply.raw["hooks"] == {"record": "retrying"}
    return client, reply, down


def test_a_batch_stays_pending_while_its_hook_is_retried(site: SpoolEnv,
                                                         tmp_path: Path) -> None:
    client, _, down = _edit_while_the_database_is_down(site, tmp_path, "h2.fits", "b-hook")
    # the worker settles the request's mark after the answer is published:
    # held (its batch pending), not released
    pending = site.config.root / "pending"
    wait_for(lambda: any(name.endswith(HELD_SUFFIX) for name in os.listdir(pending)),
             timeout=30, what="the request's mark held while its hook waits")
    assert client.pending_batches() == {"b-hook"}            # the re-ingest is not queued yet
    down.unlink()
    assert site.spoolops("hooks", "retry", "--all").returncode == 0
    wait_for(lambda: client.pending_batches() == set(), timeout=60,
             what="the batch to be done once its hook ran")


def test_an_operator_gives_up_a_kept_hook_call(site: SpoolEnv, tmp_path: Path) -> None:
    """doctor counts a kept call; 'hooks drop ID' gives it up: listed no
    more, not retried, and its request's batch no longer pending."""
    client, reply, down = _edit_while_the_database_is_down(site, tmp_path, "d.fits", "b-drop")
    doctor = site.spoolops("doctor", "--all")
    assert "1 follow-up hook call(s) wait for a retry" in doctor.stdout, doctor.stdout
    wait_for(lambda: client.pending_batches() == {"b-drop"}, timeout=30,
             what="the batch pending while its hook waits")
    assert site.spoolops("hooks", "drop", "no-such-id").returncode != 0
    dropped = site.spoolops("hooks", "drop", reply.id)
    assert dropped.returncode == 0 and "drop: 1 hook call(s)" in dropped.stdout, dropped.stderr
    assert json.loads(site.spoolops("hooks", "--json").stdout) == []
    wait_for(lambda: client.pending_batches() == set(), timeout=30,
             what="the batch released once its hook call was given up")
    assert "no follow-up hook call waits for a retry" in site.spoolops("doctor",
                                                                        "--all").stdout
    down.unlink()
    assert site.spoolops("hooks", "retry", "--all").returncode != 0   # nothing to retry
    assert len([c for c in _hook_calls(site) if c["id"] == reply.id]) == 1   # its first try
