"""The PostgreSQL transport's workers under attack and under ordinary faults
(issue 20, the worker's side): liveness a web role cannot fake, a claim whose
answer is lost, a put-back that fails, a server restarted under load,
submission order across two workers, a frozen worker, a deadline no worker
can read.

A real throwaway cluster (``pg_cluster``), a database per test, each role
connecting as itself; faults are made by the server (a synchronous standby
that never answers, a trigger that sleeps, a backend terminated, a restart),
never by code under test.  ``SPOOLOPS_SOAK=1`` restarts the server more
often, under more calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.env import WEB, WORKER_ROLE, make_pg_env
from support.proxy import proxy_for_worker
from support.waiting import wait_for

from spoolops.errors import BadRequest

psycopg = pytest.importorskip("psycopg")

SOAK = bool(os.environ.get("SPOOLOPS_SOAK"))


def connect_as(env, role: str):
    return psycopg.connect(env.cluster.dsn(env.dbname, role), autocommit=True)


def second_host(env) -> Path:
    """A config for a worker of another host (another worker folder) on the
    same database."""
    other = env.base / "b.conf"
    other.write_text(env.config_path.read_text().replace("root = spool", "root = spool-b"))
    os.makedirs(env.base / "spool-b" / "work" / "locks", exist_ok=True)
    return other


def submit_as(env, role: str, rid: str, op: str, args: dict, **fields) -> None:
    """Queue a request as a client of ``role`` does, with an id (and any
    other field) of the test's choosing."""
    client = env.client(role)
    request = client._request(op, args, 0, None)
    request.update(id=rid, **fields)
    client.transport.publish(request)


def state_of(env, rid: str) -> str | None:
    rows = env.sql("SELECT state FROM spoolops.requests WHERE id = %s", rid)
    return rows[0][0] if rows else None


# -- 1. liveness a web role cannot fake ----------------------------------------------

def _holding_on_a(env, tmp_path: Path):
    """A second host's configuration, worker A, and a request of target H
    running on A until ``release`` appears: (other, a, client, release, id)."""
    other = second_host(env)
    a = env.start_worker()
    client = env.client()
    release = tmp_path / "release"
    rid = client.submit("hold", {"release": str(release), "target": "H", "timeout": 120})
    wait_for(lambda: env.running_targets() == ["H"], what="the request running on A")
    return other, a, client, release, rid


def test_squatted_advisory_keys_neither_fake_a_worker_nor_keep_one_out(pg_cluster,
                                                                        tmp_path) -> None:
    """A web role takes every advisory key it can see or guess -- the dead
    worker's own (read from pg_locks while it lived) and the (schema, id)
    keys of the next 60 worker ids: a new worker still starts, and the dead
    worker's request is recovered and answered.  doctor and status say which
    worker holds what."""
    env = make_pg_env(pg_cluster, tmp_path / "a", lock_grace="2s")
    try:
        other, a, client, release, rid = _holding_on_a(env, tmp_path)
        squatter = connect_as(env, WEB)
        seen = squatter.execute("SELECT classid::bigint, objid::bigint, objsubid FROM"
                                " pg_locks WHERE locktype = 'advisory'").fetchall()
        assert seen, "a web role sees every advisory lock (so liveness must not rest on it)"
        env.stop_worker(a, signal.SIGKILL)
        # the keys A held, taken the moment A's session is gone
        for classid, objid, subid in seen:
            if subid == 1:
                key = (classid << 32) | objid
                wait_for(lambda k=key: squatter.execute(
                    "SELECT pg_try_advisory_lock(%s::bigint)", (k,)).fetchone()[0],
                    what="A's key free")
            else:
                wait_for(lambda c=classid, o=objid: squatter.execute(
                    "SELECT pg_try_advisory_lock(%s::int, %s::int)", (c, o)).fetchone()[0],
                    what="A's key free")
        # and the keys of workers to come, as the (schema, id) scheme made them
        space = int.from_bytes(hashlib.sha256(b"spoolops").digest()[:4], "big") & 0x7FFFFFFF
        for wid in range(1, 61):
            squatter.execute("SELECT pg_try_advisory_lock(%s::int, %s::int)", (space, wid))
        b = env.start_worker(SPOOLOPS_CONFIG=str(other))   # it starts
        release.touch()
        reply = client.wait(rid, timeout=60)      # A's request, recovered by B
        assert reply.ok and reply.worker["pid"] == b.pid
        doctor = env.spoolops("doctor", "--all")
        [b_line] = [line for line in doctor.stdout.splitlines() if f"pid {b.pid}," in line]
        assert b_line.startswith("ok") and "alive (backend" in b_line, doctor.stdout
        status = json.loads(env.spoolops("status", "--json").stdout)
        assert [w["pid"] for w in status["workers"] if w["alive"]] == [b.pid]
        assert status["worker"] == {"pid": b.pid, "alive": True} | {
            k: status["worker"][k] for k in status["worker"] if k not in ("pid", "alive")}
        squatter.close()
    finally:
        env.close()


