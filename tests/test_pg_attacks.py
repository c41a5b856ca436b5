"""Attacks on the hardened PostgreSQL transport (issue 20, after 9c810ad /
schema v4), each as the party that would make it, against a real server
(the suite's ``pg_cluster``; a database per test, ``make_pg_env``: ``web1``
the victim, ``web2`` the attacker, ``wrk`` the worker role):

* a hostile web role (``web2``) against another (``web1``) and against the
  queue: row locks it may take through its own definer functions, what its
  view and functions say of another role's ids, squatting the id another
  role's request would be stored under, hostile arguments to every definer
  function, objects it may create, what ``pg_locks`` and
  ``pg_stat_activity`` show it;
* a compromised worker role: what it may do beyond answering;
* root running the ``spoolops`` command line on data a web role planted
  (control characters in an op name);
* faults: the worker's sessions terminated by a superuser mid-statement,
  again and again, while calls go on.

A test of a hole found is ``xfail(strict=True)`` with the hole as its
reason: it fails on the code as it is, and says so when the hole is closed.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from support.env import WEB, WEB2, WORKER_ROLE, connect_as
from support.waiting import wait_for

from spoolops.errors import BadRequest, Timeout, TransportUnavailable

psycopg = pytest.importorskip("psycopg")


def submit_sql(conn, rid: str, op: str = "echo", args: dict | None = None,
               priority: int = 0) -> str:
    """A web role's submit, as any program of its may call it."""
    return conn.execute(
        "SELECT spoolops.submit(%s, 1, %s, %s::json, %s, NULL, NULL, NULL)",
        (rid, op, json.dumps(args if args is not None else {}), priority)).fetchone()[0]


def derived(who: str, rid: str) -> str:
    """``spoolops.derived_id``, computed outside the database."""
    return rid[:119] + "." + hashlib.md5(f"{who}/{rid}".encode()).hexdigest()[:8]


# -- a web role against the queue: row locks through its own functions ---------------

def test_a_held_cancel_of_its_own_request_does_not_stall_the_queue(pgq) -> None:
    attacker = connect_as(pgq, WEB2)
    bait = submit_sql(attacker, "bait-1", "echo", {"bait": 1}, priority=100)
    assert bait == "queued"
    # the defaults init gives are the role's to change in its own session
    attacker.execute("SET idle_in_transaction_session_timeout = 0")
    attacker.execute("BEGIN")
    assert attacker.execute("SELECT spoolops.cancel('bait-1')").fetchone()[0] is True
    try:
        pgq.start_worker()
        victim = pgq.client(WEB)
        start = time.monotonic()
        try:
            outcome = victim.call("echo", {"victim": 1}, timeout=5)
        except (Timeout, TransportUnavailable) as exc:
            outcome = repr(exc)
        took = time.monotonic() - start
        # what the worker waits on while the victim waits: the attacker's row
        waiting = pgq.sql("SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND"
                          " wait_event_type = 'Lock'", WORKER_ROLE)[0][0]
        # and its main loop, stuck in the claim, writes no heartbeat: stale after
        # lock_grace / 2, when another worker would fence it
        heartbeat_age = pgq.sql("SELECT max(extract(epoch FROM clock_timestamp() -"
                                " heartbeat))::float8 FROM spoolops.workers")[0][0]
    finally:
        attacker.execute("ROLLBACK")
        attacker.close()
    assert outcome == {"victim": 1} and took < 5, (outcome, took, waiting, heartbeat_age)


# -- a web role against another's ids ------------------------------------------------

def test_an_id_another_role_holds_says_nothing_even_through_the_view(pgq) -> None:
    victim, attacker = connect_as(pgq, WEB), connect_as(pgq, WEB2)
    submit_sql(victim, "victim-order-42")
    # the attacker tries two ids: one web1 holds, one nobody holds
    for rid in ("victim-order-42", "nobody-holds-this"):
        assert submit_sql(attacker, rid) == "queued"
    columns = [d.name for d in attacker.execute(
        "SELECT * FROM spoolops.my_requests LIMIT 0").description]
    seen = sorted(row[0] for row in attacker.execute(
        "SELECT id FROM spoolops.my_requests").fetchall())
    victim.close()
    attacker.close()
    # both of its rows must read alike: under the ids it chose, no trace of another holder
    assert "client_id" not in columns, columns
    assert seen == ["nobody-holds-this", "victim-order-42"], seen


