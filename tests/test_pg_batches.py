"""Batches and requests that want no reply, over PostgreSQL (schema version 2).

What it checks, each on a real throwaway cluster (``pg_cluster``), a
database per test, every role connecting as itself:

* ``pending_batches`` / ``queue_length`` asked by a web role that submitted
  nothing see another web role's queued requests (no worker running: the
  owner's definer functions read past row-level security), args that are no
  object or name no batch count in the length and name no batch; once a
  worker drained the queue, nothing is pending.
* ``reply(..., deliver=False)`` deletes the row, fenced by the claim, frees
  its leases and still sends the 'finished' event with the outcome;
  ``batch=Batch(held=True)`` keeps the batch pending (``batch_holds``) in the
  same statement, with or without a stored reply, until ``release_batch``;
  a hold names the batch as the row does; an operator's cancel of a
  request that wants no reply leaves no row; a long error message is
  stored whole (the event is cut short, under NOTIFY's 8000 bytes); the
  janitor reports an old hold and keeps it.
* End to end, with the worker: a request saying ``"reply": false`` leaves no
  row once answered, its end line is in the worker's log, and failing ones
  (an unknown op, a BadRequest) leave no row and are counted in the
  worker's statistics.  (Needs the worker and dispatch to honour
  ``"reply": false``.)
* A database installed by the code of commit 1be5468 (schema version 1)
  with queued rows is migrated by ``spoolops init``: version 2, the rows
  still there, wanting their answers, claimable and answered.
* The definer functions cannot be abused: a web role learns batch names and
  a count only (no ids, no args, no argument to pass), their
  ``search_path`` is pinned (and a web role's own objects shadow nothing),
  PUBLIC may not execute them, ``batch_holds`` is the worker's alone.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import TESTS
from support.env import WEB, WEB2, WORKER_ROLE, connect_as
from support.requires import unavailable
from support.waiting import wait_for

from spoolops.formats import utc_iso
from spoolops.janitor import run_janitor
from spoolops.transport.base import Batch, Claimed
from spoolops.transport.pg.schema import SCHEMA_VERSION

psycopg = pytest.importorskip("psycopg")

V1_COMMIT = "1be5468"




def publish(client, op: str, args, reply: bool = True) -> str:
    """Publish as ``client`` does, with ``"reply": false`` when asked."""
    request = client._request(op, args, 0, None)
    if not reply:
        request["reply"] = False
    return client.transport.publish(request)


def answer(rid: str, ok: bool = True, error: dict | None = None) -> dict:
    now = utc_iso()
    return {"version": 1, "id": rid, "op": "echo", "ok": ok, "result": {"x": 1} if ok else None,
            "error": error, "started_at": now, "finished_at": now}


def rows(env, *ids: str) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in env.sql(
        "SELECT id, state, answer_wanted, batch FROM spoolops.requests WHERE id = ANY(%s)",
        list(ids))}


def test_pending_batches_and_queue_length_see_every_submitter(pgq) -> None:
    web1, web2 = pgq.client(WEB), pgq.client(WEB2)
    ids = [publish(web1, "echo", {"batch": "b1", "n": 1}),
           publish(web1, "echo", {"batch": "b1", "n": 2}),
           publish(web1, "echo", {"batch": "b2"}),
           publish(web1, "echo", {"n": 3}),                 # no batch
           publish(web1, "echo", [1, 2]),                    # ->> on an array: NULL
           publish(web1, "echo", "scalar"),                  # ->> on a scalar: NULL
           publish(web1, "echo", {"batch": "b3"}, reply=False)]
    assert rows(pgq, ids[4])[ids[4]] == ("queued", True, None)
    assert rows(pgq, ids[6])[ids[6]] == ("queued", False, "b3")
    # web2 submitted nothing and sees none of web1's rows -- yet knows what is pending
    with connect_as(pgq, WEB2) as c:
        assert c.execute("SELECT count(*) FROM spoolops.my_requests").fetchone()[0] == 0
    assert pgq.sql("SELECT count(*) FROM spoolops.workers") == [(0,)]   # no worker
    assert web2.transport.pending_batches() == {"b1", "b2", "b3"}
    assert web2.transport.queue_length() == 7
    assert web1.transport.pending_batches() == {"b1", "b2", "b3"}
    assert web1.transport.queue_length() == 7
    pgq.start_worker()
    for rid in ids[:4]:
        assert web1.wait(rid, timeout=60).ok
    wait_for(lambda: web2.transport.queue_length() == 0, what="the queue drained")
    assert web2.transport.pending_batches() == set()
    assert pgq.transport().pending_batches() == set()    # the worker role asks the same


def test_reply_without_delivery_and_held_batches_at_the_transport(pgq) -> None:
    """The worker's side, driven directly: claim as the worker role, answer
    with deliver=False and held batches, release; rows, leases, holds and
    pending batches at each step, and the events 'tail' reads."""
    web1, web2 = pgq.client(WEB), pgq.client(WEB2)
    a = publish(web1, "echo", {"batch": "b1"}, reply=False)
    b = publish(web1, "echo", {"batch": "b2"}, reply=False)
    c = publish(web1, "echo", {"batch": "b3"})
    d = publish(web1, "nosuchop", {"batch": "b4"}, reply=False)
    e = publish(web1, "echo", {"batch": "b5"}, reply=False)
    f = publish(web1, "echo", {"batch": "b6"}, reply=False)
    assert web2.transport.pending_batches() == {"b1", "b2", "b3", "b4", "b5", "b6"}
    events = psycopg.connect(pgq.cluster.dsn(pgq.dbname, "postgres"), autocommit=True)
    events.execute("SELECT spoolops.listen('events')")     # (its name is private)
    worker = pgq.transport()
    lock = worker.lock_worker(wait=False, should_stop=lambda: False)
    try:
        ids = [a, b, c, d, e, f]
        claimed = dict(zip(ids, worker.claim_all(ids), strict=True))
        assert all(isinstance(x, Claimed) for x in claimed.values())
        # the document dispatch reads says "reply": false -- and nothing when a reply is wanted
        assert json.loads(claimed[a].data)["reply"] is False
        assert "reply" not in json.loads(claimed[c].data)
        assert worker.lease(b, ("T1",)) is True
        assert pgq.sql("SELECT target, request_id FROM spoolops.leases") == [("T1", b)]
        assert web2.transport.queue_length() == 6     # running counts

        # no reply wanted: the row goes, its batch is no longer pending
        worker.reply(a, answer(a), deliver=False)
        assert rows(pgq, a) == {}
        assert web2.transport.pending_batches() == {"b2", "b3", "b4", "b5", "b6"}

        # no reply, batch held: the row and its lease go, the hold comes, in one statement
        worker.reply(b, answer(b), deliver=False, batch=Batch(None, "b2", held=True))
        assert rows(pgq, b) == {}
        assert pgq.sql("SELECT count(*) FROM spoolops.leases") == [(0,)]
        assert pgq.sql("SELECT request_id, batch FROM spoolops.batch_holds") == [(b, "b2")]
        assert web2.transport.pending_batches() == {"b2", "b3", "b4", "b5", "b6"}

        # a reply stored, batch held: answered (the client collects it), still pending
        worker.reply(c, answer(c), batch=Batch(None, "b3", held=True))
        assert rows(pgq, c) == {c: ("answered", True, "b3")}
        assert web1.wait(c, timeout=10).result == {"x": 1}
        assert rows(pgq, c) == {}
        assert web2.transport.pending_batches() == {"b2", "b3", "b4", "b5", "b6"}

        # a failure that nobody collects: no row either; the event says the outcome
        long = "no such operation " + "x" * 9000
        worker.reply(d, answer(d, ok=False, error={"type": "UnknownOp", "message": long}),
                     started=False, deliver=False)
        assert rows(pgq, d) == {}
        # a batch not held, at the end of its request: nothing extra
        worker.reply(e, answer(e), deliver=False, batch=Batch(None, "b5", held=False))
        assert rows(pgq, e) == {}
        assert web2.transport.pending_batches() == {"b2", "b3", "b6"}
        assert web2.transport.queue_length() == 1

        worker.release_batch(b, Batch(None, "b2", held=True))
        assert web2.transport.pending_batches() == {"b3", "b6"}
        worker.release_batch(c, Batch(None, "b3", held=True))
        worker.release_batch(c, Batch(None, "b3", held=True))     # again: nothing to do
        assert web2.transport.pending_batches() == {"b6"}
        assert pgq.sql("SELECT count(*) FROM spoolops.batch_holds") == [(0,)]

        # fenced like the UPDATE: a claim taken over meanwhile deletes and holds nothing
        pgq.sql("UPDATE spoolops.requests SET attempt = attempt + 1 WHERE id = %s", f)
        worker.reply(f, answer(f), deliver=False, batch=Batch(None, "b6", held=True))
        assert rows(pgq, f) == {f: ("running", False, "b6")}
        assert pgq.sql("SELECT count(*) FROM spoolops.batch_holds") == [(0,)]
        assert web2.transport.pending_batches() == {"b6"}
    finally:
        lock.release()
    seen = {}
    end = time.monotonic() + 10
    while time.monotonic() < end and len(seen) < 5:
        for note in events.notifies(timeout=0.5, stop_after=1):
            event = json.loads(note.payload)
            if event["event"] == "finished":
                seen[event["id"]] = event
    events.close()
    assert set(seen) == {a, b, c, d, e}
    for rid in (a, b, e):
        assert seen[rid]["ok"] is True and seen[rid]["note"] == "no reply wanted: removed"
    assert seen[c]["ok"] is True and seen[c].get("note") is None
    assert seen[d]["ok"] is False and seen[d]["error"] == "UnknownOp"
    # ids and a few bounded words (issue 20, 3 and 8): no op, no message
    assert "message" not in seen[d] and "op" not in seen[d]


def test_a_held_batch_is_spelt_as_the_row_spells_it(pgq) -> None:
    """A batch that is no string (written by hand, compactly): held under
    the row's own args->>'batch', not the worker's re-encoding of it."""
    with connect_as(pgq, WEB) as c:
        c.execute("SELECT spoolops.submit('odd1', 1, 'echo', '{\"batch\":{\"k\":1}}', 0,"
                  " NULL, NULL, NULL)")
    web2 = pgq.client(WEB2)
    assert web2.transport.pending_batches() == {'{"k":1}'}
    worker = pgq.transport()
    lock = worker.lock_worker(wait=False, should_stop=lambda: False)
    try:
        assert isinstance(worker.claim("odd1"), Claimed)
        worker.reply("odd1", answer("odd1"), deliver=False,
                     batch=Batch(None, json.dumps({"k": 1}), held=True))
    finally:
        lock.release()
    assert web2.transport.pending_batches() == {'{"k":1}'}
    worker.release_batch("odd1", Batch(None, '{"k": 1}', held=True))
    assert web2.transport.pending_batches() == set()


def test_the_janitor_reports_old_holds_and_keeps_them(pgq) -> None:
    """A hold stands for kept hook calls, which have no age limit: the
    janitor says it is old, and leaves it."""
    pgq.sql("INSERT INTO spoolops.batch_holds (request_id, batch) VALUES ('gone1', 'b9')")
    report = run_janitor(pgq.config, now=lambda: time.time() + 60)
    assert not [f for f in report.findings if f.kind == "held"]
    later = time.time() + pgq.config.stuck_after + 60
    report = run_janitor(pgq.config, now=lambda: later)
    held = [f for f in report.findings if f.kind == "held"]
    assert [f.path for f in held] == ["spoolops.batch_holds request_id=gone1"]
    assert "'b9'" in held[0].why and not report.stuck
    assert pgq.sql("SELECT request_id FROM spoolops.batch_holds") == [("gone1",)]
    assert pgq.client(WEB2).transport.pending_batches() == {"b9"}


def test_a_long_error_message_is_stored_whole(pgq) -> None:
    """A NOTIFY payload over 8000 bytes would fail the answer itself (it
    used to become 'could not be stored'): the event is cut, the reply kept."""
    web1 = pgq.client(WEB)
    rid = publish(web1, "echo", {})
    worker = pgq.transport()
    lock = worker.lock_worker(wait=False, should_stop=lambda: False)
    try:
        assert isinstance(worker.claim(rid), Claimed)
        message = "é" * 5000 + " the end"
        worker.reply(rid, answer(rid, ok=False, error={"type": "BadRequest", "message": message}))
    finally:
        lock.release()
    reply = web1.wait(rid, timeout=10)
    assert reply.error == {"type": "BadRequest", "message": message}


def test_operator_cancel_of_a_request_wanting_no_reply_leaves_no_row(pgq) -> None:
    web1 = pgq.client(WEB)
    quiet = publish(web1, "echo", {}, reply=False)
    loud = publish(web1, "echo", {})
    operator = pgq.transport()
    cancelled = {"version": 1, "ok": False, "result": None,
                 "error": {"type": "Cancelled", "message": "cancelled by an operator"}}
    assert operator.withdraw(quiet, dict(cancelled, id=quiet)) is True
    assert operator.withdraw(loud, dict(cancelled, id=loud)) is True
    assert rows(pgq, quiet, loud) == {loud: ("answered", True, None)}
    assert web1.wait(loud, timeout=10).error["type"] == "Cancelled"
    assert operator.withdraw(quiet, dict(cancelled, id=quiet)) is False


def test_requests_wanting_no_reply_leave_no_row_end_to_end(pgq) -> None:
    """The worker honours "reply": false: nothing is left to collect, the log
    has each end line, the failures are counted."""
    worker = pgq.start_worker()
    web1 = pgq.client(WEB)
    ok = publish(web1, "echo", {"batch": "nb", "n": 1}, reply=False)
    unknown = publish(web1, "nosuchop", {"batch": "nb"}, reply=False)
    bad = publish(web1, "sleep", {"seconds": -1, "batch": "nb"}, reply=False)
    wanted = publish(web1, "echo", {"n": 2})
    assert web1.wait(wanted, timeout=60).ok          # served in order after the others
    wait_for(lambda: not rows(pgq, ok, unknown, bad), timeout=30,
             what="no rows left for the requests wanting no reply")
    log = pgq.wait_log(worker, f"event=end id={ok} op=echo")
    assert f"event=end id={ok} op=echo user={WEB}" in log and "outcome=ok" in \
        next(line for line in log.splitlines() if f"event=end id={ok}" in line)
    assert f"id={unknown}" in log and "UnknownOp" in next(
        line for line in log.splitlines() if f"id={unknown}" in line)
    assert "BadRequest" in next(line for line in log.splitlines()
                                if f"id={bad}" in line and "BadRequest" in line)
    assert web1.transport.pending_batches() == set()

    def counted() -> dict | None:
        stats = pgq.transport().load_stats() or {}
        outcomes = stats.get("outcomes", {})
        found = (outcomes.get("echo", {}).get("ok", 0) >= 2
                 and outcomes.get("-", {}).get("UnknownOp", 0) >= 1
                 and outcomes.get("sleep", {}).get("BadRequest", 0) >= 1)
        return outcomes if found else None
    wait_for(counted, timeout=30, what="the outcomes in the worker's statistics")
    assert pgq.sql("SELECT count(*) FROM spoolops.requests") == [(0,)]


def _schema_v1(folder: Path):
    """pgschema.py as commit 1be5468 had it (schema version 1), loaded as a
    module of the spoolops.transport package (it imports relatively)."""
    try:
        text = subprocess.run(["git", "-C", str(TESTS.parent), "show",
                               f"{V1_COMMIT}:spoolops/transport/pgschema.py"],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        unavailable(f"cannot read pgschema.py at commit {V1_COMMIT} (git): {exc}")
    path = folder / "pgschema_v1.py"
    path.write_text(text)
    name = "spoolops.transport._pgschema_v1"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module       # (dataclasses look their module up)
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    assert module.SCHEMA_VERSION == 1
    return module


def test_a_version_1_database_is_migrated_by_init(pgq, tmp_path: Path) -> None:
    v1 = _schema_v1(tmp_path)
    admin_dsn = pgq.cluster.dsn(pgq.dbname, "postgres")
    # this database as the code of commit 1be5468 installed it
    pgq.sql("DROP SCHEMA spoolops CASCADE")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        names = v1.Names(pgq.config.schema, pgq.config.channel or pgq.config.schema,
                         pgq.config.submit_role, pgq.config.worker_role)
        v1.install(admin, names, (WEB, WEB2), (WORKER_ROLE,))
    assert pgq.sql("SELECT value FROM spoolops.meta WHERE key = 'schema_version'") == [("1",)]
    assert pgq.sql("SELECT count(*) FROM information_schema.columns WHERE table_schema ="
                   " 'spoolops' AND column_name IN ('answer_wanted', 'batch')") == [(0,)]
    with connect_as(pgq, WEB) as c:      # queued the way that version's clients did
        for n, args in enumerate(({"batch": "old"}, {"n": 1}, [1])):
            c.execute("INSERT INTO spoolops.requests (id, version, op, args, priority,"
                      " deadline, client_submitted, client) VALUES (%s, 1, 'echo', %s, 0,"
                      " NULL, NULL, NULL)", (f"old{n}", json.dumps(args)))
    done = pgq.spoolops("init", "--database-only", "--admin-dsn", admin_dsn,
                        "--web-login", WEB, "--web-login", WEB2, "--worker-login", WORKER_ROLE)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "schema spoolops: version 2" in done.stdout
    assert pgq.sql("SELECT value FROM spoolops.meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)]
    assert rows(pgq, "old0", "old1", "old2") == {"old0": ("queued", True, "old"),
                                                 "old1": ("queued", True, None),
                                                 "old2": ("queued", True, None)}
    web1, web2 = pgq.client(WEB), pgq.client(WEB2)
    assert web2.transport.pending_batches() == {"old"} and web2.transport.queue_length() == 3
    again = pgq.spoolops("init", "--database-only", "--admin-dsn", admin_dsn,
                         "--worker-login", WORKER_ROLE)
    assert again.returncode == 0 and "schema spoolops: version" not in again.stdout, again.stdout
    pgq.start_worker()
    assert web1.wait("old0", timeout=60).result == {"batch": "old"}
    assert web1.wait("old1", timeout=60).result == {"n": 1}
    assert web1.wait("old2", timeout=60).error["type"] == "BadRequest"  # args not an object
    assert web2.transport.queue_length() == 0 and web2.transport.pending_batches() == set()
    doctor = pgq.spoolops("doctor", "--all")
    assert f"ok       schema version: spoolops at version {SCHEMA_VERSION}" in doctor.stdout, \
        doctor.stdout


def test_the_definer_functions_cannot_be_abused(pgq) -> None:
    web1 = pgq.client(WEB)
    rid = publish(web1, "echo", {"batch": "b1", "secret": "s3cret"})
    functions = pgq.sql(
        "SELECT p.proname, p.prosecdef, p.proconfig, p.pronargs, p.proretset,"
        " p.prorettype::regtype::text, pg_get_userbyid(p.proowner),"
        " EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a"
        "         WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')"
        " FROM pg_proc p WHERE p.pronamespace = 'spoolops'::regnamespace AND p.prosecdef"
        " ORDER BY 1")
    definers = {f[0]: f for f in functions}
    assert definers["pending_batches"] == (
        "pending_batches", True, ["search_path=pg_catalog, pg_temp"], 0, True, "text",
        "spoolops_owner", False)
    assert definers["queue_length"] == (
        "queue_length", True, ["search_path=pg_catalog, pg_temp"], 0, False, "bigint",
        "spoolops_owner", False)
    # (and the web roles' others, issue 20: each pinned, the owner's, not PUBLIC's)
    for name, _definer, config, *_, owner, public in functions:
        assert config[0] == "search_path=pg_catalog, pg_temp" and owner == "spoolops_owner" \
            and not public, name
    if not pgq.sql("SELECT 1 FROM pg_roles WHERE rolname = 'outsider2'"):
        pgq.sql("CREATE ROLE outsider2 LOGIN")
    for role, may in ((WEB2, True), (WORKER_ROLE, True), ("outsider2", False)):
        assert pgq.sql("SELECT has_function_privilege(%s, 'spoolops.pending_batches()',"
                       " 'EXECUTE'), has_function_privilege(%s, 'spoolops.queue_length()',"
                       " 'EXECUTE')", role, role) == [(may, may)], role
    with connect_as(pgq, WEB2) as c:
        # names and a count: one text column, one number -- no ids, no args
        cur = c.execute("SELECT * FROM spoolops.pending_batches()")
        assert [d.name for d in cur.description] == ["pending_batches"]
        assert cur.fetchall() == [("b1",)]
        assert c.execute("SELECT * FROM spoolops.queue_length()").fetchall() == [(1,)]
        with pytest.raises(psycopg.errors.UndefinedFunction):
            c.execute("SELECT spoolops.pending_batches('x')")
        # its own objects, first on its path, change nothing inside
        c.execute("CREATE TEMP TABLE requests (batch text, state text)")
        c.execute("CREATE TEMP TABLE batch_holds (batch text)")
        c.execute("INSERT INTO requests VALUES ('forged', 'queued')")
        c.execute("INSERT INTO batch_holds VALUES ('forged')")
        c.execute("SET search_path = pg_temp, spoolops, pg_catalog")
        assert c.execute("SELECT spoolops.pending_batches()").fetchall() == [("b1",)]
        assert c.execute("SELECT spoolops.queue_length()").fetchone()[0] == 1
        c.execute("RESET search_path")
        # and still nothing of web1's rows, nor the worker's holds
        assert c.execute("SELECT count(*) FROM spoolops.my_requests").fetchone()[0] == 0
        for statement in ("SELECT count(*) FROM spoolops.requests",
                          "SELECT * FROM spoolops.batch_holds",
                          "INSERT INTO spoolops.batch_holds VALUES ('x', 'forged')",
                          "DELETE FROM spoolops.batch_holds",
                          f"UPDATE spoolops.requests SET answer_wanted = false WHERE id = '{rid}'",
                          ("INSERT INTO spoolops.requests (id, op, batch) VALUES ('g1', 'echo',"
                           " 'forged')")):
            with pytest.raises((psycopg.errors.InsufficientPrivilege,
                                psycopg.errors.GeneratedAlways)):
                c.execute(statement)
    # (a database only the queue uses: an outsider may not even connect)
    with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.OperationalError)), \
            connect_as(pgq, "outsider2") as c:
        c.execute("SELECT spoolops.pending_batches()")
