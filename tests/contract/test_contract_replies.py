"""Contract: every request gets exactly one reply, and the janitor's
``reap`` removes replies nobody collected by age alone.

Each test runs on every transport (the ``queue`` fixture), driving the
``Transport`` methods directly as the worker, the client and the janitor do.
"""

from __future__ import annotations

import time

from support.contract import Handles, entry_of, make_request, reply, run_record
from support.waiting import wait_for

from spoolops.transport.base import Ages, Claimed


def _answer_a_claimed(h: Handles, worker, rid: str, mark: object) -> None:
    taken = worker.claim(entry_of(worker, rid))
    assert isinstance(taken, Claimed)
    worker.start(rid, run_record(rid), durable=False)
    worker.reply(rid, reply(rid, mark=mark))


def _try_reply(worker, rid: str, mark: object) -> None:
    """A second answer: refused by raising (``OSError``, as ``reply`` says)
    or accepted without effect -- either is the transport's to choose."""
    try:
        worker.reply(rid, reply(rid, mark=mark))
    except OSError:
        pass


def test_exactly_one_reply_collected_once(queue, request) -> None:
    """After ``reply``, ``collect`` returns the reply once (``remove``), then
    None; a second answer for the same id -- from the same worker, or from
    another worker that never held it (a fenced one) -- never replaces or
    duplicates the first."""
    h = Handles(queue, request)
    worker, other = h.worker(), h.worker()
    h.publish(make_request("one-reply"))
    waiter = h.client().expect("one-reply")
    try:
        _answer_a_claimed(h, worker, "one-reply", "first")
        _try_reply(worker, "one-reply", "second")
        _try_reply(other, "one-reply", "fenced")
        assert h.client().collect("one-reply", remove=False)["result"] == {"mark": "first"}
        assert h.client().collect("one-reply")["result"] == {"mark": "first"}
        assert h.client().collect("one-reply") is None
        assert h.client().collect("one-reply", remove=False) is None
    finally:
        waiter.close()
    assert queue.count("replies") == 0
    assert queue.count("running") == 0 and queue.count("queued") == 0


def test_no_second_reply_after_the_first_was_collected(queue, request) -> None:
    """A late duplicate answer, after the client collected the first reply,
    never reaches the client as a second reply.

    On a ``shared`` transport answers are fenced by the claim (several
    workers, one of them late); on the spool a reply needs the claimed
    request or the reply staged for it (a retry after a failure past the
    publishing rename finds neither)."""
    h = Handles(queue, request)
    worker, other = h.worker(), h.worker()
    h.publish(make_request("late-dup"))
    _answer_a_claimed(h, worker, "late-dup", "first")
    assert h.client().collect("late-dup")["result"] == {"mark": "first"}
    _try_reply(worker, "late-dup", "second")
    _try_reply(other, "late-dup", "fenced")
    assert h.client().collect("late-dup") is None


def test_reap_removes_old_replies_only(queue, request) -> None:
    """``reap`` (at an injected ``now``) removes an answered reply older than
    ``reply_ttl`` and keeps a fresher one; a dry run removes nothing."""
    h = Handles(queue, request)
    worker = h.worker()
    h.publish(make_request("reap-old"), make_request("reap-new"))
    _answer_a_claimed(h, worker, "reap-old", "old")
    old_at = _answered_at(worker, "reap-old")
    # the clock must move past the first answer's time (file times are coarse)
    wait_for(lambda: time.time() > old_at + 0.05, what="the clock to move on")
    _answer_a_claimed(h, worker, "reap-new", "new")
    new_at = _answered_at(worker, "reap-new")
    assert new_at > old_at
    ttl = 3600.0
    ages = Ages(tmp_ttl=1e9, reply_ttl=ttl, failed_ttl=1e9, stuck_after=1e9, lock_ttl=1e9)
    now = (old_at + new_at) / 2 + ttl      # the old one is past reply_ttl, the new not

    removals, _ = worker.reap(now, ages, worker_alive=False, dry_run=True)
    assert [r.done for r in removals] == [False]
    assert "reap-old" in removals[0].path and "reap-new" not in removals[0].path
    assert queue.count("replies") == 2

    removals, _ = worker.reap(now, ages, worker_alive=False, dry_run=False)
    assert [r.done for r in removals] == [True]
    assert "reap-old" in removals[0].path
    assert h.client().collect("reap-old") is None
    assert h.client().collect("reap-new")["result"] == {"mark": "new"}
    assert worker.reap(now, ages, worker_alive=False, dry_run=False)[0] == []


def _answered_at(worker, rid: str) -> float:
    """When ``rid`` was answered, as the transport dates its replies."""
    return next(e.mtime for e in worker.entries("replies") if e.id == rid)
