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

from support.contract import Handles, claimed_ids, make_request, reply
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
    assert worker.answer_queued(seen, reply("ip-1", op="echo", mark="in place")) is True
    assert pgq.count("queued") == 0 and pgq.count("running") == 0
    row = pgq.sql("SELECT state, attempt, claimed_by IS NOT NULL FROM spoolops.requests"
                  " WHERE id = 'ip-1'")
    assert row == [("answered", 1, True)]
    # the read is spent: a second answer changes nothing
    assert worker.answer_queued(seen, reply("ip-1", op="echo", mark="again")) is False
    got = h.client().collect("ip-1")
    assert got is not None and got["result"] == {"mark": "in place"}


def test_a_withdrawn_request_is_not_answered_in_place(pgq, request) -> None:
    h = Handles(pgq, request)
    h.publish(make_request("ip-gone", op="echo"))
    worker = h.worker()
    seen = _read(worker, "ip-gone")
    assert h.client().withdraw("ip-gone") is True
    assert worker.answer_queued(seen, reply("ip-gone", op="echo")) is False
    assert pgq.sql("SELECT count(*) FROM spoolops.requests") == [(0,)]


def test_a_request_another_worker_claimed_is_not_answered_in_place(pgq, request) -> None:
    h = Handles(pgq, request)
    h.publish(make_request("ip-taken", op="echo"))
    first, second = h.worker(), h.worker()
    seen = _read(first, "ip-taken")
    second.scan()
    assert claimed_ids(second.claim_all(["ip-taken"])) == ["ip-taken"]
    assert first.answer_queued(seen, reply("ip-taken", op="echo", mark="first")) is False
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
    assert worker.answer_queued(forged, reply("ip-real", op="echo")) is False
    seen = _read(worker, "ip-real")
    other = dataclasses.replace(seen, user=WEB2)
    assert worker.answer_queued(other, reply("ip-real", op="echo")) is False
    never_read = dataclasses.replace(seen, entry="ip-never", rid="ip-never")
    assert worker.answer_queued(never_read, reply("ip-never", op="echo")) is False
    assert pgq.count("queued") == 1
    # the row changed under the read (an operator's UPDATE as the owner): not
    # answered with what the worker read
    seen = _read(worker, "ip-real")
    pgq.sql("UPDATE spoolops.requests SET args = '{\"real\": 0}' WHERE id = 'ip-real'")
    assert worker.answer_queued(seen, reply("ip-real", op="echo")) is False
    assert pgq.count("queued") == 1


def test_a_fenced_worker_answers_nothing_in_place(pgq, request) -> None:
    h = Handles(pgq, request)
    h.publish(make_request("ip-fenced", op="echo"))
    worker = h.worker()
    seen = _read(worker, "ip-fenced")
    pgq.sql("UPDATE spoolops.workers SET fenced_at = clock_timestamp()")
    assert worker.answer_queued(seen, reply("ip-fenced", op="echo")) is False
    assert pgq.count("queued") == 1


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
            worker.answer_queued(seen, reply("ip-held", op="echo"))))
        answering.start()
        answering.join(5)
        assert done == [False], "the answer waited on the web role's lock"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert pgq.count("queued") == 1


def test_two_workers_racing_answers_in_place_answer_each_request_once(pgq, request) -> None:
    h = Handles(pgq, request)
    ids = [f"ip-race-{i:02d}" for i in range(40)]
    h.publish(*(make_request(rid, op="echo", args={"i": i}) for i, rid in enumerate(ids)))
    workers = [h.worker(), h.worker()]
    reads = [_read_all(w) for w in workers]
    assert all(sorted(r) == ids for r in reads)
    barrier = threading.Barrier(2)
    won: list[list[str]] = [[], []]

    def answer(i: int, order: list[str]) -> None:
        barrier.wait(10)
        for rid in order:
            if workers[i].answer_queued(reads[i][rid], reply(rid, op="echo", mark=i)):
                won[i].append(rid)
    threads = [threading.Thread(target=answer, args=(0, ids)),
               threading.Thread(target=answer, args=(1, ids[::-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not set(won[0]) & set(won[1]), sorted(set(won[0]) & set(won[1]))
    assert sorted(won[0] + won[1]) == ids
    assert pgq.sql("SELECT count(*) FROM spoolops.requests WHERE state = 'answered'"
                   " AND attempt = 1") == [(40,)]


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
