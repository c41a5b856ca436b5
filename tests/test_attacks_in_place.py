"""Attacks on "answered in place" (schema 7, ``AnswersInPlace``): a queued
row's notice on the workers' secret channel ``<channel>_new`` carries the
row itself (``schema.hint_sql`` / ``row_of_hint``), and the worker runs an
instant idempotent request (echo) before claiming it, then claims and
answers it with one UPDATE only if the row is still queued as read.

Each test is made as the party that would make the attack, against a real
server (``pgq``: ``web1`` the victim, ``web2`` the attacker, ``wrk`` the
worker role) and real worker processes:

* a compromised worker account (``wrk``, which may read the channel's
  name) forging notices: hostile payloads, a row that differs from the
  table, a flood;
* a hostile web role: sizes at the limits (max_request_bytes, the notice's
  7,900 bytes), odd text, duplicate keys and past deadlines through
  ``spoolops.submit`` directly, a listener left in an open transaction
  (the NOTIFY queue), what it can hear;
* races and faults: two workers, the in-place UPDATE's answer lost, an
  operator's ``spoolops requeue``; and what must not have changed
  (``"reply": false``, batches);
* a careless operator: ``spoolops init`` migrating the schema under a
  running worker.

The tests marked "was a hole" failed on the code as the review found it
(f404f4c) and pass since the mends; the others document defences that
held.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from support.contract import Handles, answered_in_place, reply
from support.env import WEB, WEB2, WORKER_ROLE, connect_as, make_pg_env
from support.proxy import proxy_for_worker
from support.waiting import wait_for

from spoolops.errors import Timeout
from spoolops.transport.base import Claimed

psycopg = pytest.importorskip("psycopg")

SUBMIT = ("SELECT spoolops.submit(%s, 1, %s, %s::json, %s, %s::timestamptz, %s, %s::json,"
          " %s)")


def submit_sql(conn, rid: str, args: str = "{}", *, op: str = "echo", priority: int = 0,
               deadline: str | None = None, client_submitted: str | None = None,
               client: str | None = None, answer_wanted: bool = True) -> str:
    """A web role's submit as any program of its may call it: ``args`` and
    ``client`` as the JSON text it writes."""
    return conn.execute(SUBMIT, (rid, op, args, priority, deadline, client_submitted, client,
                                 answer_wanted)).fetchone()[0]


def collected(conn, rid: str) -> dict | None:
    """The reply to ``rid`` (kept: a second look sees it again), or None."""
    return conn.execute("SELECT spoolops.collect(%s, false)", (rid,)).fetchone()[0]


def wait_reply(conn, rid: str, timeout: float = 15) -> dict:
    return wait_for(lambda: collected(conn, rid), timeout, what=f"the reply to {rid}")


def new_channel(conn) -> str:
    """The workers' channel's real name: the worker role may read it."""
    return conn.execute("SELECT value FROM spoolops.secrets WHERE key = 'new'").fetchone()[0]


def ends_of(env, rid: str) -> int:
    """How many times the workers' logs say ``rid`` was answered."""
    return len(re.findall(rf"event=end id={re.escape(rid)} ", env.worker_logs()))


# -- a compromised worker account forging notices ------------------------------------

# payloads that start like a row (``[``) and are no row the trigger makes
FORGED = {
    "nested too deep": "[" * 5000,
    "deadline a string": '["f1", "web1", 1, "echo", "{}", 0, "soon", null, null, 0, true]',
    "deadline past year 9999": ('["f2", "web1", 1, "echo", "{}", 0, 300000000000000000,'
                                ' null, null, 0, true]'),
    "deadline NaN": '["f3", "web1", 1, "echo", "{}", 0, NaN, null, null, 0, true]',
}


