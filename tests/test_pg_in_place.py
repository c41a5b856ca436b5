"""PostgreSQL: an instant idempotent request claimed and answered in one
statement (``AnswersInPlace``; issue 22).

The worker reads a queued row from its notice (or its scan), runs the
instant op before any claim, and one UPDATE answers it only if the row is
still queued exactly as read -- not withdrawn, not claimed by another
worker, not changed, not locked by a web role's open transaction -- and
this worker is not fenced; otherwise nothing changes and the request is
claimed the usual way.  Driven through the transport as the worker drives
it, and end to end with a proxy that counts the worker's claims.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from support.contract import (
    Handles,
    answered_in_place,
    claimed_ids,
    make_request,
    reply,
)
from support.env import WEB, WEB2, connect_as, make_pg_env
from support.proxy import proxy_for_worker
from support.waiting import wait_for

from spoolops.transport.base import AnswersInPlace, Claimed


def _read(worker, rid: str) -> Claimed:
    """``rid`` as ``worker`` read it, its scan having read it whole."""
    worker.scan()
    seen = worker.read_ahead(rid)
    assert isinstance(seen, Claimed) and seen.rid == rid
    return seen


def test_one_statement_answers_a_queued_request_once(pgq, request) -> None:
    h = Handles(pgq, request)
    h.publish(make_request("ip-1", op="echo", args={"n": 1}))
    worker = h.worker()
    assert isinstance(worker, AnswersInPlace)
    seen = _read(worker, "ip-1")
    assert answered_in_place(worker, seen, reply("ip-1", op="echo", mark="in place")) is True
    assert pgq.count("queued") == 0 and pgq.count("running") == 0
    row = pgq.sql("SELECT state, attempt, claimed_by IS NOT NULL FROM spoolops.requests"
                  " WHERE id = 'ip-1'")
    assert row == [("answered", 1, True)]
    # the read is spent: a second answer changes nothing
    assert answered_in_place(worker, seen, reply("ip-1", op="echo", mark="again")) is False
    got = h.client().collect("ip-1")
    assert got is not None and got["result"] == {"mark": "in place"}


def test_a_withdrawn_request_is_not_answered_in_place(pgq, request) -> None:
    h = Handles(pgq, request)
    h.publish(make_request("ip-gone", op="echo"))
    worker = h.worker()
    seen = _read(worker, "ip-gone")
    assert h.client().withdraw("ip-gone") is True
    assert answered_in_place(worker, seen, reply("ip-gone", op="echo")) is False
    assert pgq.sql("SELECT count(*) FROM spoolops.requests") == [(0,)]


def test_a_request_another_worker_claimed_is_not_answered_in_place(pgq, request) -> None:
    h = Handles(pgq, request)
    h.publish(make_request("ip-taken", op="echo"))
    first, second = h.worker(), h.worker()
    seen = _read(first, "ip-taken")
    second.scan()
    assert claimed_ids(second.claim_all(["ip-taken"])) == ["ip-taken"]
    assert answered_in_place(first, seen, reply("ip-taken", op="echo", mark="first")) is False
    second.reply("ip-taken", reply("ip-taken", op="echo", mark="second"), started=False)
    got = h.client().collect("ip-taken")
    assert got is not None and got["result"] == {"mark": "second"}


def test_a_read_that_does_not_match_the_row_changes_nothing(pgq, request) -> None:
    """A read the worker does not hold, or one whose bytes or sender differ
    from what it read (what a forged notice would give), answers nothing."""
    h = Handles(pgq, request)
    h.publish(make_request("ip-real", op="echo", args={"real": True}))
    worker = h.worker()
    seen = _read(worker, "ip-real")
    forged = dataclasses.replace(seen, data=seen.data.replace(b'"real": true',
                                                              b'"real": false'))
    assert forged.data != seen.data
    assert answered_in_place(worker, forged, reply("ip-real", op="echo")) is False
    seen = _read(worker, "ip-real")
    other = dataclasses.replace(seen, user=WEB2)
    assert answered_in_place(worker, other, reply("ip-real", op="echo")) is False
    never_read = dataclasses.replace(seen, entry="ip-never", rid="ip-never")
    assert answered_in_place(worker, never_read, reply("ip-never", op="echo")) is False
    assert pgq.count("queued") == 1
    # the row changed under the read (an operator's UPDATE as the owner): not
    # answered with what the worker read
    seen = _read(worker, "ip-real")
    pgq.sql("UPDATE spoolops.requests SET args = '{\"real\": 0}' WHERE id = 'ip-real'")
    assert answered_in_place(worker, seen, reply("ip-real", op="echo")) is False
    assert pgq.count("queued") == 1


def test_a_fenced_worker_answers_nothing_in_place(pgq, request) -> None:
    """Alone (one read: its own statement) or a batch."""
    h = Handles(pgq, request)
    h.publish(*(make_request(rid, op="echo") for rid in ("ip-fenced", "ipf-1", "ipf-2")))
    worker = h.worker()
    reads = _read_all(worker)
    pgq.sql("UPDATE spoolops.workers SET fenced_at = clock_timestamp()")
    assert answered_in_place(worker, reads["ip-fenced"], reply("ip-fenced", op="echo")) \
        is False
    assert worker.answer_queued([(reads[rid], reply(rid, op="echo"))
                                 for rid in ("ipf-1", "ipf-2")]) == set()
    assert pgq.count("queued") == 3


def test_a_row_a_web_role_holds_locked_is_skipped_not_waited_for(pgq, request) -> None:
    """The worker's main loop must never wait on a web role's lock: the
    answer skips the row (the claim, later, skips it too)."""
    h = Handles(pgq, request)
    h.publish(make_request("ip-held", op="echo"))
    worker = h.worker()
    seen = _read(worker, "ip-held")
    holder = connect_as(pgq, WEB)
    try:
        holder.execute("BEGIN")
        assert holder.execute("SELECT spoolops.cancel('ip-held')").fetchone()[0] is True
        done: list[bool] = []
        answering = threading.Thread(target=lambda: done.append(
            answered_in_place(worker, seen, reply("ip-held", op="echo"))))
        answering.start()
        answering.join(5)
        assert done == [False], "the answer waited on the web role's lock"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert pgq.count("queued") == 1


@pytest.mark.parametrize("chunk", [1, 8], ids=["alone", "batches"])
def test_two_workers_racing_answers_in_place_answer_each_request_once(pgq, request,
                                                                      chunk: int) -> None:
    """Reads answered one at a time (each its own statement) or in batches,
    two workers in opposite orders: each request answered once."""
    h = Handles(pgq, request)
    ids = [f"ip-race-{i:02d}" for i in range(48)]
    h.publish(*(make_request(rid, op="echo", args={"i": i}) for i, rid in enumerate(ids)))
    workers = [h.worker(), h.worker()]
    reads = [_read_all(w) for w in workers]
    assert all(sorted(r) == ids for r in reads)
    barrier = threading.Barrier(2)
    won: list[set[str]] = [set(), set()]

    def answer(i: int, order: list[str]) -> None:
        barrier.wait(10)
        for first in range(0, len(order), chunk):
            won[i] |= workers[i].answer_queued(
                [(reads[i][rid], reply(rid, op="echo", mark=i))
                 for rid in order[first:first + chunk]])
    threads = [threading.Thread(target=answer, args=(0, ids)),
               threading.Thread(target=answer, args=(1, ids[::-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not won[0] & won[1], sorted(won[0] & won[1])
    assert sorted(won[0] | won[1]) == ids
    assert pgq.sql("SELECT count(*) FROM spoolops.requests WHERE state = 'answered'"
                   " AND attempt = 1") == [(48,)]


def test_one_statement_answers_the_reads_that_match_and_nothing_else(pgq, request) -> None:
    """A batch: the reads still queued as read are answered, in one
    transaction; one withdrawn, one another worker claimed, one forged and
    one never read change nothing and come back unanswered."""
    h = Handles(pgq, request)
    ids = ["ipb-ok-1", "ipb-gone", "ipb-taken", "ipb-forged", "ipb-ok-2"]
    h.publish(*(make_request(rid, op="echo") for rid in ids))
    worker, other = h.worker(), h.worker()
    reads = _read_all(worker)
    assert h.client().withdraw("ipb-gone") is True
    other.scan()
    assert claimed_ids(other.claim_all(["ipb-taken"])) == ["ipb-taken"]
    forged = dataclasses.replace(reads["ipb-forged"], user=WEB2)
    never = dataclasses.replace(reads["ipb-ok-1"], entry="ipb-never", rid="ipb-never")
    batch = [(reads["ipb-ok-1"], reply("ipb-ok-1", op="echo", mark=1)),
             (reads["ipb-gone"], reply("ipb-gone", op="echo")),
             (reads["ipb-taken"], reply("ipb-taken", op="echo")),
             (forged, reply("ipb-forged", op="echo")),
             (never, reply("ipb-never", op="echo")),
             (reads["ipb-ok-2"], reply("ipb-ok-2", op="echo", mark=2))]
    assert worker.answer_queued(batch) == {"ipb-ok-1", "ipb-ok-2"}
    rows = pgq.sql("SELECT id, state, attempt, xmin::text FROM spoolops.requests ORDER BY id")
    states = {rid: (state, attempt) for rid, state, attempt, _ in rows}
    assert states == {"ipb-forged": ("queued", 0), "ipb-ok-1": ("answered", 1),
                      "ipb-ok-2": ("answered", 1), "ipb-taken": ("running", 1)}
    assert len({xmin for rid, _, _, xmin in rows if rid.startswith("ipb-ok")}) == 1, rows
    client = h.client()
    assert [client.collect(rid)["result"] for rid in ("ipb-ok-1", "ipb-ok-2")] == [
        {"mark": 1}, {"mark": 2}]


def test_a_reply_the_database_refuses_sends_its_whole_batch_to_the_claim(pgq,
                                                                          request) -> None:
    """One reply PostgreSQL cannot store (a lone surrogate in JSON text)
    fails the statement: nothing of the batch is answered, and each is
    claimed the usual way, where that reply becomes an error reply."""
    h = Handles(pgq, request)
    h.publish(make_request("ipr-ok", op="echo"), make_request("ipr-bad", op="echo"))
    worker = h.worker()
    reads = _read_all(worker)
    assert worker.answer_queued([(reads["ipr-ok"], reply("ipr-ok", op="echo")),
                                 (reads["ipr-bad"], reply("ipr-bad", op="echo",
                                                          mark="\ud800"))]) == set()
    assert pgq.count("queued") == 2
    reads = _read_all(worker)             # alone, the same
    assert answered_in_place(worker, reads["ipr-bad"], reply("ipr-bad", op="echo",
                                                             mark="\ud800")) is False
    assert pgq.count("queued") == 2


def test_a_backlog_of_echoes_is_answered_a_batch_at_a_time(pg_cluster, tmp_path: Path) -> None:
    """Queued while no worker runs, then drained: every request answered
    once, by far fewer transactions than requests (rows one statement
    answers share its transaction id), and none claimed on its own."""
    env = make_pg_env(pg_cluster, tmp_path / "q")
    try:
        client = env.client()
        ids = [client.submit("echo", {"i": i}) for i in range(200)]
        env.start_worker()
        wait_for(env.quiet, timeout=60, what="the backlog drained")
        rows = env.sql("SELECT state, attempt, xmin::text FROM spoolops.requests")
        assert len(rows) == 200 and {(s, a) for s, a, _ in rows} == {("answered", 1)}
        transactions = len({xmin for _, _, xmin in rows})
        assert transactions <= 20, f"{transactions} transactions answered 200 requests"
        assert [client.wait(rid, timeout=10).result["i"] for rid in ids] == list(range(200))
    finally:
        env.close()


def _read_all(worker) -> dict[str, Claimed]:
    """Every queued request as ``worker``'s scan read it, by entry."""
    return {entry: seen for entry in worker.scan()
            if (seen := worker.read_ahead(entry)) is not None}


