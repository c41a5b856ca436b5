"""Contract: claims are exclusive, a withdrawal and a claim exclude each
other, ``put_back`` keeps a request's place, ``lease`` holds targets
across workers.

Each test runs on every transport (the ``queue`` fixture), driving the
``Transport`` methods directly as the worker and the client do.
"""

from __future__ import annotations

import random
import threading

import pytest
from support.contract import (
    Handles,
    claimed_ids,
    entry_of,
    make_request,
    reply,
    run_record,
)

from spoolops.errors import WorkerRunning
from spoolops.transport.base import Claimed, SharedQueue


def _race(*jobs):
    """Run ``jobs`` at once (a barrier before each); their results in order."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(i, job):
        try:
            barrier.wait(10)
            results[i] = job()
        except BaseException as exc:   # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def test_claim_is_exclusive_between_two_workers(queue, request) -> None:
    """Two workers racing ``claim_all`` over the same 50 entries get disjoint
    sets whose union is all 50: no request is claimed twice, none lost."""
    h = Handles(queue, request)
    ids = [f"race-{i:02d}" for i in range(50)]
    h.publish(*map(make_request, ids))
    workers = [h.worker(), h.worker()]
    entries = workers[0].scan()
    assert len(entries) == 50

    def claimer(worker, order):
        def job():
            got = []
            for i in range(0, len(order), 7):     # several rounds, each a batch
                got += claimed_ids(worker.claim_all(order[i:i + 7]))
            return got
        return job

    forward = list(entries)
    backward = list(reversed(entries))
    random.Random(21).shuffle(forward)
    first, second = _race(claimer(workers[0], forward), claimer(workers[1], backward))
    assert len(first) == len(set(first)) and len(second) == len(set(second))
    assert not set(first) & set(second), sorted(set(first) & set(second))
    assert sorted(first + second) == ids
    assert queue.count("running") == 50 and queue.count("queued") == 0


def test_withdrawn_before_claim_is_never_claimed(queue, request) -> None:
    """A request withdrawn while queued is never claimed (nor answered); one
    claimed cannot be withdrawn by its client, and still gets its one reply."""
    h = Handles(queue, request)
    worker = h.worker()
    h.publish(make_request("wd-gone"), make_request("wd-kept"))
    gone, kept = entry_of(worker, "wd-gone"), entry_of(worker, "wd-kept")
    assert h.client().withdraw("wd-gone") is True
    taken = worker.claim_all([gone, kept])
    assert taken[0] is None
    assert isinstance(taken[1], Claimed) and taken[1].rid == "wd-kept"
    assert worker.claim(gone) is None
    assert worker.describe("wd-gone") is None
    # claimed: its client can no longer take it back
    assert h.client().withdraw("wd-kept") is False
    worker.start("wd-kept", run_record("wd-kept"), durable=False)
    worker.reply("wd-kept", reply("wd-kept", mark="kept"))
    got = h.client().collect("wd-kept")
    assert got is not None and got["result"] == {"mark": "kept"}
    assert h.client().collect("wd-kept") is None
    assert h.client().collect("wd-gone") is None


def test_withdraw_racing_claim_exactly_one_wins(queue, request) -> None:
    """A client withdrawing 30 requests while a worker claims them: each one
    is either withdrawn (True) or claimed, never both, never neither."""
    h = Handles(queue, request)
    worker = h.worker()
    client = h.client()
    ids = [f"wr-{i:02d}" for i in range(30)]
    h.publish(*map(make_request, ids))
    entries = worker.scan()
    client.submitter_name()          # its connection made before the race

    def withdraw_all():
        return {rid for rid in reversed(ids) if client.withdraw(rid)}

    def claim_all():
        got: list[str] = []
        for i in range(0, len(entries), 3):
            got += claimed_ids(worker.claim_all(entries[i:i + 3]))
        return set(got)

    withdrawn, claimed = _race(withdraw_all, claim_all)
    assert not withdrawn & claimed, sorted(withdrawn & claimed)
    assert withdrawn | claimed == set(ids)
    assert queue.count("running") == len(claimed)
    assert queue.count("queued") == 0


def test_put_back_keeps_it_claimable_and_its_place(queue, request) -> None:
    """A claimed request put back is found by the next scan with the same
    place in line (``queued_ns``), claimable again, ahead of a later one."""
    h = Handles(queue, request)
    worker = h.worker()
    h.publish(make_request("pb-first"))
    queue.set_queued_time("pb-first", 1_000_000_000)
    h.publish(make_request("pb-later"))
    first = worker.claim(entry_of(worker, "pb-first"))
    assert isinstance(first, Claimed) and first.rid == "pb-first"
    worker.put_back("pb-first", ("pb-target",))
    seen = {worker.peek(e).rid: worker.peek(e) for e in worker.scan()}
    assert set(seen) == {"pb-first", "pb-later"}
    assert seen["pb-first"].queued_ns == first.queued_ns
    assert seen["pb-first"].queued_ns < seen["pb-later"].queued_ns
    again = worker.claim(seen["pb-first"].entry)
    assert isinstance(again, Claimed)
    assert (again.rid, again.queued_ns, again.data) == (first.rid, first.queued_ns, first.data)
    # still one request: answered once
    worker.start("pb-first", run_record("pb-first"), durable=False)
    worker.reply("pb-first", reply("pb-first", mark=1))
    assert h.client().collect("pb-first")["result"] == {"mark": 1}
    assert h.client().collect("pb-first") is None


def test_lease_refuses_a_target_held_by_another_running_request(queue, request) -> None:
    """On a ``SharedQueue`` a target leased by a running request of another
    worker is refused to a later request until that one is answered.  A
    transport that is not one has one worker by design, whose own schedule
    keeps targets apart: a second worker cannot start beside it."""
    h = Handles(queue, request)
    one = h.worker()
    if not isinstance(one, SharedQueue):
        with pytest.raises(WorkerRunning):
            queue.transport().lock_worker(False, lambda: False)
        return
    two = h.worker()
    h.publish(make_request("ls-early"))
    queue.set_queued_time("ls-early", 1_000_000_000)
    h.publish(make_request("ls-late"))
    early = one.claim(entry_of(one, "ls-early"))
    late = two.claim(entry_of(two, "ls-late"))
    assert isinstance(early, Claimed) and isinstance(late, Claimed)
    assert one.lease("ls-early", ("T1",)) is True
    one.start("ls-early", run_record("ls-early", ("T1",)), durable=False)
    assert two.lease("ls-late", ("T1",)) is False
    assert two.lease("ls-late", ("T1",)) is False    # still refused
    one.reply("ls-early", reply("ls-early"))
    assert two.lease("ls-late", ("T1",)) is True
    two.start("ls-late", run_record("ls-late", ("T1",)), durable=False)
    two.reply("ls-late", reply("ls-late"))
    assert h.client().collect("ls-early") is not None
    assert h.client().collect("ls-late") is not None