def test_a_forged_notice_does_not_end_the_worker(pgq) -> None:
    """Was a HOLE: ``row_of_hint`` caught only ValueError/TypeError around
    ``json.loads`` and none of what followed, and ``arrivals`` runs on the
    main loop: one NOTIFY on the workers' channel -- from any role that
    knows its name (the worker role reads it) -- ended every worker
    listening (RecursionError, TypeError, OverflowError, ValueError).  A
    notice that is neither a row nor an id is now ignored."""
    forger = connect_as(pgq, WORKER_ROLE)
    channel = new_channel(forger)
    client = pgq.client(WEB)
    killed = []
    worker = pgq.start_worker()
    try:
        for n, (name, payload) in enumerate(FORGED.items()):
            forger.execute("SELECT pg_notify(%s, %s)", (channel, payload))
            # it reads a notice within ms: a traceback says it ended
            end = time.monotonic() + 1.0
            while "Traceback" not in worker.log_path.read_text() and time.monotonic() < end:
                time.sleep(0.02)
            try:
                answered = "Traceback" not in worker.log_path.read_text() and client.call(
                    "echo", {"after": n}, timeout=5) == {"after": n}
            except Timeout:
                answered = False
            if not answered:
                killed.append(name)
                if worker.poll() is None:
                    pgq.stop_worker(worker)
                worker = pgq.start_worker()
    finally:
        forger.close()
    assert killed == [], f"forged notices ended the worker: {killed}"


def test_a_forged_row_for_anothers_request_answers_nothing_forged(pgq, request) -> None:
    """Defence: a notice (real, on the real channel) that copies web1's
    queued row but changes its args overwrites what the worker read; the
    answer in place then matches nothing, and the row stays queued for the
    usual claim -- nobody is answered with the forged args."""
    h = Handles(pgq, request)
    worker = h.worker()                     # holds the lock: listens on the channel
    victim = connect_as(pgq, WEB)
    submit_sql(victim, "victim-1", '{"pay": 10}')
    real = pgq.sql(
        "SELECT json_build_array(id, submitter, version, op, args::text, priority, NULL,"
        " client_submitted, client::text, (extract(epoch FROM submitted) * 1000000)::bigint,"
        " answer_wanted)::text FROM spoolops.requests WHERE id = 'victim-1'")[0][0]
    forged = real.replace('{\\"pay\\": 10}', '{\\"pay\\": 99999}')
    assert forged != real
    wait_for(lambda: "victim-1" in (worker.arrivals() or []), 5, what="the real notice")
    forger = connect_as(pgq, WORKER_ROLE)
    forger.execute("SELECT pg_notify(%s, %s)", (new_channel(forger), forged))
    forger.close()
    wait_for(lambda: "victim-1" in (worker.arrivals() or []), 5, what="the forged notice")
    seen = worker.read_ahead("victim-1")
    assert isinstance(seen, Claimed) and b"99999" in seen.data
    assert answered_in_place(worker, seen, reply("victim-1", op="echo", mark="forged")) is False
    assert pgq.sql("SELECT state FROM spoolops.requests WHERE id = 'victim-1'") == [("queued",)]
    victim.close()


def test_a_flood_of_forged_rows_neither_ends_nor_stalls_the_worker(pgq) -> None:
    """Defence: 3000 well-formed forged rows (ids nobody holds, the top
    priority) each cost the worker a run of echo and an UPDATE that
    matches nothing; it stays up and a real call is still answered."""
    worker = pgq.start_worker()
    forger = connect_as(pgq, WORKER_ROLE)
    channel = new_channel(forger)
    now = int(time.time() * 1e6)
    with forger.transaction():
        for i in range(3000):
            forger.execute("SELECT pg_notify(%s, %s)", (channel, json.dumps(
                [f"flood-{i}", WEB, 1, "echo", "{}", 1000000, None, None, None, now, True])))
    forger.close()
    start = time.monotonic()
    assert pgq.client(WEB).call("echo", {"real": 1}, timeout=20) == {"real": 1}
    took = time.monotonic() - start
    assert worker.poll() is None and took < 20, took