# -- 4. a claim whose answer is lost; a put-back that fails --------------------------

def test_a_claim_whose_answer_is_lost_is_answered_without_a_restart(pg_cluster,
                                                                    tmp_path) -> None:
    """The claim commits, and its answer never reaches the worker: a proxy
    between the worker and the server cuts the connection once the server
    has answered the claim (and refuses connections for a moment, as a
    server restarting would).  The worker, still running, finds the row it
    holds without knowing it and puts it back; the request gets its one
    reply."""
    env = make_pg_env(pg_cluster, tmp_path / "q", lock_grace="60s")
    proxy = proxy_for_worker(env, pg_cluster, tmp_path / "proxy")
    try:
        worker = env.start_worker()
        client = env.client()
        # (not echo: an instant op is claimed by its answer, with no claim of its own)
        rid = client.submit("sleep", {"seconds": 0, "tag": "lost claim", "lose_claim": 1})
        wait_for(lambda: "event=claim_failed" in worker.log_path.read_text(),
                 what="the worker to see its claim fail")
        assert proxy.cut["claim"] == 1, proxy.cut
        reply = client.wait(rid, timeout=30)
        assert reply.ok and reply.result["tag"] == "lost claim"
        assert worker.poll() is None, "answered by the same worker, not after a restart"
        assert f"event=stray_claim id={rid}" in worker.log_path.read_text()
        assert env.quiet()
    finally:
        proxy.stop()
        env.close()


def test_a_put_back_that_fails_is_put_back_later(pg_cluster, tmp_path) -> None:
    """Two requests on one target are claimed together; the later one is put
    back in line -- and that UPDATE never commits (its session is terminated
    while a trigger holds it).  The worker, still running, finds the row it
    still holds and puts it back: the request runs after the first one."""
    env = make_pg_env(pg_cluster, tmp_path / "q", lock_grace="60s")
    try:
        release = tmp_path / "release"
        submit_as(env, WEB, "pb0", "hold", {"release": str(release), "target": "T"})
        submit_as(env, WEB, "pb1", "hold", {"release": str(release), "target": "T"})
        # the put-back of pb1 sleeps, in its first try and in the transport's
        # one retry on a fresh connection (a sequence is not transactional:
        # it counts the tries that rolled back too)
        env.sql("CREATE SEQUENCE public.pb_calls")
        env.sql("CREATE FUNCTION public.slow_put_back() RETURNS trigger LANGUAGE plpgsql"
                " SECURITY DEFINER SET search_path = pg_catalog AS $$ BEGIN IF"
                " nextval('public.pb_calls') <= 2 THEN PERFORM pg_sleep(60); END IF;"
                " RETURN NEW; END $$")
        env.sql("CREATE TRIGGER slow_put_back BEFORE UPDATE ON spoolops.requests FOR EACH"
                " ROW WHEN (OLD.id = 'pb1' AND OLD.state = 'running' AND NEW.state ="
                " 'queued') EXECUTE FUNCTION public.slow_put_back()")
        worker = env.start_worker()     # its first scan finds both: claimed together
        for _ in range(2):
            [(pid,)] = wait_for(lambda: env.sql(
                "SELECT pid FROM pg_stat_activity WHERE usename = %s AND wait_event ="
                " 'PgSleep'", WORKER_ROLE), what="the put-back held by the trigger")
            env.sql("SELECT pg_terminate_backend(%s)", pid)
            wait_for(lambda p=pid: not env.sql("SELECT 1 FROM pg_stat_activity WHERE pid ="
                                               " %s", p), what="the session gone")
        wait_for(lambda: "event=unclaim_failed id=pb1" in worker.log_path.read_text(),
                 what="the worker to see its put-back fail")
        release.touch()
        client = env.client()
        assert client.wait("pb0", timeout=30).ok
        reply = client.wait("pb1", timeout=30)
        assert reply.ok and worker.poll() is None
        # held by the worker after the failed put-back, found and put back by it
        assert "event=stray_claim id=pb1" in worker.log_path.read_text()
        assert env.quiet()
    finally:
        env.close()


