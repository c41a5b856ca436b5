"""What is particular to the PostgreSQL transport: identity and row-level
security, two workers on one database, a worker lost on another host, the
database restarting mid-stream, a client killed while it waits, the schema's
set-up and migration, doctor and tail.  (Everything both transports share is
in test_e2e.py and test_fault_injection.py.)

A real throwaway cluster (``pg_cluster``), a database per test; each role
connects as itself.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.env import WEB, WEB2, WORKER_ROLE, connect_as, make_pg_env
from support.tail import events_for, start_tail, tail_ready
from support.waiting import Lines, wait_for

from spoolops import BadRequest, Client
from spoolops.errors import TransportUnavailable
from spoolops.janitor import run_janitor

psycopg = pytest.importorskip("psycopg")




def test_identity_comes_from_the_database_and_rows_are_private(pgq, tmp_path: Path) -> None:
    pgq.start_worker()
    web1, web2 = pgq.client(WEB), pgq.client(WEB2)
    release = tmp_path / "release"
    held = web1.submit("hold", {"release": str(release), "target": "T"})
    wait_for(lambda: pgq.running_targets() == ["T"], what="the held request running")
    answered = web1.submit("echo", {"secret": 1})
    wait_for(lambda: pgq.count("replies") == 1, what="the reply")
    # another role sees nothing of web1's: not the reply, not the rows
    assert web2.transport.collect(answered) is None
    assert web2.transport.progress_of(held) is None
    assert web2.cancel(answered) is False
    with connect_as(pgq, WEB2) as c:
        # no privilege on any table (issue 20, 5): its own rows through the view
        assert c.execute("SELECT count(*) FROM spoolops.my_requests").fetchone()[0] == 0
        for statement in ("SELECT count(*) FROM spoolops.requests",
                          "DELETE FROM spoolops.requests", "SELECT * FROM spoolops.leases",
                          "SELECT * FROM spoolops.workers"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
        # a forged wake-up is only a hint: the row, read by its owner, is the truth
        c.execute("SELECT pg_notify('spoolops_reply_web1', %s)", (answered,))
    with connect_as(pgq, WEB) as c:
        # no reply, state or submitter of its own choosing
        for statement in ("UPDATE spoolops.requests SET reply = '{}'",
                          "UPDATE spoolops.requests SET state = 'answered'",
                          ("INSERT INTO spoolops.requests (id, op, submitter) VALUES"
                          " ('x1', 'echo', 'web2')"),
                          ("INSERT INTO spoolops.requests (id, op, reply, state) VALUES"
                          " ('x2', 'echo', '{}', 'answered')")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(statement)
        # a running request cannot be cancelled from under the worker
        assert c.execute("SELECT spoolops.cancel(%s)", (held,)).fetchone()[0] is False
    # even a superuser's insert gets the server's identity and state
    pgq.sql("INSERT INTO spoolops.requests (id, version, op, args, submitter, state, reply)"
            " VALUES ('forged1', 1, 'whoami', '{}', 'web2', 'answered', '{}')")
    wait_for(lambda: pgq.sql("SELECT state FROM spoolops.requests WHERE id = 'forged1'")
             == [("answered",)], what="the forged row run as a fresh request")
    [(submitter, reply)] = pgq.sql("SELECT submitter, reply FROM spoolops.requests"
                                   " WHERE id = 'forged1'")
    assert submitter == "postgres" and reply["result"] == {"user": "postgres"}
    release.touch()
    assert web1.wait(held, timeout=60).ok
    assert web1.wait(answered, timeout=10).result == {"secret": 1}
    assert web1.call("whoami", {}, timeout=30) == {"user": WEB}


def test_rows_written_by_hand_are_judged_like_files(pgq) -> None:
    """A request inserted with raw SQL gets dispatch's checks: duplicate keys,
    a wrong version, nesting -- precise replies, and the worker goes on."""
    pgq.start_worker()
    cases = {"dup": ('{"a": 1, "a": 2}', 1, "duplicate key"),
             "ver": ('{}', 7, "unsupported request version"),
             "deep": ("[" * 40 + "]" * 40, 1, "nested")}
    with connect_as(pgq, WEB) as c:
        for rid, (args, version, _) in cases.items():
            c.execute("SELECT spoolops.submit(%s, %s, 'echo', %s::json, 0, NULL, NULL, NULL)",
                      (rid, version, args))
    client = pgq.client(WEB)
    for rid, (_, _, message) in cases.items():
        reply = client.wait(rid, timeout=30)
        assert reply.error["type"] == "BadRequest" and message in reply.error["message"], reply
    with pytest.raises(BadRequest):
        client.call("echo", {"x": "\u0000"}, timeout=10)   # PostgreSQL refuses NUL text
    assert client.call("echo", {"ok": 1}, timeout=30) == {"ok": 1}


def test_two_workers_share_one_queue_and_never_run_a_target_twice(pg_cluster,
                                                                   tmp_path: Path) -> None:
    """Two workers (two hosts: two folders) on one database serve one stream;
    requests on three targets never overlap on a target, whichever worker
    runs them; each request is answered once."""
    env = make_pg_env(pg_cluster, tmp_path / "a", lock_grace="4s")
    try:
        other = env.base / "b.conf"
        other.write_text(env.config_path.read_text().replace("root = spool", "root = spool-b"))
        os.makedirs(tmp_path / "a" / "spool-b" / "work" / "locks")
        env.start_worker()
        env.start_worker(SPOOLOPS_CONFIG=str(other))
        client = env.client()
        ids = [client.submit("sleep", {"seconds": 0.02, "target": f"T{i % 3}", "tag": i})
               for i in range(90)]
        ids += [client.submit("echo", {"n": n}) for n in range(60)]
        replies = [client.wait(rid, timeout=120) for rid in ids]
        assert all(r.ok for r in replies)
        pids = {r.worker["pid"] for r in replies}
        assert pids == {w.pid for w in env.workers}, "both workers served"
        for target in ("T0", "T1", "T2"):
            spans = sorted((r.result["start"], r.result["end"]) for r in replies
                           if r.op == "sleep" and ids.index(r.id) % 3 == int(target[1]))
            for (_s1, e1), (s2, _e2) in itertools.pairwise(spans):
                assert s2 >= e1 - 0.001, f"{target} ran twice at once"
        assert env.quiet() and env.replies_left() == 0
        assert env.sql("SELECT count(*) FROM spoolops.leases") == [(0,)]
    finally:
        env.close()


@pytest.mark.slow
def test_worker_lost_on_another_host(pg_cluster, tmp_path: Path) -> None:
    """Worker A is killed mid-operation; worker B (another host) waits
    lock_grace, then re-runs A's idempotent request, answers its
    non-idempotent one Interrupted, and leaves the one whose op keeps a
    journal on A's host (update_headers) -- with its target leased -- until
    A's host starts a worker again, which recovers it."""
    env = make_pg_env(pg_cluster, tmp_path / "a", lock_grace="3s")
    try:
        other = env.base / "b.conf"
        other.write_text(env.config_path.read_text().replace("root = spool", "root = spool-b"))
        os.makedirs(tmp_path / "a" / "spool-b" / "work" / "locks")
        a = env.start_worker()
        client = env.client()
        release = tmp_path / "never"
        idem = client.submit("hold", {"release": str(release), "target": "H", "timeout": 60})
        nonidem = client.submit("nonidem", {"seconds": 4, "target": "N"})
        wait_for(lambda: env.running_targets() == ["H", "N"], what="both running on A")
        a_id = env.sql("SELECT id FROM spoolops.workers")[0][0]
        env.stop_worker(a, signal.SIGKILL)
        killed = time.monotonic()
        # a request A left running whose op keeps on-disk state only A's host
        # knows (a journal): stand in for one, A being dead
        with connect_as(env, WEB) as c:
            c.execute("SELECT spoolops.submit('uh1', 1, 'update_headers', '{\"filename\":"
                      " \"x.fits\", \"values\": {\"generic\": {\"A\": 1}}}', 0, NULL, NULL,"
                      " NULL)")
        env.sql("UPDATE spoolops.requests SET state = 'running', claimed_by = %s, attempt = 1,"
                " claimed_at = now(), run = '{}' WHERE id = 'uh1'", a_id)
        env.sql("INSERT INTO spoolops.leases VALUES ('x.fits', 'uh1')")
        b = env.start_worker(SPOOLOPS_CONFIG=str(other))
        release.touch()
        assert client.wait(idem, timeout=60).ok                  # re-run by B
        assert time.monotonic() - killed >= 2.5, "B waited for lock_grace"
        reply = client.wait(nonidem, timeout=60)
        assert reply.error["type"] == "Interrupted"
        assert env.count("failed") == 1
        requeued = env.spoolops("requeue", nonidem)
        assert requeued.returncode == 0 and "(was in failed)" in requeued.stdout
        assert client.wait(nonidem, timeout=60).ok        # B runs it again
        env.wait_log(b, "event=orphan_left id=uh1")
        assert env.sql("SELECT state FROM spoolops.requests WHERE id = 'uh1'") == [("running",)]
        assert env.sql("SELECT request_id FROM spoolops.leases") == [("uh1",)]
        env.stop_worker(b)
        # A's host again: its own orphan is recovered at once (re-run: it is
        # idempotent, its journal rolled back first), the lease freed
        env.start_worker()
        reply = client.wait("uh1", timeout=60)
        assert reply.error["type"] == "NotFound"                 # x.fits never existed
        assert env.sql("SELECT count(*) FROM spoolops.leases") == [(0,)]
    finally:
        env.close()