def test_the_worker_claims_no_instant_request_and_every_other_one(pg_cluster,
                                                                  tmp_path: Path) -> None:
    """End to end: a proxy between the worker and the server counts its
    claims.  Echo calls -- small ones, whose notice carries the row, and
    one too large for a notice -- are answered, the small ones without a
    claim; a non-instant op is claimed as before (the count can move)."""
    env = make_pg_env(pg_cluster, tmp_path / "q")
    proxy = proxy_for_worker(env, pg_cluster, tmp_path / "proxy")
    try:
        env.start_worker()
        client = env.client()
        for i in range(20):
            assert client.call("echo", {"i": i}, timeout=10) == {"i": i}
        # text the notice must carry exactly: quotes, escapes, line separators
        odd = {"s": 'é\u2028"\\\t{[', "nested": {"k": [1.5, None, True]}, "n": 10**18}
        assert client.call("echo", odd, timeout=10) == odd
        assert proxy.statements["claim_batch"] == 0, proxy.statements
        big = {"blob": "x" * 9000}
        assert client.call("echo", big, timeout=10) == big
        claims = proxy.statements["claim_batch"]
        assert claims >= 1, "a request whose notice names its id only is claimed"
        for i in range(3):
            assert client.call("sleep", {"seconds": 0, "tag": str(i)}, timeout=10)["tag"] \
                == str(i)
        # (psycopg prepares a statement run five times on a connection: later
        # runs send no text, so the count says at least, not how many)
        assert proxy.statements["claim_batch"] > claims, proxy.statements
        wait_for(env.quiet, what="nothing left queued or running")
    finally:
        proxy.stop()
        env.close()