# -- a hostile web role: sizes, text, keys, deadlines ---------------------------------

def test_a_request_over_max_request_bytes_is_refused_whichever_way_it_is_read(pgq) -> None:
    """Was a HOLE: the worker checked the request document against
    max_request_bytes only when it claimed (``PgTransport._took``);
    ``submit`` counts the columns plus 128 bytes, less than the document
    (keys, a deadline, JSON escapes).  A request at submit's limit is
    refused (BadRequest) when the worker claims it -- and answered OK when
    the worker read it from its scan (queued before it started, or at a
    rescan) and answered it in place.  Escapes in ``client_submitted``
    (a control character: 6 bytes in the document) make the document up
    to ~6x max_request_bytes.  ``read_ahead`` now offers nothing the claim
    would refuse."""
    limit = pgq.config.max_request_bytes
    web = connect_as(pgq, WEB)
    fixed = {"op": "echo", "priority": -1000000, "deadline": "2999-01-01T00:00:00.123456Z",
             "client_submitted": "2026", "client": "{}"}
    # submit's count: 128 + id + op + args + client + client_submitted
    pad = limit - 128 - len("edge-early") - 4 - len('{"pad": ""}') - 2 - 4

    def args() -> str:
        return json.dumps({"pad": "x" * pad})
    assert submit_sql(web, "edge-early", args(), **fixed) == "queued"   # no worker yet
    scan = pgq.transport()
    scan.scan()
    seen = scan.peek("edge-early")
    assert seen is not None and len(seen.data) > limit, (len(seen.data), limit)
    assert scan.read_ahead("edge-early") is None      # nothing the claim would refuse
    pgq.start_worker()
    assert submit_sql(web, "edge-late0", args(), **fixed) == "queued"   # worker running
    early, late = wait_reply(web, "edge-early"), wait_reply(web, "edge-late0")
    web.close()
    kinds = {"claimed": (late["ok"], (late["error"] or {}).get("type")),
             "read ahead": (early["ok"], (early["error"] or {}).get("type"))}
    assert kinds == {"claimed": (False, "BadRequest"), "read ahead": (False, "BadRequest")}