RESTART_CLIENT = r"""
import json, sys
from spoolops.client import Client
from spoolops.errors import TransportUnavailable, Timeout
client, out, n = Client(), open(sys.argv[1], "w"), int(sys.argv[2])
for k in range(n):
    try:
        rid = client.submit("echo", {"k": k})
    except TransportUnavailable as exc:
        out.write(json.dumps({"k": k, "refused": str(exc)}) + "\n"); continue
    try:
        reply = client.wait(rid, timeout=120)
        out.write(json.dumps({"k": k, "id": rid, "result": reply.result}) + "\n")
    except Timeout:
        out.write(json.dumps({"k": k, "id": rid, "lost": True}) + "\n")
    out.flush()
"""


@pytest.mark.slow
def test_postgresql_restarts_mid_stream(pg_cluster, tmp_path: Path) -> None:
    """The server restarts twice under load: the worker and the clients
    reconnect; every request accepted is answered exactly once; a submit
    made while the server is down fails at once, saying so."""
    env = make_pg_env(pg_cluster, tmp_path / "q", lock_grace="20s")
    try:
        worker = env.start_worker()
        outs = [tmp_path / f"c{i}.jsonl" for i in range(4)]
        procs = [subprocess.Popen([sys.executable, "-c", RESTART_CLIENT, str(out), "400"],
                                  env=env.client_env()) for out in outs]
        for _ in range(2):
            wait_for(lambda: sum(len(o.read_text().splitlines()) for o in outs
                                 if o.exists()) > 100, what="traffic")
            pg_cluster.restart()
            time.sleep(0.5)
        for proc in procs:
            assert proc.wait(300) == 0
        records = [json.loads(line) for out in outs for line in out.read_text().splitlines()]
        assert len(records) == 1600
        answered = [r for r in records if "id" in r]
        assert not [r for r in records if r.get("lost")]
        assert all(r["result"] == {"k": r["k"]} for r in answered)
        assert len({r["id"] for r in answered}) == len(answered)
        assert worker.poll() is None, "the worker rode out the restarts"
        log = worker.log_path.read_text()
        assert "event=worker_connection_back" in log
        assert env.quiet() and env.replies_left() == 0
        print(f"\nrestarts: {len(answered)} answered, {len(records) - len(answered)} refused"
              " while the server was down")
    finally:
        env.close()