def test_a_web_role_cannot_keep_another_from_submitting_under_an_id(pgq) -> None:
    attacker = connect_as(pgq, WEB2)
    wanted = "order-2024-0001"            # an id web1 is about to use (e.g. its own order no.)
    assert submit_sql(attacker, wanted) == "queued"
    assert submit_sql(attacker, derived(WEB, wanted)) == "queued"
    # the database's derivation is not the public arithmetic (it is keyed by a secret)
    assert pgq.sql("SELECT spoolops.derived_id(%s, %s)", WEB, wanted) != [
        (derived(WEB, wanted),)]
    attacker.close()
    victim = pgq.client(WEB)
    request = victim._request("echo", {"mine": 1}, 0, None)
    request["id"] = wanted
    try:
        outcome = victim.transport.publish(request)
    except BadRequest as exc:
        outcome = str(exc)
    assert outcome == wanted


# -- faults a web role can provoke: a target no index can hold ------------------------

def test_a_target_too_long_for_an_index_still_gets_its_one_reply(pgq) -> None:
    import secrets
    worker = pgq.start_worker()
    client = pgq.client(WEB2)
    target = secrets.token_urlsafe(6000)        # ~8000 incompressible bytes
    try:
        reply = client.call_reply("sleep", {"seconds": 0, "target": target}, timeout=4)
        outcome = (reply.ok, (reply.error or {}).get("type"))
    except Timeout as exc:
        outcome = repr(exc)
    spins = worker.log_path.read_text().count("event=lease_failed")
    assert outcome in ((True, None), (False, "BadRequest")) and spins < 5, (outcome, spins)