# -- 9. the server restarted under load -----------------------------------------------

RESTART_CLIENT = r"""
import json, sys, time
from spoolops.client import Client
from spoolops.errors import BadRequest, TransportUnavailable

index, out_path, n, folder = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
client = Client()
transport = client.transport
with open(out_path, "w") as out:
    for k in range(n):
        if k % 5 == 4:   # not idempotent: it must run exactly once
            op, args = "append", {"path": f"{folder}/c{index}.txt", "tag": f"{index}-{k}",
                                  "target": f"c{index}"}
        else:
            op, args = "echo", {"c": index, "k": k}
        request = client._request(op, args, 0, None)
        rid = request["id"]
        waiter = transport.expect(rid)
        tries = 0
        while True:   # until this id is known to be queued (the client's half of
            tries += 1   # a lost answer is not what this test is about)
            try:
                transport.publish(request)
                break
            except BadRequest as exc:
                if tries > 1 and "already in use" in str(exc):
                    break        # an earlier try committed
                raise
            except TransportUnavailable:
                time.sleep(0.2)
        end, reply = time.monotonic() + 120, None
        while reply is None and time.monotonic() < end:
            try:   # the reply is read, not removed (a lost removal is the client's half)
                reply = transport.collect(rid, remove=False)
            except TransportUnavailable:
                pass
            if reply is None:
                waiter.wait(0.5)
        waiter.close()
        out.write(json.dumps({"k": k, "id": rid, "op": op, "args": args, "reply": reply})
                  + "\n")
        out.flush()
"""


@pytest.mark.slow
def test_server_restarts_under_load_leave_nothing_running_and_run_nothing_twice(
        pg_cluster, tmp_path) -> None:
    """Four web clients make 50 calls each (echo, and every fifth a request
    that is not idempotent) while the server is restarted again and again:
    every request is answered exactly once by the one worker, which never
    restarts; none is left running; the non-idempotent ones ran once each."""
    env = make_pg_env(pg_cluster, tmp_path / "q", lock_grace="20s")
    calls, restarts = (200, 30) if SOAK else (50, 8)
    try:
        worker = env.start_worker()
        folder = tmp_path / "appends"
        folder.mkdir()
        outs = [tmp_path / f"c{i}.jsonl" for i in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", RESTART_CLIENT, str(i), str(out),
                                   str(calls), str(folder)], env=env.client_env())
                 for i, out in enumerate(outs)]

        def done() -> int:
            return sum(len(o.read_text().splitlines()) for o in outs if o.exists())

        def where() -> str:
            rows = env.sql("SELECT id, state, claimed_by, attempt FROM spoolops.requests"
                           " WHERE state IN ('queued', 'running')")
            return f"worker exit status {worker.poll()}, requests not answered: {rows}"
        for n in range(restarts):
            try:
                wait_for(lambda n=n: done() >= (n + 1) * 4 * calls // (restarts + 2) or
                         all(p.poll() is not None for p in procs), timeout=120,
                         what="traffic")
            except AssertionError as exc:
                raise AssertionError(f"{exc}: {where()}") from None
            pg_cluster.restart()
        for proc in procs:
            assert proc.wait(300) == 0
        records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
        assert len(records) == 4 * calls
        lost = [r["id"] for r in records if r["reply"] is None]
        assert not lost, f"no reply within 120 s to {lost}: {where()}"
        for r in records:
            assert r["reply"]["ok"], r
            if r["op"] == "echo":
                assert r["reply"]["result"] == r["args"]
        tags = [line for f in folder.iterdir() for line in f.read_text().splitlines()]
        wanted = [r["args"]["tag"] for r in records if r["op"] == "append"]
        assert sorted(tags) == sorted(wanted), "each non-idempotent request ran once"
        assert worker.poll() is None, "the worker rode out the restarts"
        assert env.sql("SELECT count(*) FROM spoolops.requests WHERE state IN ('queued',"
                       " 'running')") == [(0,)]
        print(f"\n{restarts} restarts, {len(records)} calls, each answered once")
    finally:
        env.close()


# -- 10. submission order across two workers ------------------------------------------