def test_client_killed_while_waiting_leaves_a_reply_the_janitor_removes(pgq, tmp_path) -> None:
    pgq.start_worker()
    release = tmp_path / "release"
    code = ("import sys\nfrom spoolops.client import Client\n"
            "print(Client().submit('hold', {'release': sys.argv[1]}), flush=True)\n"
            "import time; time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(release)], env=pgq.client_env(),
                            stdout=subprocess.PIPE, text=True)
    rid = Lines(proc.stdout).next(time.monotonic() + 30).strip()
    proc.kill()
    proc.wait()
    release.touch()
    wait_for(lambda: pgq.count("replies") == 1, what="the orphaned reply")
    report = run_janitor(pgq.config, now=lambda: time.time() + 3600)
    assert not any(a.done for a in report.actions)            # younger than reply_ttl
    report = run_janitor(pgq.config, now=lambda: time.time() + 2 * 86400)
    assert [a.path for a in report.actions if a.done] == [f"spoolops.requests id={rid}"]
    assert pgq.count("replies") == 0


def test_init_is_idempotent_and_refuses_a_newer_schema(pgq) -> None:
    again = pgq.spoolops("init", "--database-only", "--admin-dsn",
                         pgq.cluster.dsn(pgq.dbname, "postgres"), "--worker-login", WORKER_ROLE)
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout and "version" not in again.stdout
    pgq.sql("UPDATE spoolops.meta SET value = '99' WHERE key = 'schema_version'")
    newer = pgq.spoolops("init", "--database-only", "--admin-dsn",
                         pgq.cluster.dsn(pgq.dbname, "postgres"))
    assert newer.returncode == 2 and "newer than this spoolops" in newer.stderr
    worker = pgq.spoolops("worker", "--once")
    assert worker.returncode == 2 and "run 'spoolops init" in worker.stderr


