"""Contract: what a killed worker left running is settled by the next one,
with exactly one reply -- an idempotent operation re-run, a non-idempotent
one answered ``Interrupted`` and kept aside (never re-run).

Real worker processes (``queue.start_worker``), SIGKILLed while a request
runs (the test site ops ``hold`` and ``append`` of ``tests/siteops``), on
every transport (the ``queue`` fixture).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from support.contract import Handles, make_request
from support.waiting import wait_for


def _running_started(worker, rid: str):
    info = worker.describe(rid)
    return info is not None and info["state"] == "running" and bool(info.get("run"))


@pytest.mark.parametrize("op", ["hold", "append"])
def test_next_worker_settles_a_killed_workers_request_once(queue, request, tmp_path: Path,
                                                           op: str) -> None:
    h = Handles(queue, request)
    client = h.client()
    operator = queue.transport()
    release, out = tmp_path / "release", tmp_path / "appended"
    args = ({"release": str(release), "timeout": 120} if op == "hold" else
            {"seconds": 60, "path": str(out), "tag": "ran"})
    first = queue.start_worker()
    rid = client.publish(make_request(f"settle-{op}", op=op, args=args))
    wait_for(lambda: _running_started(operator, rid), what=f"{rid} running")
    if op == "hold":
        wait_for(lambda: (client.progress_of(rid) or {}).get("done") == 1,
                 what="its progress report")
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    release.touch()             # a re-run of hold finishes at once

    second = queue.start_worker()
    got = wait_for(lambda: client.collect(rid), what=f"the reply to {rid}")
    if op == "hold":            # idempotent: run again by the next worker
        assert got["ok"] is True, got
        assert got["result"]["pid"] == second.pid
        assert client.collect(rid) is None
        assert operator.describe(rid) is None
    else:                       # not idempotent: Interrupted, kept aside, not re-run
        assert got["ok"] is False and got["error"]["type"] == "Interrupted", got
        assert operator.describe(rid)["state"] == "failed"
        # never a second, different reply (a failed request's reply may stay
        # readable where the transport keeps it with the request)
        assert client.collect(rid) in (None, got)
        assert not out.exists()
    wait_for(queue.quiet, what="nothing queued or running")
    assert queue.count("replies") == 0


def test_settle_finishes_what_a_killed_worker_left_and_leaves_the_fate_to_recovery(
        queue, request, tmp_path: Path) -> None:
    """``settle`` after a worker was killed running a request: a dry run says
    what it would do and changes nothing (asked again, it says the same);
    settling leaves nothing more to settle; the request is then an orphan
    (recovery decides its fate), never answered by ``settle`` itself."""
    h = Handles(queue, request)
    client = h.client()
    release = tmp_path / "release"
    first = queue.start_worker()
    rid = client.publish(make_request("settle-me", op="hold",
                                      args={"release": str(release), "timeout": 120}))
    operator = queue.transport()
    wait_for(lambda: _running_started(operator, rid), what=f"{rid} running")
    first.send_signal(signal.SIGKILL)
    first.wait(30)

    worker = h.worker()          # the next worker, holding the lock

    def lost(_rid: str) -> dict:
        raise AssertionError("no reply was lost: settle must not answer anything")

    planned = worker.settle(lost, dry_run=True)
    assert worker.settle(lost, dry_run=True) == planned
    assert all(not step.done for step in planned)
    done = worker.settle(lost)
    assert [(s.action, s.path) for s in done] == [(s.action, s.path) for s in planned]
    assert all(step.done and step.error is None for step in done), done
    assert worker.settle(lost) == [], "settled twice"
    assert [o.rid for o in worker.orphans()] == [rid]
    assert client.collect(rid) is None
    assert operator.describe(rid)["state"] == "running"
