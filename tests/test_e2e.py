"""The end-to-end suite, run against BOTH transports (the filesystem spool and
PostgreSQL): a real worker process, real clients in other processes, the
same assertions.  What is particular to one transport lives in
``test_worker.py``/``test_client.py`` (the spool) and ``test_pg.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.env import TRANSPORTS, queue_for
from support.fitsfiles import fitsverify_errors, simple_image
from support.requires import require_fitsverify
from support.waiting import wait_for

from spoolops import (
    BadRequest,
    Client,
    Expired,
    OpFailed,
    PermissionDenied,
    Timeout,
    UnknownOp,
)
from spoolops.janitor import run_janitor


def test_round_trip_and_reply_fields(served) -> None:
    client = served.client()
    assert client.call("echo", {"x": 1, "s": "é"}, timeout=30) == {"x": 1, "s": "é"}
    rid = client.submit("echo", {"k": "v"})
    raw = client.wait(rid, timeout=30).raw
    assert set(raw) == {"version", "id", "op", "ok", "result", "error", "submitted_by",
                        "queued_at", "started_at", "finished_at", "worker"}
    assert raw["id"] == rid and raw["ok"] is True and raw["result"] == {"k": "v"}
    assert raw["queued_at"] <= raw["started_at"] <= raw["finished_at"]
    assert raw["worker"]["pid"] == served.workers[0].pid
    # collected: nothing left behind, nothing queued or running
    assert served.replies_left() == 0 and served.quiet()
    # the command line, as the web user
    out = subprocess.run([sys.executable, "-m", "spoolops", "call", "echo", "--arg", "a=b"],
                         capture_output=True, text=True, env=served.client_env(), timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["result"] == {"a": "b"}


def test_errors_become_typed_exceptions(served) -> None:
    client = served.client()
    with pytest.raises(UnknownOp) as info:
        client.call("no_such_op", {}, timeout=30)
    assert "no_such_op" in info.value.message and info.value.reply.id
    with pytest.raises(OpFailed) as info:
        client.call("crash", {}, timeout=30)
    assert "deliberate failure" in info.value.message
    assert client.call("echo", {"after": True}, timeout=30) == {"after": True}


def _client_process(env: dict, proc_no: int, count: int, results) -> None:
    os.environ.update(env)
    client = Client()
    out = [tuple(client.call("echo", {"proc": proc_no, "n": n}, timeout=120).values())
           for n in range(count)]
    results.put((proc_no, out))


@pytest.mark.slow
def test_eight_client_processes(served) -> None:
    ctx = multiprocessing.get_context("spawn")   # fresh processes, as web workers are
    results = ctx.Queue()
    env = {"SPOOLOPS_CONFIG": served.client_env()["SPOOLOPS_CONFIG"]}
    procs = [ctx.Process(target=_client_process, args=(env, i, 100, results))
             for i in range(8)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert got == {i: [(i, n) for n in range(100)] for i in range(8)}
    assert served.replies_left() == 0 and served.quiet()


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("concurrency", [1, 8])
def test_priority_then_time_then_id(request, tmp_path: Path, kind: str,
                                    concurrency: int) -> None:
    env = queue_for(request, tmp_path, kind, durable=True, concurrency=concurrency)
    client = env.client()
    base = time.time() - 1000
    plan = [(0, 5, "p0-late"), (0, 1, "p0-early"), (5, 9, "p5-late"), (5, 3, "p5-early"),
            (-1, 0, "pneg"), (0, 1, "p0-early-same-time"), (9, 20, "p9")]
    ids = {}
    for priority, offset, tag in plan:
        ids[tag] = client.submit("sleep", {"seconds": 0.05, "tag": tag, "target": "one-file"},
                                 priority=priority)
        env.set_queued_time(ids[tag], base + offset)
    proc = env.start_worker("--once", wait=False)
    assert proc.wait(120) == 0
    results = [client.wait(rid, timeout=30).result for rid in ids.values()]
    order = [r["tag"] for r in sorted(results, key=lambda r: r["start"])]
    same = sorted(["p0-early", "p0-early-same-time"], key=lambda t: ids[t])
    assert order == ["p9", "p5-early", "p5-late", *same, "p0-late", "pneg"]


def test_same_target_serialised_other_targets_parallel(served, tmp_path: Path) -> None:
    """A0 and B0 run side by side while A1, A2, B1, B2 wait for their target;
    an echo is not stuck behind them; released, each target's requests run
    one at a time in submission order."""
    client = served.client()
    release = tmp_path / "release"
    ids = [client.submit("hold", {"release": str(release), "target": t, "tag": f"{t}{i}"})
           for i in range(3) for t in "AB"]
    wait_for(lambda: served.running_targets() == ["A", "B"], what="A0 and B0 running")
    assert client.call("echo", {"fast": 1}, timeout=60) == {"fast": 1}
    assert served.running_targets() == ["A", "B"]
    release.touch()
    results = [client.wait(rid, timeout=120).result for rid in ids]
    for target in "AB":
        spans = sorted((r["start"], r["end"], r["tag"]) for r in results
                       if r["tag"][0] == target)
        assert [s[2] for s in spans] == [f"{target}{i}" for i in range(3)]
        for (_s1, e1, _), (s2, _e2, _) in itertools.pairwise(spans):
            assert s2 >= e1 - 0.001, f"{target}: two requests ran at once"


def test_deadline_expired(served) -> None:
    client = served.client()
    reply = client.wait(client.submit("echo", {"x": 1}, deadline=time.time() - 5), timeout=30)
    assert reply.ok is False and reply.error["type"] == "Expired"
    with pytest.raises(Expired):
        reply.raise_for_error()


def test_cancel_before_claim_and_timeout_withdraws(queue) -> None:
    client = queue.client()
    rid = client.submit("echo", {"x": 1})
    keep = client.submit("echo", {"x": 2})
    assert client.cancel(rid) is True
    assert client.cancel(rid) is False
    with pytest.raises(Timeout) as info:
        client.call("echo", {"x": 3}, timeout=0.5)   # no worker yet: withdrawn on timeout
    assert isinstance(info.value, TimeoutError)
    assert queue.count("queued") == 1
    proc = queue.start_worker("--once", wait=False)
    assert proc.wait(60) == 0
    assert client.wait(keep, timeout=10).result == {"x": 2}
    with pytest.raises(Timeout):
        client.wait(rid, timeout=0.3)
    assert queue.quiet() and queue.replies_left() == 0


def test_backlog_served_at_start(queue) -> None:
    client = queue.client()
    ids = [client.submit("echo", {"n": n}) for n in range(60)]
    queue.start_worker()
    for n, rid in enumerate(ids):
        assert client.wait(rid, timeout=60).result == {"n": n}
    assert queue.quiet()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_access_rules(request, tmp_path: Path, kind: str) -> None:
    """[access] names users (the spool: unix accounts; PostgreSQL: login roles);
    who submitted is what the transport says, never the request."""
    env = queue_for(request, tmp_path, kind, durable=True,
                    extra="[access]\nrestricted = nobody-allowed\n")
    env.start_worker()
    client = env.client()
    with pytest.raises(PermissionDenied) as info:
        client.call("restricted", {}, timeout=30)
    assert "may not call 'restricted'" in info.value.message
    me = client.call("whoami", {}, timeout=30)["user"]
    expected = "web1" if kind == "postgresql" else __import__("pwd").getpwuid(os.getuid())[0]
    assert me == expected


HOSTILE = [
    ("echo", "not an object"),
    ("update_headers", {"filename": "../../etc/passwd", "values": {"generic": {"X": 1}}}),
    ("update_headers", {"filename": "/etc/passwd", "values": {"generic": {"X": 1}}}),
    ("update_headers", {"filename": "a.fits", "values": {"generic": {"BAD KEY!": 1}}}),
    ("update_headers", {"filename": "a.fits", "values": {"generic": {"X": "\n" * 100}}}),
    ("ingest_upload", {"filename": "../x.fits", "path": ""}),
    ("sleep", {"seconds": 1e300}),
    ("sleep", {"seconds": True}),
    ("x" * 500, {}),
    ("echo\u0000", {}),
]


def test_hostile_requests_get_precise_errors(served) -> None:
    client = served.client()
    for op, args in HOSTILE:
        with pytest.raises((BadRequest, UnknownOp, PermissionDenied)) as info:
            client.call(op, args, timeout=30)
        assert info.value.message, (op, args)
    for args in ({"deep": json.loads("[" * 40 + "]" * 40)}, {"nan": float("nan")}):
        with pytest.raises(BadRequest):
            client.call("echo", args, timeout=30)
    with pytest.raises(BadRequest):
        client.call("echo", {}, priority=10**12, timeout=30)
    assert client.call("echo", {"still": "alive"}, timeout=30) == {"still": "alive"}
    assert served.quiet()


def test_fits_operations(served) -> None:
    """update_headers on a generated image and ingest_upload of another,
    judged by astropy and by fitsverify."""
    fitsverify = require_fitsverify()
    (served.config.storage_root / "night").mkdir(parents=True)
    path = simple_image(served.config.storage_root / "night" / "img.fits")
    client = served.client()
    result = client.call("update_headers", {"filename": "night/img.fits",
                                            "values": {"generic": {"OBJECT": "M31", "AIRMASS": 1.25}}},
                         timeout=60)
    assert result["modified"] is True and len(result["changes"]) == 2
    from astropy.io import fits
    with fits.open(path) as hdul:
        assert hdul[0].header["OBJECT"] == "M31" and hdul[0].header["AIRMASS"] == 1.25
    assert fitsverify_errors(path) == 0, fitsverify
    upload = simple_image(served.config.upload_staging_dir / "up.fits", seed=3)
    digest = hashlib.md5(upload.read_bytes()).hexdigest()
    result = client.call("ingest_upload", {"filename": "up.fits", "path": "night",
                                           "md5": digest}, timeout=60)
    stored = served.config.storage_root / "night" / "up.fits"
    assert result["md5"] == digest and stored.exists() and not upload.exists()
    assert fitsverify_errors(stored) == 0


def test_fire_and_forget_and_a_batch_pending_until_its_hook_ran(queue, tmp_path: Path) -> None:
    """FitsStorage's callers send no-reply requests; their reducer waits for a
    batch until its re-ingest hook ran: on each transport, a request with
    "reply": false leaves nothing behind, and a batch stays pending while its
    failed hook is kept for a retry -- until the retry succeeds."""
    down = tmp_path / "archive-database-down"
    down.write_text("")
    (queue.config.storage_root / "b").mkdir(parents=True)
    simple_image(queue.config.storage_root / "b" / "h.fits")
    queue.start_worker(SPOOLOPS_TEST_HOOK_FAIL=str(down),
                       SPOOLOPS_TEST_HOOK_LOG=str(tmp_path / "hooks.jsonl"))
    client = queue.client()
    client.submit("echo", {"batch": "gone"}, reply=False)
    reply = client.call_reply("update_headers", {"filename": "b/h.fits", "qa_state": "Pass",
                                                 "batch": "night-7"}, timeout=60)
    assert reply.ok and reply.raw["hooks"] == {"record": "retrying"}
    wait_for(lambda: client.queue_length() == 0, what="the no-reply echo to be done")
    assert client.pending_batches() == {"night-7"}
    assert queue.replies_left() == 0             # the echo left nothing; the call collected
    down.unlink()
    done = queue.spoolops("hooks", "retry", "--all")
    assert done.returncode == 0, done.stderr
    # at once, as the command says: not at the worker's next retry (10 s
    # after the failure, then longer and longer)
    wait_for(lambda: client.pending_batches() == set(), timeout=5,
             what="the batch to be done once its hook ran again")


def test_fitsstorage_compat_api_gives_their_values(served) -> None:
    """Their queue API on each transport: poll_for_response returns what their
    worker returned (test_fileopser.py's echo, update_headers and
    ingest_upload), a no-response add leaves nothing, and the reducer's gate
    and statistics calls answer."""
    from spoolops.compat import fitsstorage as compat
    compat._client = served.client()
    try:
        fq = compat.FileopsQueue(session=None, logger=None)
        entry = fq.add(compat.FileOpsRequest("echo", {"echo": "Hello, world"}),
                       response_required=True)
        response = fq.poll_for_response(entry.id, timeout=30)
        assert response.dict() == {"ok": True, "error": "", "value": "Hello, world"}
        assert response.result == {"echo": "Hello, world"}
        # their update_headers (flat shape, a name without .bz2) answers None,
        # their ingest_upload True -- as their test_fileopser.py asserts
        simple_image(served.config.storage_root / "compat.fits")
        entry = fq.add(compat.FileOpsRequest("update_headers", {
            "filename": "compat.fits", "qa_state": "Pass",
            "generic": [["OBJECT", "M31"]]}), response_required=True)
        response = fq.poll_for_response(entry.id, timeout=60)
        assert response.dict() == {"ok": True, "error": "", "value": None}
        assert response.result["modified"] is True
        simple_image(served.config.upload_staging_dir / "compat-up.fits", seed=5)
        entry = fq.add(compat.FileOpsRequest("ingest_upload", {
            "filename": "compat-up.fits", "path": "", "fileuploadlog_id": None,
            "processed_cal": False}), response_required=True)
        response = fq.poll_for_response(entry.id, timeout=60)
        assert response.dict() == {"ok": True, "error": "", "value": True}
        assert (served.config.storage_root / "compat-up.fits").exists()
        fq.add(compat.FileOpsRequest("echo", {"echo": "fire"}), batch="b-compat")
        wait_for(lambda: compat.queue_length() == 0 and compat.pending_batches() == set(),
                 what="the no-response request to be done")
        assert served.replies_left() == 0
    finally:
        compat._client = None


def test_operator_commands(served) -> None:
    """status, ls, show, cancel and the janitor through the command line."""
    client = served.client()
    rid = client.submit("echo", {"left": "uncollected"})
    wait_for(lambda: served.count("replies") == 1, what="the reply")
    status = json.loads(served.spoolops("status", "--json").stdout)
    assert status["replies"]["count"] == 1 and status["worker"]["alive"] is True
    listing = served.spoolops("ls", "replies")
    assert rid in listing.stdout and "echo" in listing.stdout
    shown = served.spoolops("show", rid[:24])
    assert shown.returncode == 0 and '"left"' in shown.stdout
    # the janitor removes the uncollected reply once it is older than reply_ttl
    report = run_janitor(served.config, now=lambda: time.time() + 2 * 86400)
    assert any(a.done and rid in a.path for a in report.actions), report.to_dict()
    assert served.count("replies") == 0


def test_operator_cancel_wakes_the_client(queue) -> None:
    client = queue.client()
    rid = client.submit("echo", {"x": 1})
    done = queue.spoolops("cancel", rid)
    assert done.returncode == 0, done.stderr
    reply = client.wait(rid, timeout=10)
    assert reply.ok is False and reply.error["type"] == "Cancelled"


def test_client_in_forked_child(served) -> None:
    client = served.client()
    assert client.call("echo", {"parent": 1}, timeout=30) == {"parent": 1}
    pid = os.fork()
    if pid == 0:   # the child must not use the parent's connection or watcher
        try:
            ok = client.call("echo", {"child": 1}, timeout=30) == {"child": 1}
        except BaseException:  # noqa: BLE001
            ok = False
        os._exit(0 if ok else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert client.call("echo", {"parent": 2}, timeout=30) == {"parent": 2}
