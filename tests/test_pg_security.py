"""Issue 20, the web roles' side, as a hostile web role would try it: real
roles on the suite's own cluster (``pg_cluster``), a database per test
(``make_pg_env``: ``web1`` the victim, ``web2`` the attacker, ``wrk`` the
worker), each connecting as itself.

* 2 -- code planted in ``public`` never runs as anyone: a web role's
  ``public.pg_try_advisory_lock(integer, smallint)`` (and look-alikes of
  what the transport calls), with ``public`` writable as PostgreSQL <= 14
  had it, is never called while requests run normally; ``init`` takes
  CREATE on ``public`` from PUBLIC and says so; ``doctor`` flags a schema
  others may create in on a role's path.
* 3 -- a second web role LISTENing on every channel name it can guess (and
  on its own) hears no other role's ids, ops, paths or messages; the
  worker's channels are refused to it; ``tail`` still tells the operator
  everything (from the table); CONNECT is the group roles'.
* 5 -- a web role can LOCK nothing that stops the queue (it holds no
  privilege on any table); ``call(timeout=2)`` returns within 3 s while
  the table is locked by another session and while the server is stopped;
  every login role has ``lock_timeout`` and
  ``idle_in_transaction_session_timeout``; an id another role holds says
  nothing (both requests are answered, each under its own id).
* 7 -- a request over ``max_request_bytes`` is refused at submit, nothing
  stored; a worker's memory stays flat with large (allowed) requests
  queued behind a busy one.
* 8 -- a 7,919-byte op name gets its ``UnknownOp`` reply; no row stays
  running.
* 9 -- answers lost on the way (a proxy between the clients and the server
  cuts the connection right after a submit or a collect committed, then
  refuses connections for a second, as a restart would) and real restarts
  of the server: 4 web clients x 50 calls, every call gets its one reply,
  never ``TransportUnavailable`` for a request that ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.env import WEB, WEB2, WORKER_ROLE, connect_as, make_pg_env
from support.proxy import LossyProxy
from support.tail import next_event, start_tail, tail_ready
from support.waiting import Lines, wait_for

from spoolops import BadRequest
from spoolops.config import load_config
from spoolops.errors import Timeout, TransportUnavailable

psycopg = pytest.importorskip("psycopg")


def admin_dsn(env) -> str:
    return env.cluster.dsn(env.dbname, "postgres")


def set_spool_option(env, line: str) -> None:
    """Add ``line`` to the [spool] section of every configuration of ``env``
    (then ``init`` again: what it keeps in the database follows)."""
    for path in [env.config_path, *env.client_configs.values()]:
        text = path.read_text()
        path.write_text(text.replace("durable = yes\n", f"durable = yes\n{line}\n", 1))
    env.config = load_config(env.config_path)
    done = env.spoolops("init", "--database-only", "--admin-dsn", admin_dsn(env))
    assert done.returncode == 0, done.stdout + done.stderr


# -- 2: code planted in public ---------------------------------------------------

# what a web role plants: look-alikes, in types a client library sends, of
# built-ins the transport calls (each logs its call, then does the real thing)
PLANTED = [
    ("pg_try_advisory_lock", "a integer, b smallint", "boolean",
     "pg_catalog.pg_try_advisory_lock(a, b::integer)"),
    ("pg_try_advisory_lock", "a smallint, b smallint", "boolean",
     "pg_catalog.pg_try_advisory_lock(a::integer, b::integer)"),
    ("pg_try_advisory_lock", "a numeric", "boolean", "pg_catalog.pg_try_advisory_lock(a::bigint)"),
    ("pg_advisory_unlock", "a integer, b smallint", "boolean",
     "pg_catalog.pg_advisory_unlock(a, b::integer)"),
    ("pg_notify", "a text, b varchar", "void", "pg_catalog.pg_notify(a, b::text)"),
    ("clock_timestamp", "a integer", "timestamptz", "pg_catalog.clock_timestamp()"),
    ("unnest", "a varchar[]", "SETOF varchar", "NULL"),
]


def test_issue20_2_init_takes_create_on_public_and_doctor_flags_it(pgq) -> None:
    pgq.sql("GRANT CREATE ON SCHEMA public TO PUBLIC")      # as PostgreSQL <= 14 had it
    done = pgq.spoolops("init", "--database-only", "--admin-dsn", admin_dsn(pgq))
    assert done.returncode == 0, done.stderr
    assert "revoked CREATE on schema public from PUBLIC" in done.stdout, done.stdout
    assert pgq.sql("SELECT has_schema_privilege(%s, 'public', 'CREATE')", WEB2) == [(False,)]
    doctor = pgq.spoolops("doctor", "--all")
    assert "ok       search path: the transport's sessions: pg_catalog,pg_temp" in \
        doctor.stdout, doctor.stdout
    # given back by hand: doctor says so, and how to take it away
    pgq.sql("GRANT CREATE ON SCHEMA public TO PUBLIC")
    doctor = pgq.spoolops("doctor", "--all")
    line = next((x for x in doctor.stdout.splitlines() if "search path:" in x), "")
    assert line.startswith("PROBLEM") and "schema public may be created in by PUBLIC" in line, \
        doctor.stdout
    assert "REVOKE CREATE ON SCHEMA \"public\" FROM PUBLIC" in doctor.stdout


def test_issue20_2_code_planted_in_public_never_runs(pgq, tmp_path: Path) -> None:
    # public writable again, as in a database upgraded from PostgreSQL <= 14
    pgq.sql("GRANT CREATE ON SCHEMA public TO PUBLIC")
    pgq.sql("CREATE TABLE public.planted_calls (fn text, by_role name DEFAULT session_user)")
    pgq.sql("GRANT INSERT, SELECT ON public.planted_calls TO PUBLIC")
    with connect_as(pgq, WEB2) as c:                         # the attacker
        for name, args, returns, body in PLANTED:
            result = {"SETOF": "RETURN;", "void": f"PERFORM {body}; RETURN;"}.get(
                returns.split()[0], f"RETURN {body};")
            c.execute(f"CREATE FUNCTION public.{name}({args}) RETURNS {returns} LANGUAGE"
                      f" plpgsql AS $$ BEGIN INSERT INTO public.planted_calls (fn) VALUES"
                      f" ('{name}({args})'); {result} END $$")
        assert c.execute("SELECT public.pg_try_advisory_lock(1, 2::smallint)").fetchone()[0]
        c.execute("SELECT pg_catalog.pg_advisory_unlock_all()")
    pgq.sql("DELETE FROM public.planted_calls")
    worker = pgq.start_worker()
    client, other = pgq.client(WEB), pgq.client(WEB2)
    for n in range(5):
        assert client.call("echo", {"n": n}, timeout=30) == {"n": n}
    assert other.call("whoami", {}, timeout=30) == {"user": WEB2}
    assert client.cancel(client.submit("sleep", {"seconds": 0, "target": "T"})) in (True, False)
    assert client.pending_batches() == set() and client.queue_length() >= 0
    for command in (("status", "--json"), ("ls", "replies"), ("janitor",)):
        pgq.spoolops(*command)
    # the worker's connection cut: it takes its lock again, on a new session
    pgq.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
            WORKER_ROLE)
    pgq.wait_log(worker, "event=worker_connection_back")
    assert client.call("echo", {"after": 1}, timeout=30) == {"after": 1}
    assert pgq.sql("SELECT fn, by_role FROM public.planted_calls") == []


# -- 3: who hears what ----------------------------------------------------------

def _guesses(channel: str) -> set[str]:
    """Every channel name a web role can think of for the queue's traffic."""
    words = ["new", "events", "event", "replies", "reply", "notify", "queue"]
    for role in (WEB, WEB2, WORKER_ROLE):
        digest = hashlib.md5(role.encode()).hexdigest()
        words += [f"reply_{role}", f"r_{role}", f"reply_{digest}", f"r_{digest}", role]
    return {channel} | {f"{channel}_{w}" for w in words} | {f"spoolops_{w}" for w in words}