def test_odd_requests_through_submit_get_their_one_answer(pgq) -> None:
    """Defence: through ``spoolops.submit`` directly -- a deadline long
    past, duplicate keys (args and client), text a notice must carry
    exactly (quotes, backslashes, control characters, U+2028, astral
    characters, escapes as written), ``"reply": false``, a batch, and
    bodies whose notice is exactly 7,900 bytes (the row) and one more
    (its id); an id shaped like a row is refused -- each gets the answer
    the usual claim would give, once."""
    listener = psycopg.connect(pgq.cluster.dsn(pgq.dbname, "postgres"), autocommit=True)
    listener.execute("SELECT spoolops.listen('new')")       # a superuser may: to look
    web = connect_as(pgq, WEB)
    pgq.start_worker()
    odd_text = 'q"b\\s/\x01\x1f\u2028\U0001F600é\t'
    cases = {
        "past": {"args": '{"a": 1}', "deadline": "2001-01-01T00:00:00Z"},
        "dupargs": {"args": '{"a": 1, "a": 2}'},
        "dupclient": {"args": '{"a": 1}', "client": '{"pid": 1, "pid": 2}'},
        "oddtext": {"args": json.dumps({"s": odd_text, "u": "\\u00e9"}, ensure_ascii=False)
                    .replace('"\\\\u00e9"', '"\\u00e9"'),
                    "client_submitted": odd_text, "client": '{"h": "\\u2028 \\"x\\""}'},
        "batched": {"args": '{"batch": "b-1", "a": 1}'},
    }
    for rid, fields in cases.items():
        assert submit_sql(web, rid, **fields) == "queued"
    # an id that reads as a row (its notice would be the id alone) is no id
    with pytest.raises(psycopg.errors.CheckViolation):
        submit_sql(web, '["f", "web2", 1, "echo", "{}", 0, null, null, null, 0, true]')
    got = {rid: wait_reply(web, rid) for rid in cases}
    outcome = {rid: (r["ok"], (r["error"] or {}).get("type")) for rid, r in got.items()}
    assert outcome == {"past": (False, "Expired"), "dupargs": (False, "BadRequest"),
                       "dupclient": (False, "BadRequest"), "oddtext": (True, None),
                       "batched": (True, None)}
    assert got["oddtext"]["result"] == {"s": odd_text, "u": "é"}
    assert "b-1" not in pgq.client(WEB).pending_batches()
    # fire and forget: removed, no reply
    assert submit_sql(web, "noreply", '{"a": 1}', answer_wanted=False) == "queued"
    wait_for(lambda: not pgq.sql("SELECT 1 FROM spoolops.requests WHERE id = 'noreply'"), 10,
             what="the fire-and-forget request removed")
    # the notice's limit: find the body whose row is exactly HINT_BYTES
    from spoolops.transport.pg.schema import HINT_BYTES
    payloads: dict[str, str] = {}

    def drain() -> None:
        for note in listener.notifies(timeout=0.5, stop_after=50):
            rid = json.loads(note.payload)[0] if note.payload.startswith("[") else note.payload
            payloads[rid] = note.payload
    drain()
    probe = submit_sql(web, "size-probe", json.dumps({"p": ""}))
    assert probe == "queued"
    wait_reply(web, "size-probe")
    drain()
    base = len(payloads["size-probe"].encode()) - len("size-probe")
    for rid, extra in (("size-at", 0), ("size-over", 1)):
        pad = HINT_BYTES - base - len(rid) + extra
        assert submit_sql(web, rid, json.dumps({"p": "x" * pad})) == "queued"
        assert wait_reply(web, rid)["result"] == {"p": "x" * pad}
    drain()
    assert len(payloads["size-at"].encode()) == HINT_BYTES
    assert payloads["size-over"] == "size-over"
    listener.close()
    web.close()
    for rid in (*cases, "size-at", "size-over"):
        assert ends_of(pgq, rid) <= 1, rid
    assert pgq.sql("SELECT count(*) FROM spoolops.requests WHERE state <> 'answered'") == [(0,)]


def test_a_listener_left_in_a_transaction_gains_little_per_request(pgq) -> None:
    """Was a HOLE (availability, and a size side channel): NOTIFY's queue
    is one per cluster (8 GB), and it cannot be trimmed past a listening
    session that stays in a transaction -- any role may LISTEN on any name
    and leave a transaction open.  With ids for payloads a request cost
    the queue ~100 bytes; with the row in the notice up to 7,900, so a web
    role pinning the queue filled it (every NOTIFY then fails: every
    submit and every answer in the cluster) ~50x sooner, and watching
    ``pg_notification_queue_usage()`` learnt the sizes of other roles'
    requests.  A notice now carries a row only up to 1,000 bytes (an
    instant op's request is small)."""
    pgq.start_worker()
    pin = connect_as(pgq, WEB2)
    pin.execute("SET idle_in_transaction_session_timeout = 0")
    pin.execute("LISTEN anything_at_all")
    pin.execute("BEGIN")
    pin.execute("SELECT 1")
    web = connect_as(pgq, WEB)
    try:
        before = pin.execute("SELECT pg_notification_queue_usage()").fetchone()[0]
        n = 60
        for i in range(n):
            submit_sql(web, f"pinned-{i}", json.dumps({"p": "x" * 7700}))
        wait_for(lambda: pgq.sql("SELECT count(*) FROM spoolops.requests WHERE state ="
                                 " 'answered'") == [(n,)], 20, what="all answered")
        after = pin.execute("SELECT pg_notification_queue_usage()").fetchone()[0]
    finally:
        pin.execute("ROLLBACK")
        pin.close()
        web.close()
    # the queue is 2^20 pages of 8 kB when full
    per_request = (after - before) * 2**20 * 8192 / n
    assert per_request < 1024, f"{per_request:.0f} bytes of the NOTIFY queue per request"