def test_two_workers_keep_the_submission_order_of_one_target(pg_cluster, tmp_path) -> None:
    """Two workers on one database; three rounds of 16 edits of one target,
    submitted one after the other: each round's edits land in the order they
    were submitted, whichever worker runs which.  The first edit of each
    round is slow to lease (a trigger sleeps half a second, as a slow
    resolver or a busy worker would be between claim and lease), so that
    the other worker has every chance to claim and lease a later edit first."""
    env = make_pg_env(pg_cluster, tmp_path / "a", lock_grace="4s")
    try:
        env.sql("CREATE FUNCTION public.slow_lease() RETURNS trigger LANGUAGE plpgsql"
                " SECURITY DEFINER SET search_path = pg_catalog AS $$ BEGIN IF EXISTS"
                " (SELECT 1 FROM spoolops.requests WHERE id = NEW.request_id AND"
                " args->>'slow' = 'yes') THEN PERFORM pg_sleep(0.5); END IF; RETURN NEW;"
                " END $$")
        env.sql("CREATE TRIGGER slow_lease BEFORE INSERT ON spoolops.leases FOR EACH ROW"
                " EXECUTE FUNCTION public.slow_lease()")
        other = second_host(env)
        env.start_worker()
        env.start_worker(SPOOLOPS_CONFIG=str(other))
        client = env.client()
        pids = set()
        for rnd in range(3):
            path = tmp_path / f"round{rnd}.txt"
            tags = [f"{rnd}-{i:02d}" for i in range(16)]
            ids = [client.submit("append", {"path": str(path), "tag": tag, "target": "T",
                                            "seconds": 0.002, "slow": "yes" if i == 0 else
                                            "no"}) for i, tag in enumerate(tags)]
            replies = [client.wait(rid, timeout=60) for rid in ids]
            assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]
            pids |= {r.worker["pid"] for r in replies}
            assert path.read_text().splitlines() == tags, f"round {rnd}"
        assert env.quiet()
        print(f"\nserved by {len(pids)} worker(s)")
    finally:
        env.close()


# -- a worker frozen (SIGSTOP): alive by its lock, dead to the world -----------------

def test_a_frozen_worker_is_fenced_and_its_request_answered_by_another(pg_cluster,
                                                                       tmp_path) -> None:
    """Worker A is frozen with SIGSTOP mid-request: its session and advisory
    lock live on.  Worker B sees A's heartbeat go stale, waits lock_grace,
    fences A (its session ended) and runs A's idempotent request again.
    Thawed, A learns it was fenced and stops (status 75) without answering."""
    env = make_pg_env(pg_cluster, tmp_path / "a", lock_grace="2s")
    try:
        other, a, client, release, rid = _holding_on_a(env, tmp_path)
        b = env.start_worker(SPOOLOPS_CONFIG=str(other))
        os.kill(a.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            env.wait_log(b, "event=worker_fenced", timeout=60)
            waited = time.monotonic() - frozen
            assert waited >= 2.0, "not before lock_grace"
            assert "session_ended=yes" in b.log_path.read_text()
            release.touch()
            reply = client.wait(rid, timeout=30)
            assert reply.ok and reply.worker["pid"] == b.pid
        finally:
            os.kill(a.pid, signal.SIGCONT)
        assert a.wait(30) == 75
        assert "event=worker_fenced_self" in a.log_path.read_text()
        assert env.quiet() and env.replies_left() == 0
        print(f"\nfrozen worker fenced after {waited:.1f} s")
    finally:
        env.close()


# -- a deadline no client library can read ---------------------------------------------

def test_a_deadline_no_worker_can_read_is_refused_at_submit(pg_cluster, tmp_path) -> None:
    """A web role's request with deadline 'infinity' (or after year 9999) made
    every worker that claimed it fail after the claim had committed -- and
    again at each restart, its recovery reading the same row.  The database
    refuses it; the worker serves on."""
    env = make_pg_env(pg_cluster, tmp_path / "q")
    try:
        worker = env.start_worker()
        for n, deadline in enumerate(("infinity", "10000-01-01T00:00:00Z", "-infinity")):
            with pytest.raises(BadRequest):
                submit_as(env, WEB, f"d{n}", "echo", {}, deadline=deadline)
        assert env.client().call("echo", {"after": 1}, timeout=30) == {"after": 1}
        assert worker.poll() is None
    finally:
        env.close()