def test_issue20_3_another_role_hears_nothing_of_a_request(pgq, tmp_path: Path) -> None:
    spy = connect_as(pgq, WEB2)
    channel = spy.execute("SELECT value FROM spoolops.meta WHERE key = 'channel'").fetchone()[0]
    for name in sorted(_guesses(channel)):
        spy.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(name)))
    refused = []
    for kind in ("reply", "new", "events"):
        try:
            spy.execute("SELECT spoolops.listen(%s)", (kind,))
        except psycopg.errors.InsufficientPrivilege:
            refused.append(kind)
        except psycopg.errors.UndefinedFunction:
            pass          # (no such function: at 1be5468 the names were all public)
    tail = start_tail(pgq)
    deadline = time.monotonic() + 120
    tail_ready(pgq, tail, deadline)       # it follows once it has reported something
    pgq.start_worker()
    victim = pgq.client(WEB)
    secret_path = "/archive/secret-program/N20200101S0001.fits"
    ok = victim.submit("echo", {"path": secret_path})
    unknown = victim.submit("secretive_op_name", {})
    bad = victim.submit("crash", {})
    replies = [victim.wait(rid, timeout=30) for rid in (ok, unknown, bad)]
    assert replies[0].ok and replies[1].error["type"] == "UnknownOp"
    assert "deliberate failure" in replies[2].error["message"]
    # the attacker's own request: its own reply is all it hears
    mine = pgq.client(WEB2).call("whoami", {}, timeout=30)
    assert mine == {"user": WEB2}
    heard: list[str] = []
    end = time.monotonic() + 3
    while time.monotonic() < end:
        heard += [n.payload for n in spy.notifies(timeout=0.5, stop_after=100)]
    spy.close()
    secrets = [ok, unknown, bad, secret_path, "secret-program", "secretive_op_name",
               "deliberate failure", '"echo"', '"crash"', f'"{WEB}"']
    leaks = [(s, p) for p in heard for s in secrets if s in p]
    assert leaks == [], leaks
    assert refused == ["new", "events"]
    # the operator (the worker role) still follows everything, details from the table
    events: list[dict] = []
    while not {ok, unknown} <= {e["id"] for e in events if e["event"] == "finished"} or \
            bad not in {e["id"] for e in events if e["event"] == "started"}:
        event = next_event(tail, deadline)
        assert event is not None, f"tail printed no more events: {events}"
        events.append(event)
    tail.kill()
    tail.wait(30)
    queued = [e for e in events if e["event"] == "queued" and e["id"] == ok]
    assert queued and queued[0]["op"] == "echo" and queued[0]["user"] == WEB, events
    started = [e for e in events if e["event"] == "started" and e["id"] == bad]
    # (details come from the row: one its client collected meanwhile -- a slow
    # tail on a busy host -- has none left to give; the event still comes)
    assert started and started[0].get("op", "crash") == "crash" and \
        started[0].get("user", WEB) == WEB, events
    finished = {e["id"]: e for e in events if e["event"] == "finished"}
    assert finished[unknown]["error"] == "UnknownOp" and finished[ok]["ok"] is True, events
    # and CONNECT is the group roles' alone, in a database only the queue uses
    pgq.sql("CREATE ROLE stranger20 LOGIN")
    assert pgq.sql("SELECT has_database_privilege('stranger20', current_database(),"
                   " 'CONNECT'), has_database_privilege(%s, current_database(), 'CONNECT')",
                   WEB2) == [(False, True)]