def test_no_web_role_hears_a_request_body(pgq) -> None:
    """Defence: web2 may not LISTEN on the workers' channel, and what it
    may hear -- its own reply channel -- carries no body of web1's."""
    pgq.start_worker()
    spy = connect_as(pgq, WEB2)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        spy.execute("SELECT spoolops.listen('new')")
    spy.execute("SELECT spoolops.listen('reply')")
    assert pgq.client(WEB).call("echo", {"secret": "s3cret-body"}, timeout=10) \
        == {"secret": "s3cret-body"}
    heard = [n.payload for n in spy.notifies(timeout=0.5, stop_after=100)]
    spy.close()
    assert not any("s3cret" in p for p in heard), heard


# -- races and faults ------------------------------------------------------------------

def second_host(env) -> Path:
    """A worker configuration of another host (its own folder), same database."""
    other = env.base / "b.conf"
    other.write_text(env.config_path.read_text().replace("root = spool", "root = spool-b"))
    os.makedirs(env.base / "spool-b" / "work" / "locks", exist_ok=True)
    return other


def test_two_workers_hearing_every_notice_answer_each_echo_once(pgq) -> None:
    """Defence: two workers both read every notice and race to answer in
    place; each request is answered by one of them, once (one end line
    across both logs, attempt 1)."""
    pgq.start_worker()
    pgq.start_worker(SPOOLOPS_CONFIG=str(second_host(pgq)))
    web = connect_as(pgq, WEB)
    ids = [f"race-{i:03d}" for i in range(80)]
    for i, rid in enumerate(ids):
        submit_sql(web, rid, json.dumps({"i": i}))
    web.close()
    wait_for(lambda: pgq.sql("SELECT count(*) FROM spoolops.requests WHERE state ="
                             " 'answered'") == [(len(ids),)], 20, what="all answered")
    rows = pgq.sql("SELECT id, attempt, reply->'result' FROM spoolops.requests ORDER BY id")
    assert [(r[0], r[1], r[2]) for r in rows] == [(rid, 1, {"i": i})
                                                  for i, rid in enumerate(ids)]
    assert {rid: ends_of(pgq, rid) for rid in ids} == {rid: 1 for rid in ids}


def test_a_lost_answer_to_the_in_place_update_leaves_one_reply(pg_cluster,
                                                                tmp_path: Path) -> None:
    """Defence: the connection is cut right after the in-place UPDATE
    committed, before its answer reaches the worker (a proxy in front of
    the worker only).  The worker asks, once the server answers again, which
    rows its statement answered: this one, logged and counted once; the
    request has its one reply; the worker serves on."""
    env = make_pg_env(pg_cluster, tmp_path / "q")
    proxy = proxy_for_worker(env, pg_cluster, tmp_path / "proxy")
    try:
        worker = env.start_worker()
        web = connect_as(env, WEB)
        # the worker's UPDATE carries these args: the proxy cuts after it
        submit_sql(web, "lost-1", '{"lose_submit": 1}')
        got = wait_reply(web, "lost-1")
        assert got["result"] == {"lose_submit": 1}
        # the worker learns, once the server answers again, that its answer
        # went in: counted and logged as served, once
        log = env.wait_log(worker, "event=end id=lost-1")
        assert proxy.cut["submit"] == 1
        assert log.count("event=end id=lost-1 ") == 1 and "answer_in_place_failed" not in log
        assert env.client(WEB).call("echo", {"after": 1}, timeout=10) == {"after": 1}
        wait_for(env.quiet, what="nothing queued or running")
        assert env.sql("SELECT state, attempt FROM spoolops.requests WHERE id = 'lost-1'") \
            == [("answered", 1)]
        assert collected(web, "lost-1")["result"] == {"lose_submit": 1}
        web.close()
    finally:
        proxy.stop()
        env.close()


