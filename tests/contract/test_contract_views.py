"""Contract: the operator's reads -- ``counts``, ``entries``, ``find``,
``describe`` -- agree with what was published, claimed, answered and kept
aside (same states, same ids), on every transport (the ``queue`` fixture).

The states are ``base.STATES``; ``describe`` names an answered request's
state ``done``.
"""

from __future__ import annotations

import time

from support.contract import (
    DESCRIBED,
    Handles,
    entry_of,
    make_request,
    reply,
    run_record,
)

from spoolops.transport.base import STATES, Claimed


def _populate(queue, request) -> tuple[Handles, object, dict[str, set[str]]]:
    """Two queued requests, one running, one answered, one kept aside."""
    h = Handles(queue, request)
    worker = h.worker()
    ids = ["vw-queued-1", "vw-queued-2", "vw-running", "vw-answered", "vw-failed"]
    h.publish(*map(make_request, ids))
    taken = {}
    for rid in ("vw-running", "vw-answered", "vw-failed"):
        taken[rid] = worker.claim(entry_of(worker, rid))
        assert isinstance(taken[rid], Claimed)
    worker.start("vw-running", run_record("vw-running", ("vw-target",)), durable=False)
    worker.start("vw-answered", run_record("vw-answered"), durable=False)
    worker.reply("vw-answered", reply("vw-answered", mark="done"))
    kept = worker.quarantine(taken["vw-failed"].entry, "kept aside by the contract test", claimed=True)
    assert kept.moved
    expected = {"queued": {"vw-queued-1", "vw-queued-2"}, "running": {"vw-running"},
                "replies": {"vw-answered"}, "failed": {"vw-failed"}}
    return h, worker, expected


def test_counts_and_entries_agree_with_what_happened(queue, request) -> None:
    h, worker, expected = _populate(queue, request)
    now = time.time()
    counts = worker.counts(now)
    assert set(counts) == set(STATES)
    for state in STATES:
        assert counts[state].problem is None, (state, counts[state])
        assert counts[state].count == len(expected[state]), (state, counts[state])
        assert counts[state].oldest_age_s is not None and counts[state].oldest_age_s >= 0
        listed = worker.entries(state)
        assert {e.id for e in listed} == expected[state], state
        assert all(e.state == state for e in listed)
        assert [e.mtime for e in listed] == sorted(e.mtime for e in listed)   # oldest first
    # the running entry names its target (from the run record)
    assert worker.entries("running")[0].fields.get("target") == "vw-target"
    # the client's collect moves it out of every state
    assert h.client().collect("vw-answered") is not None
    assert worker.counts(now)["replies"].count == 0
    assert worker.entries("replies") == []


def test_find_and_describe_agree_with_what_happened(queue, request) -> None:
    h, worker, expected = _populate(queue, request)
    every = set().union(*expected.values())
    found = worker.find("vw-")
    assert every <= set(found) and all(name.startswith("vw-") for name in found)
    assert worker.find("vw-queued-") == ["vw-queued-1", "vw-queued-2"]
    assert worker.find("vw-running") == ["vw-running"]
    assert worker.find("vw-nothing") == []
    for state, ids in expected.items():
        for rid in ids:
            info = worker.describe(rid)
            assert info is not None and info["id"] == rid
            assert info["state"] == DESCRIBED[state], (rid, info)
    assert worker.describe("vw-answered")["reply"]["result"] == {"mark": "done"}
    assert "kept aside by the contract test" in str(worker.describe("vw-failed")["reason"])
    assert worker.describe("vw-running")["run"]["targets"] == ["vw-target"]
    assert worker.describe("vw-queued-1")["request"]["id"] == "vw-queued-1"
    assert worker.describe("vw-nothing") is None
    # withdrawn and collected requests are gone from every view
    assert h.client().withdraw("vw-queued-1") is True
    assert h.client().collect("vw-answered") is not None
    assert worker.describe("vw-queued-1") is None
    assert worker.describe("vw-answered") is None
    assert set(worker.find("vw-")) >= every - {"vw-queued-1", "vw-answered"}
    assert not {"vw-queued-1", "vw-answered"} & set(worker.find("vw-"))


def test_find_names_each_request_once(queue, request) -> None:
    """``find`` names each request once, by its id -- a failed one too (its
    entry's name is for entries that carry no id)."""
    _h, worker, expected = _populate(queue, request)
    assert sorted(worker.find("vw-")) == sorted(set().union(*expected.values()))
    assert worker.find("vw-fail") == ["vw-failed"]