def test_issue20_3_a_web_roles_tail_follows_its_own_replies(pgq) -> None:
    """A web role's tail prints the events of its own requests and nothing
    of another role's.  (It follows once it prints its first event: probed
    with its own echoes, not a sleep -- a second was too short on a busy
    host.)"""
    pgq.start_worker()
    tail = subprocess.Popen([sys.executable, "-m", "spoolops", "tail", "--json"],
                            env=pgq.client_env(WEB), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    tail.lines = Lines(tail.stdout)
    try:
        web, deadline = pgq.client(WEB), time.monotonic() + 60
        mine = set()
        while next_event(tail, time.monotonic() + 1.0) is None:
            assert time.monotonic() < deadline, "tail never reported an event"
            mine.add(web.submit("echo", {"probe": 1}))
        other = pgq.client(WEB2)
        other.wait(other.submit("echo", {"not": "mine"}), timeout=30)
        rid = web.submit("echo", {"x": 1})
        mine.add(rid)
        seen: list[dict] = []
        while not (seen and seen[-1]["id"] == rid and seen[-1]["event"] == "finished"):
            event = next_event(tail, deadline)
            assert event is not None, f"tail printed no more events: {seen}"
            seen.append(event)
        assert {event["id"] for event in seen} <= mine, seen
        assert seen[-1]["op"] == "echo"
    finally:
        tail.kill()
        tail.wait(30)


# -- 5: locks, timeouts, ids ------------------------------------------------------

def test_issue20_5_a_web_role_cannot_stop_the_queue(pgq) -> None:
    pgq.start_worker()
    client = pgq.client(WEB)
    assert client.call("echo", {"warm": 1}, timeout=30) == {"warm": 1}
    attacker = connect_as(pgq, WEB2)
    tables = [r[0] for r in pgq.sql(
        "SELECT c.relname FROM pg_class c WHERE c.relnamespace = 'spoolops'::regnamespace"
        " AND c.relkind IN ('r', 'v', 'p') ORDER BY 1")]
    assert "requests" in tables
    locked = []
    for table in tables:
        for mode in ("ACCESS EXCLUSIVE", "EXCLUSIVE", "SHARE ROW EXCLUSIVE", "SHARE",
                     "SHARE UPDATE EXCLUSIVE", "ROW EXCLUSIVE"):
            try:
                with attacker.transaction():
                    attacker.execute(f"LOCK TABLE spoolops.{table} IN {mode} MODE NOWAIT")
                    locked.append(f"{table} {mode}")
            except psycopg.errors.InsufficientPrivilege:
                pass
    assert locked == []
    # what it may do, held in an open transaction, stops nobody
    attacker.execute("BEGIN")
    for statement in ("SELECT count(*) FROM spoolops.my_requests",
                      "SELECT spoolops.queue_length()", "SELECT * FROM spoolops.pending_batches()",
                      "SELECT spoolops.submit('held20', 1, 'echo', '{}', 0, NULL, NULL, NULL)",
                      "SELECT * FROM spoolops.collect('nothing', true)",
                      "SELECT spoolops.cancel('nothing')"):
        attacker.execute(statement)
    try:
        start = time.monotonic()
        for n in range(3):
            assert client.call("echo", {"n": n}, timeout=10) == {"n": n}
        assert time.monotonic() - start < 10
    finally:
        attacker.execute("ROLLBACK")
        attacker.close()


def _call_in_time(client, limit: float) -> tuple[float, str]:
    """``client.call(timeout=2)`` in a thread: (seconds it took, its outcome);
    gives up waiting after ``limit``."""
    result: list[str] = []

    def call() -> None:
        try:
            client.call("echo", {"t": 1}, timeout=2)
            result.append("answered")
        except TransportUnavailable:
            result.append("TransportUnavailable")
        except Timeout:
            result.append("Timeout")
        except Exception as exc:  # noqa: BLE001 - reported below
            result.append(repr(exc))
    start = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(limit)
    return time.monotonic() - start, (result[0] if result else "still waiting")


def test_issue20_5_a_call_keeps_its_timeout_while_the_database_is_locked_or_stopped(
        pgq, pg_cluster) -> None:
    pgq.start_worker()
    client = pgq.client(WEB)
    assert client.call("echo", {"warm": 1}, timeout=30) == {"warm": 1}
    admin = psycopg.connect(admin_dsn(pgq), autocommit=True)
    admin.execute("BEGIN")
    admin.execute("LOCK TABLE spoolops.requests IN ACCESS EXCLUSIVE MODE")
    try:
        took, outcome = _call_in_time(client, 8.0)
    finally:
        admin.execute("ROLLBACK")
        admin.close()
    print(f"\nlocked: call(timeout=2) -> {outcome} after {took:.2f} s")
    assert took < 3.0 and outcome in ("Timeout", "TransportUnavailable"), (took, outcome)
    assert client.call("echo", {"after": "lock"}, timeout=30) == {"after": "lock"}
    pg_cluster.stop()
    try:
        took, outcome = _call_in_time(client, 8.0)
    finally:
        pg_cluster.start()
    print(f"stopped: call(timeout=2) -> {outcome} after {took:.2f} s")
    assert took < 3.0 and outcome in ("Timeout", "TransportUnavailable"), (took, outcome)
    assert client.call("echo", {"after": "stop"}, timeout=60) == {"after": "stop"}
    # every login role of the queue's groups: timeouts of its own in this database
    for role in (WEB, WEB2, WORKER_ROLE):
        with connect_as(pgq, role) as c:
            assert c.execute("SHOW lock_timeout").fetchone()[0] != "0", role
            assert c.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] != "0"