def test_an_operator_requeue_of_a_failed_echo_answers_it_once(pgq) -> None:
    """Defence: ``spoolops requeue`` (the operator) puts a failed echo back;
    its notice carries the row again and it is answered in place, once,
    its old reply gone."""
    web = connect_as(pgq, WEB)
    submit_sql(web, "requeued-1", '{"again": true}')
    pgq.sql("UPDATE spoolops.requests SET state = 'failed', reply = '{\"ok\": false}',"
            " reason = 'test', finished = clock_timestamp(), attempt = 3"
            " WHERE id = 'requeued-1'")
    worker = pgq.start_worker()
    done = pgq.spoolops("requeue", "requeued-1")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: pgq.sql("SELECT state FROM spoolops.requests WHERE id = 'requeued-1'")
             == [("answered",)], 10, what="answered again")
    assert collected(web, "requeued-1")["result"] == {"again": True}
    assert pgq.sql("SELECT attempt FROM spoolops.requests WHERE id = 'requeued-1'") == [(4,)]
    assert ends_of(pgq, "requeued-1") == 1 and worker.poll() is None
    web.close()


def test_a_request_withdrawn_and_resubmitted_after_the_read_is_not_answered_from_it(
        pgq, request) -> None:
    """Defence: read from its notice, withdrawn, submitted again (other
    args, same id): the old read answers nothing; the new row is untouched."""
    h = Handles(pgq, request)
    worker = h.worker()
    web = connect_as(pgq, WEB)
    submit_sql(web, "again-1", '{"v": 1}')
    wait_for(lambda: "again-1" in (worker.arrivals() or []), 5, what="its notice")
    seen = worker.read_ahead("again-1")
    assert seen is not None
    assert web.execute("SELECT spoolops.cancel('again-1')").fetchone()[0] is True
    submit_sql(web, "again-1", '{"v": 2}')
    assert answered_in_place(worker, seen, reply("again-1", op="echo", mark="old")) is False
    assert pgq.sql("SELECT state, args::text FROM spoolops.requests WHERE id = 'again-1'") \
        == [("queued", '{"v": 2}')]
    web.close()


# -- a careless operator: the schema migrated under a running worker -------------------

def test_a_worker_running_when_init_migrates_the_schema_stops(pgq) -> None:
    """Was a HOLE (upgrade): the schema version kept an older worker from
    *starting* on schema 7, but one already running when ``spoolops init``
    migrated the database (the README's upgrade step; another host's worker
    not yet upgraded) went on serving by its old rules -- taking every
    notice's row for an id, it answered each request only at its next
    rescan.  ``init`` now fences the registered workers whenever it
    migrates: each stops at its next heartbeat (status 75), and only a
    worker of the new version can start.  Here the running worker is made
    "older" by setting the recorded version back, and ``init`` migrates."""
    from spoolops.admin import init_tree, resolve_accounts
    worker = pgq.start_worker()
    pgq.client(WEB).call("echo", {"before": 1}, timeout=10)
    pgq.sql("UPDATE spoolops.meta SET value = '6' WHERE key = 'schema_version'")
    changes = init_tree(pgq.config, resolve_accounts(pgq.config),
                        admin_dsn=pgq.cluster.dsn(pgq.dbname, "postgres"),
                        web_logins=[WEB, WEB2], worker_logins=[WORKER_ROLE])
    assert any("fenced 1 worker" in line for line in changes), changes
    assert worker.wait(15) == 75, worker.log_path.read_text()[-2000:]
    assert "event=worker_fenced_self" in worker.log_path.read_text()
    pgq.start_worker()
    assert pgq.client(WEB).call("echo", {"after": 1}, timeout=10) == {"after": 1}