def test_doctor_status_and_tail(pgq) -> None:
    doctor = pgq.spoolops("doctor", "--all")
    problems = [line for line in doctor.stdout.splitlines() if line.startswith("PROBLEM")
                and not (os.geteuid() == 0 and "worker user: 'root' is root" in line)]
    assert problems == [], doctor.stdout
    for check in ("database", "schema version", "row-level security", "membership"):
        assert f"ok       {check}:" in doctor.stdout
    as_superuser = pgq.base / "super.conf"
    as_superuser.write_text(pgq.config_path.read_text().replace(
        f"user={WORKER_ROLE}", "user=postgres"))
    bad = pgq.spoolops("--config", str(as_superuser), "doctor")
    assert bad.returncode == 1 and "superuser" in bad.stdout
    tail = start_tail(pgq)
    try:
        deadline = time.monotonic() + 60
        tail_ready(pgq, tail, deadline)   # it follows once it has reported something
        pgq.start_worker()
        client = pgq.client()
        served = client.submit("echo", {"t": 1})
        assert client.wait(served, timeout=30).result == {"t": 1}
        pgq.stop_worker(pgq.workers[0])
        withdrawn = client.submit("echo", {"t": 2})
        client.cancel(withdrawn)
        # (a collected reply is not an event over PostgreSQL: see design.rst)
        assert [e["event"] for e in events_for(tail, served, "finished", deadline)] == [
            "queued", "finished"]
        assert [e["event"] for e in events_for(tail, withdrawn, "removed", deadline)] == [
            "queued", "removed"]
    finally:
        tail.kill()
        tail.wait(30)
    pgq.start_worker()
    status = json.loads(pgq.spoolops("status", "--json").stdout)
    assert status["worker"]["alive"] is True and status["queued"]["count"] == 0
    prometheus = pgq.spoolops("status", "--prometheus").stdout
    assert 'spoolops_requests{state="queued"} 0' in prometheus
    assert "spoolops_worker_up 1" in prometheus
    # a web role's status sees its own rows, and says it cannot see the worker
    web = subprocess.run([sys.executable, "-m", "spoolops", "status", "--json"],
                         env=pgq.client_env(), capture_output=True, text=True, check=False)
    assert web.stdout, web.stderr
    seen = json.loads(web.stdout)
    assert seen["replies"]["count"] == 0 and web.returncode == 1
    assert any("cannot tell whether a worker runs" in p for p in seen["problems"])


def test_a_role_outside_both_groups_is_refused(pgq) -> None:
    pgq.sql("CREATE ROLE outsider LOGIN")
    path = pgq.base / "outsider.conf"
    path.write_text(pgq.config_path.read_text().replace(f"user={WORKER_ROLE}",
                                                        "user=outsider"))
    client = Client(config=path)
    with pytest.raises((BadRequest, TransportUnavailable, Exception)) as info:
        client.submit("echo", {})
    assert "permission denied" in str(info.value)
    worker = pgq.spoolops("--config", str(path), "worker", "--once")
    # (a database only the queue uses: CONNECT is its two group roles' alone)
    assert worker.returncode == 2 and ("may not use schema" in worker.stderr
                                       or "permission denied for database" in worker.stderr)


def test_a_worker_that_regains_its_lock_clears_a_noted_loss(pgq) -> None:
    """Another worker noted this one's lock gone (``lost_at``); once it holds
    the lock again the note is cleared, so a later loss gets its full
    lock_grace before anyone takes its requests over."""
    worker = pgq.start_worker()
    [(wid,)] = pgq.sql("SELECT id FROM spoolops.workers")
    pgq.sql("UPDATE spoolops.workers SET lost_at = now() - interval '1 hour'")
    # cut the session that holds the lock, as a network cut would
    pgq.sql("SELECT pg_terminate_backend(backend_pid) FROM spoolops.workers WHERE id = %s",
            wid)
    pgq.wait_log(worker, "event=worker_connection_back")
    assert pgq.sql("SELECT lost_at FROM spoolops.workers WHERE id = %s", wid) == [(None,)]
    assert pgq.client().call("echo", {"after": 1}, timeout=30) == {"after": 1}