def test_issue20_5_an_id_another_role_holds_says_nothing(pgq) -> None:
    web1, web2 = pgq.client(WEB), pgq.client(WEB2)
    request = web1._request("echo", {"who": WEB}, 0, None)
    rid = web1.transport.publish(request)
    # the attacker learnt the id somehow, and submits under it: no error, no hint
    forged = dict(request, args={"who": WEB2}, client={"pid": 1})
    assert web2.transport.publish(forged) == rid
    with pytest.raises(BadRequest, match="already in use"):       # its own, twice: said
        web2.transport.publish(dict(forged, args={"who": "again"}))
    with pytest.raises(BadRequest, match="already in use"):
        web1.transport.publish(dict(request, args={"who": "again"}))
    assert web2.cancel(rid) is True                     # its own request, not web1's
    assert web2.transport.publish(dict(forged, id=rid + "x")) == rid + "x"
    pgq.start_worker()
    assert web1.wait(rid, timeout=30).result == {"who": WEB}
    assert web2.wait(rid + "x", timeout=30).result == {"who": WEB2}
    # both in the table under ids of their own; each answered under its own
    web2.transport.publish(dict(forged, args={"who": "second"}))
    assert web2.wait(rid, timeout=30).result == {"who": "second"}
    assert pgq.sql("SELECT count(*) FROM spoolops.requests") == [(0,)]