# -- root's command line on what a web role planted ----------------------------------

ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[1;1H\rworker OK"


def test_an_op_name_cannot_write_control_sequences_to_roots_terminal(pgq) -> None:
    with connect_as(pgq, WEB2) as attacker:
        submit_sql(attacker, "planted-1", ESCAPES)
    with connect_as(pgq, WORKER_ROLE) as worker:       # (and a worker role's registration)
        worker.execute("INSERT INTO spoolops.workers (host, work_dir, pid) VALUES (%s, '/x',"
                       " 1)", (ESCAPES,))
    rid = pgq.sql("SELECT id FROM spoolops.requests")[0][0]
    outputs = {}
    for command in (("ls",), ("ls", "new"), ("show", rid), ("status",)):
        done = pgq.spoolops(*command)
        assert done.returncode in (0, 1), done.stderr
        outputs[" ".join(command)] = done.stdout + done.stderr
    assert "planted" in outputs["ls"] and "worker OK" in outputs["status"]   # both shown
    raw = {cmd: [c for c in out if ord(c) < 32 and c != "\n"] for cmd, out in outputs.items()}
    assert not any(raw.values()), raw


# -- a web role: hostile arguments to every definer function --------------------------

def _refused(conn, statement: str, params: tuple = ()) -> str:
    """The SQLSTATE a statement is refused with ('' when it is not)."""
    try:
        conn.execute(statement, params)
    except psycopg.Error as exc:
        return exc.sqlstate or "?"
    return ""


def test_definer_functions_take_hostile_arguments_and_yield_nothing(pgq) -> None:
    victim, attacker = connect_as(pgq, WEB), connect_as(pgq, WEB2)
    submit_sql(victim, "v-1", "echo", {"secret": "s3cret", "batch": "vb"})
    submit_sql(victim, "shared-id")
    submit_sql(attacker, "shared-id")           # stored under its derived id
    sub = "SELECT spoolops.submit(%s, 1, %s, %s::json, %s, %s::timestamptz, NULL, NULL)"
    refusals = {
        # no id, no op: NOT NULL (the size check is NULL then: the column refuses)
        "null id": (sub, (None, "echo", "{}", 0, None)),
        "null op": (sub, ("n-op", None, "{}", 0, None)),
        "sql id": (sub, ("x'); DELETE FROM spoolops.requests; --", "echo", "{}", 0, None)),
        "long id": (sub, ("a" * 129, "echo", "{}", 0, None)),
        "nul in args": (sub, ("nul", "echo", '{"a": "\\u0000"}', 0, None)),
        "lone surrogate": (sub, ("sur", "echo", '{"a": "\\ud800"}', 0, None)),
        "deep json": (sub, ("deep", "echo", "[" * 200000 + "]" * 200000, 0, None)),
        "oversize": (sub, ("big", "echo", json.dumps({"p": "x" * 70000}), 0, None)),
        "infinite deadline": (sub, ("inf", "echo", "{}", 0, "infinity")),
        "year 10000": (sub, ("y1e4", "echo", "{}", 0, "10000-01-01")),
        "priority past int": (sub, ("p", "echo", "{}", 2**31, None)),
        "unknown listen": ("SELECT spoolops.listen(%s)", ("reply'); LISTEN x; --",)),
        "null listen": ("SELECT spoolops.listen(%s)", (None,)),
        "worker's channel": ("SELECT spoolops.listen('new')", ()),
        "events channel": ("SELECT spoolops.listen('events')", ()),
        "internal submit_taken": (("SELECT spoolops.submit_taken('t', 1, 'echo', '{}', 0, NULL,"
                                  " NULL, NULL, true, false, NULL)"), ()),
        "internal derived_id": ("SELECT spoolops.derived_id('web1', 'x')", ()),
        "finished_event": ("SELECT spoolops.finished_event('v-1', 'echo', '{}')", ()),
        "secrets": ("SELECT * FROM spoolops.secrets", ()),
        "retired": ("SELECT * FROM spoolops.retired", ()),
        "workers": ("SELECT * FROM spoolops.workers", ()),
        "meta write": (("UPDATE spoolops.meta SET value = '999999999' WHERE key ="
                       " 'max_request_bytes'"), ()),
        "create in public": ("CREATE TABLE public.planted (x int)", ()),
        "create in schema": (("CREATE FUNCTION spoolops.planted() RETURNS int LANGUAGE sql AS"
                             " 'SELECT 1'"), ()),
        "create schema": ("CREATE SCHEMA planted", ()),
        "view write": ("DELETE FROM spoolops.my_requests", ()),
    }
    got = {name: _refused(attacker, q, p) for name, (q, p) in refusals.items()}
    assert all(got.values()), {k: v for k, v in got.items() if not v}
    # text PostgreSQL cannot hold: refused by the jsonb cast of args_are_text
    assert (got["nul in args"], got["lone surrogate"]) == ("22P05", "22P02")
    assert got["deep json"] == "54001"                                # stack depth
    assert got["infinite deadline"] == got["year 10000"] == "23514"   # deadline_readable
    assert got["sql id"] == got["long id"] == "23514"                 # the id's pattern
    assert got["oversize"] == "54000"                                 # max_request_bytes
    for name in ("worker's channel", "events channel", "internal submit_taken",
                 "internal derived_id", "finished_event", "secrets", "retired", "workers",
                 "meta write", "create in public", "create in schema", "create schema",
                 "view write"):
        assert got[name] == "42501", (name, got[name])
    # what it may call, with web1's ids (and the id web1's would be derived to), NULLs,
    # odd values: nothing of web1's, nothing changed
    for rid in ("v-1", "shared-id", derived(WEB, "shared-id"), None, "%", "v-%"):
        assert attacker.execute("SELECT spoolops.cancel(%s)", (rid,)).fetchone()[0] in (
            False, None) or rid == "shared-id"
        assert attacker.execute("SELECT spoolops.progress_of(%s)", (rid,)).fetchone()[0] is None
        for remove in (True, False, None):
            assert attacker.execute("SELECT spoolops.collect(%s, %s)",
                                    (rid, remove)).fetchone()[0] is None
    # odd but harmless: its own lock wait, negative and huge (a transaction's setting)
    for wait in (-5, 0, 2**31 - 1):
        assert attacker.execute("SELECT spoolops.submit(%s, 1, 'echo', '{}', 0, NULL, NULL,"
                                " NULL, true, %s)", (f"w{wait}", wait)).fetchone()[0] == "queued"
        assert attacker.execute("SHOW lock_timeout").fetchone()[0] == "10s"
    assert pgq.sql("SELECT id, state, args::text FROM spoolops.requests WHERE submitter = %s"
                   " ORDER BY id", WEB) == [("shared-id", "queued", "{}"),
                                            ("v-1", "queued", ('{"secret": "s3cret",'
                                             ' "batch": "vb"}'))]
    assert pgq.sql("SELECT value FROM spoolops.meta WHERE key = 'max_request_bytes'") != \
        [("999999999",)]
    victim.close()
    attacker.close()


def test_catalog_views_show_another_role_no_ids_args_or_queries(pgq) -> None:
    victim, spy = connect_as(pgq, WEB), connect_as(pgq, WEB2)
    victim.execute("BEGIN")
    submit_sql(victim, "hidden-id-77", "echo", {"path": "/secret/prog/file.fits"})
    try:
        seen = json.dumps([
            spy.execute("SELECT * FROM pg_stat_activity WHERE usename = %s",
                        (WEB,)).fetchall(),
            spy.execute("SELECT * FROM pg_locks").fetchall(),
            spy.execute("SELECT * FROM pg_stat_statements LIMIT 0").fetchall()
            if spy.execute("SELECT to_regclass('pg_stat_statements')").fetchone()[0] else [],
            spy.execute("SELECT * FROM pg_prepared_xacts").fetchall(),
        ], default=str)
        activity = spy.execute("SELECT query, state FROM pg_stat_activity WHERE usename = %s",
                               (WEB,)).fetchall()
    finally:
        victim.execute("ROLLBACK")
        victim.close()
        spy.close()
    assert activity and all(q == "<insufficient privilege>" for q, _ in activity), activity
    for secret in ("hidden-id-77", "/secret/prog", "file.fits"):
        assert secret not in seen


# -- a compromised worker role: what it may do beyond answering ------------------------

def test_a_worker_role_stays_within_the_queue(pgq) -> None:
    web = connect_as(pgq, WEB)
    web_pid = web.execute("SELECT pg_backend_pid()").fetchone()[0]
    with connect_as(pgq, WORKER_ROLE) as wrk:
        got = {name: _refused(wrk, q) for name, q in {
            "submit": "SELECT spoolops.submit('w', 1, 'echo', '{}', 0, NULL, NULL, NULL)",
            "insert a request": "INSERT INTO spoolops.requests (id, op) VALUES ('w', 'echo')",
            "meta": "UPDATE spoolops.meta SET value = '1' WHERE key = 'max_request_bytes'",
            "secrets": "UPDATE spoolops.secrets SET value = 'x'",
            "owner": "SET ROLE spoolops_owner",
            "policy": "ALTER POLICY worker_all ON spoolops.requests USING (true)",
            "trigger": "ALTER TABLE spoolops.requests DISABLE TRIGGER requests_inserting",
            "function": ("CREATE OR REPLACE FUNCTION spoolops.derived_id(who name, id text)"
                         " RETURNS text LANGUAGE sql AS 'SELECT id'"),
            "create in public": "CREATE TABLE public.w (x int)",
            "create schema": "CREATE SCHEMA w",
            "a web role's session": f"SELECT pg_terminate_backend({web_pid})",
            "a web role's settings": "ALTER ROLE web1 SET lock_timeout = 0",
            "a group": "GRANT spoolops_submit TO wrk",
        }.items()}
        alive = web.execute("SELECT 1").fetchone()
    web.close()
    assert alive == (1,)
    print(got)
    assert got == {name: "42501" for name in got}, got


# -- faults: the worker's sessions ended mid-statement, again and again ---------------

CALLS = 24
KILL_S = 3.0


def test_worker_sessions_killed_mid_statement_leave_every_request_one_reply(pgq,
                                                                          tmp_path) -> None:
    """A superuser ends every active session of the worker role, every few
    milliseconds, for KILL_S while non-idempotent requests are submitted and
    run (claims, starts, replies, heartbeats cut mid-statement); then stops.
    Every request is answered, once, and ran once; nothing is left running."""
    worker = pgq.start_worker()
    folder = tmp_path / "appends"
    folder.mkdir()
    client = pgq.client(WEB)
    kills = []
    start = time.monotonic()
    ids = {}
    with psycopg.connect(pgq.cluster.dsn(pgq.dbname, "postgres"), autocommit=True) as admin:
        k = 0
        while time.monotonic() - start < KILL_S:
            if k < CALLS:
                tag = f"t{k}"
                ids[client.submit("append", {"path": str(folder / f"f{k % 3}"), "tag": tag,
                                             "seconds": 0, "target": f"T{k % 3}"})] = tag
                k += 1
            kills.append(admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM"
                " pg_stat_activity WHERE usename = %s AND state = 'active'",
                (WORKER_ROLE,)).fetchone()[0])
    replies = {}
    end = time.monotonic() + 60             # for all of them: a stuck worker fails fast
    for rid, tag in ids.items():
        try:
            replies[tag] = client.wait(rid, timeout=max(0.1, end - time.monotonic())).result
        except Exception as exc:  # noqa: BLE001 - reported below
            replies[tag] = repr(exc)
    wrong = {tag: r for tag, r in replies.items() if not (isinstance(r, dict)
                                                          and r.get("tag") == tag)}
    assert len(replies) == CALLS and not wrong, (
        wrong, worker.poll(), worker.log_path.read_text()[-4000:])
    ran = sorted(line for f in folder.iterdir() for line in f.read_text().splitlines())
    assert ran == sorted(replies), "each non-idempotent request ran exactly once"
    assert sum(kills) >= 5, f"only {sum(kills)} statements of the worker were cut"
    wait_for(pgq.quiet, timeout=20, what="nothing queued or running")
    assert worker.poll() is None
    print(f"\n{sum(kills)} worker sessions terminated mid-statement; {CALLS} requests, one"
          f" reply each, in {time.monotonic() - start:.1f} s")