# -- 7: sizes --------------------------------------------------------------------

def test_issue20_7_an_oversize_request_is_refused_at_submit(pgq) -> None:
    client = pgq.client(WEB)
    limit = pgq.config.max_request_bytes
    with pytest.raises(BadRequest, match="max_request_bytes"):
        client.submit("echo", {"pad": "x" * limit})
    assert pgq.sql("SELECT count(*) FROM spoolops.requests") == [(0,)]
    rid = client.submit("echo", {"pad": "x" * (limit - 1000)})    # within: queued
    assert pgq.sql("SELECT id FROM spoolops.requests") == [(rid,)]


def _hwm_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


@pytest.mark.slow
def test_issue20_7_large_queued_requests_keep_the_worker_small(pg_cluster,
                                                                tmp_path: Path) -> None:
    env = make_pg_env(pg_cluster, tmp_path / "q", concurrency=1)
    try:
        set_spool_option(env, "max_request_bytes = 16M")
        worker = env.start_worker()
        client = env.client(WEB)
        release = tmp_path / "release"
        busy = client.submit("hold", {"release": str(release), "target": "T", "timeout": 120})
        wait_for(lambda: env.running_targets() == ["T"], what="the worker busy")
        before = _hwm_kb(worker.pid)
        # 8 requests of 12 MiB (compressible: small on disk), queued behind it
        big = [client.submit("sleep", {"seconds": 0, "pad": "x" * (12 * 2**20), "n": n})
               for n in range(8)]
        time.sleep(7)          # rescan_interval is 2 s: the worker scans the queue 3 times
        after = _hwm_kb(worker.pid)
        grew_mb = (after - before) / 1024
        print(f"\nworker VmHWM {before / 1024:.0f} -> {after / 1024:.0f} MiB with 8 x 12 MiB"
              " queued")
        assert grew_mb < 40, f"the worker grew by {grew_mb:.0f} MiB with large requests queued"
        for rid in big:
            client.cancel(rid)
        release.touch()
        assert client.wait(busy, timeout=60).ok
    finally:
        env.close()


# -- 8: bounded payloads -----------------------------------------------------------

def test_issue20_8_a_huge_op_name_gets_its_reply(pgq) -> None:
    pgq.start_worker()
    client = pgq.client(WEB)
    op = "o" * 7919
    reply = client.call_reply(op, {}, timeout=30)
    assert reply.error["type"] == "UnknownOp", reply
    for size in (7990, 8100, 20000):          # past NOTIFY's 8000 bytes, whatever the event
        assert client.call_reply("p" * size, {}, timeout=30).error["type"] == "UnknownOp"
    assert pgq.sql("SELECT count(*) FROM spoolops.requests WHERE state = 'running'") == [(0,)]
    assert client.call("echo", {"after": 1}, timeout=30) == {"after": 1}


# -- 9: outcomes survive lost answers and restarts ---------------------------------

RESTART_CLIENT = r"""
import json, sys, time
from spoolops.client import Client
from spoolops.errors import TransportUnavailable, Timeout, OpError
out, first, n = open(sys.argv[1], "w"), int(sys.argv[2]), int(sys.argv[3])
client = Client()
for k in range(first, first + n):
    args = {"k": k}
    if k % 10 == 1:
        args["lose_submit"] = k
    if k % 10 == 6:
        args["lose_collect"] = k
    refused = 0
    while True:
        try:
            record = {"k": k, "result": client.call("echo", args, timeout=45)}
        except TransportUnavailable as exc:
            refused += 1
            if refused < 100:
                time.sleep(0.2)
                continue
            record = {"k": k, "error": type(exc).__name__, "message": str(exc)}
        except (Timeout, OpError) as exc:
            record = {"k": k, "error": type(exc).__name__, "message": str(exc)}
        break
    record["refused"] = refused
    out.write(json.dumps(record) + "\n")
    out.flush()
"""


@pytest.mark.slow
def test_issue20_9_every_call_gets_its_one_reply_through_lost_answers_and_restarts(
        pg_cluster, tmp_path: Path) -> None:
    env = make_pg_env(pg_cluster, tmp_path / "q", lock_grace="20s")
    proxy = LossyProxy(tmp_path / "proxy", pg_cluster.port,
                       str(Path(pg_cluster.host) / f".s.PGSQL.{pg_cluster.port}"),
                       1.0 if os.environ.get("SPOOLOPS_SOAK") else 0.3)
    try:
        for role in (WEB, WEB2):
            path = env.client_configs[role]
            path.write_text(path.read_text().replace(f"host={pg_cluster.host}",
                                                     f"host={proxy.folder}"))
        env.start_worker()
        outs = [tmp_path / f"c{i}.jsonl" for i in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", RESTART_CLIENT, str(out),
                                   str(1000 * i), "50"],
                                  env=env.client_env((WEB, WEB2)[i % 2]))
                 for i, out in enumerate(outs)]

        def done() -> int:
            return sum(len(o.read_text().splitlines()) for o in outs if o.exists())
        for at in (40, 110):
            wait_for(lambda at=at: done() >= at or all(p.poll() is not None for p in procs),
                     timeout=240, what="traffic")
            pg_cluster.restart()
            time.sleep(random.uniform(0.1, 0.5))
        for proc in procs:
            assert proc.wait(400) == 0
        records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
        failed = [r for r in records if "result" not in r]
        refused = sum(r["refused"] for r in records)
        print(f"\nlost answers cut by the proxy: {proxy.cut}; {len(records)} calls,"
              f" {len(failed)} without their reply, {refused} submits refused (and made"
              " again)")
        assert failed == [], failed[:5]
        assert len(records) == 200 and all(r["result"]["k"] == r["k"] for r in records)
        assert proxy.cut["submit"] >= 10 and proxy.cut["collect"] >= 10, proxy.cut
        wait_for(env.quiet, timeout=60, what="nothing left queued or running")
        # a refused submit that had queued its request after all would have run,
        # its reply left for nobody: none is
        assert env.replies_left() == 0
        assert env.sql("SELECT count(*) FROM spoolops.requests") == [(0,)]
    finally:
        proxy.stop()
        env.close()


def test_issue20_9_a_submit_refused_queued_nothing(pgq, pg_cluster) -> None:
    """TransportUnavailable only when nothing was queued: a server that is
    down when the submit is made (and the queue afterwards holds nothing)."""
    client = pgq.client(WEB)
    assert client.queue_length() == 0
    pg_cluster.stop()
    try:
        with pytest.raises(TransportUnavailable):
            client.submit("echo", {"never": 1})
    finally:
        pg_cluster.start()
    assert pgq.sql("SELECT count(*) FROM spoolops.requests") == [(0,)]
