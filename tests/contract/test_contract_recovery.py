"""Contract: what recovery promises after a worker was killed (SIGKILL)
while it ran requests, on every transport (the ``queue`` fixture).

- an idempotent request is run again, by the next worker, and answered once;
- a non-idempotent one that started is answered ``Interrupted`` ("may or
  may not have completed") and kept aside as failed -- never re-run by
  itself; ``spoolops requeue`` puts it back, retiring the ``Interrupted``
  reply nobody collected, and the client then gets the re-run's answer;
- with no worker running, ``spoolops janitor`` recovers under the worker
  lock (its dry run says what it would do and does nothing; it exits 1,
  the work was stuck) and releases the lock: the next worker serves what
  was put back;
- ``spoolops requeue`` refuses a request a live worker runs and an unknown
  id (exit 1), and takes back what a dead worker left running: run again,
  even when its op is not idempotent (the operator checked it).

Real worker processes (``queue.start_worker``) running the test site ops
``hold`` (idempotent, runs until released), ``nonidem`` (not idempotent,
sleeps); the commands as the operator (``queue.spoolops``).  Where a
request waits after recovery differs by design (the spool keeps a request
put back in ``active/``, where no member can swap it; PostgreSQL puts its
row back in line): the tests ask only that it is neither failed nor
answered, and that the next worker runs it.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from support.waiting import wait_for


def _running(queue, rid: str) -> bool:
    """``rid`` runs (its run record exists), as the operator sees it."""
    info = queue.transport().describe(rid)
    return info is not None and info["state"] == "running" and bool(info.get("run"))


def _state(queue, rid: str) -> str | None:
    info = queue.transport().describe(rid)
    return None if info is None else info["state"]


def test_requeued_interrupted_request_runs_and_answers_again(queue) -> None:
    """Its uncollected ``Interrupted`` reply does not stand in the way of the
    re-run: ``requeue`` retires it, and the client gets the re-run's answer
    (one reply, not two)."""
    client = queue.client()
    first = queue.start_worker()
    rid = client.submit("nonidem", {"seconds": 3, "tag": "first"})
    wait_for(lambda: _running(queue, rid), what="nonidem to start")
    queue.stop_worker(first, signal.SIGKILL)
    second = queue.start_worker()                # its recovery answers it Interrupted
    kept = wait_for(lambda: client.transport.collect(rid, remove=False),
                    what="the Interrupted reply")
    assert kept["error"]["type"] == "Interrupted", kept
    wait_for(lambda: _state(queue, rid) == "failed", what="the Interrupted orphan kept aside")
    assert queue.stop_worker(second) == 0
    done = queue.spoolops("requeue", rid)
    assert done.returncode == 0, done.stderr
    assert client.transport.collect(rid, remove=False) is None    # retired by the requeue
    assert _state(queue, rid) in ("queued", "running")
    queue.start_worker()
    reply = client.wait(rid, timeout=90)
    assert reply.ok and reply.result["tag"] == "first", reply.raw
    # (PostgreSQL's client removes a reply it took on a thread of its own, just after)
    wait_for(lambda: queue.quiet() and queue.replies_left() == 0, what="nothing left")
    assert queue.count("failed") == 0


def test_janitor_recovers_a_killed_workers_requests_when_no_worker_runs(
        queue, tmp_path: Path) -> None:
    """An idempotent request put back (then re-run by the next worker), a
    non-idempotent started one answered ``Interrupted`` and failed, a
    request still waiting for its target served once; the dry run before
    changes nothing."""
    client = queue.client()
    release = tmp_path / "release"
    worker = queue.start_worker()
    idem = client.submit("hold", {"release": str(release), "target": "a", "tag": "idem"})
    nonidem = client.submit("nonidem", {"seconds": 30, "target": "b", "tag": "non"})
    waiting = client.submit("nonidem", {"seconds": 0, "target": "b", "tag": "waiting"})
    wait_for(lambda: _running(queue, idem) and _running(queue, nonidem),
             what="both ops to start")
    queue.stop_worker(worker, signal.SIGKILL)

    dry = queue.spoolops("janitor", "--dry-run", "--json")
    assert dry.returncode == 1, dry.stdout + dry.stderr        # orphans: stuck work
    report = json.loads(dry.stdout)
    assert report["dry_run"] is True and report["worker"]["alive"] is False
    plan = {rid: a["action"] for a in report["actions"] for rid in (idem, nonidem)
            if rid in a["path"] and a["action"] in ("requeue", "interrupt")}
    assert plan == {idem: "requeue", nonidem: "interrupt"}, report["actions"]
    assert not any(a["done"] for a in report["actions"])
    assert _running(queue, idem) and _running(queue, nonidem)  # the dry run changed nothing
    assert client.transport.collect(nonidem, remove=False) is None

    proc = queue.spoolops("janitor", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["dry_run"] is False
    recovered = report["recovered"]
    # the one waiting for target b may have been claimed (then put back) or not
    assert recovered["interrupted"] == 1 and recovered["requeued"] in (1, 2), recovered
    assert _state(queue, nonidem) == "failed"
    assert _state(queue, idem) in ("queued", "running") and not _running(queue, idem)
    cut = client.wait(nonidem, timeout=10)
    assert cut.error["type"] == "Interrupted"
    assert "may or may not have completed" in cut.error["message"]

    # the lock was released: a worker starts and serves what was put back
    again = queue.start_worker()
    assert client.wait(waiting, timeout=60).result["tag"] == "waiting"
    wait_for(lambda: _running(queue, idem), what="the idempotent request to run again")
    release.touch()
    rerun = client.wait(idem, timeout=60)
    assert rerun.ok and rerun.result["pid"] == again.pid
    wait_for(lambda: queue.quiet() and queue.replies_left() == 0, what="nothing left")
    assert queue.count("failed") == 1


def test_requeue_refuses_what_a_live_worker_runs_and_takes_back_orphans(queue) -> None:
    """Refused while a live worker runs the request, and for an id nobody
    knows; with the worker killed, a non-idempotent request it left running
    is put back by hand -- and run again by the next worker, not answered
    ``Interrupted`` -- and a failed one goes back in line and runs again."""
    client = queue.client()
    worker = queue.start_worker()
    rid = client.submit("nonidem", {"seconds": 30, "tag": "one"})
    wait_for(lambda: _running(queue, rid), what="nonidem to start")
    # (in the transport's own words: the spool names the live worker,
    # PostgreSQL says it is neither failed nor a dead worker's orphan)
    busy = queue.spoolops("requeue", rid)
    assert busy.returncode == 1 and busy.stderr.startswith("spoolops requeue: "), busy
    assert "requeued" not in busy.stdout
    assert _running(queue, rid)
    orphan = client.submit("nonidem", {"seconds": 3, "tag": "orphan"})
    wait_for(lambda: _running(queue, orphan), what="the second nonidem to start")
    queue.stop_worker(worker, signal.SIGKILL)
    unknown = queue.spoolops("requeue", "no-such-id")
    assert unknown.returncode == 1 and "requeued" not in unknown.stdout
    # no worker: what it left running can be put back by hand
    ok = queue.spoolops("requeue", orphan)
    assert ok.returncode == 0, ok.stderr
    assert f"requeued {orphan}" in ok.stdout
    assert _state(queue, orphan) in ("queued", "running") and not _running(queue, orphan)
    queue.start_worker()
    assert client.wait(rid, timeout=60).error["type"] == "Interrupted"
    rerun = client.wait(orphan, timeout=60)
    assert rerun.ok and rerun.result["tag"] == "orphan", rerun.raw
    # the failed one goes back in line, and runs again (a 30 s sleep: seeing
    # it start is enough)
    again = queue.spoolops("requeue", rid)
    assert again.returncode == 0, again.stderr
    assert queue.transport().place_of("failed") in again.stdout
    assert queue.count("failed") == 0
    wait_for(lambda: _running(queue, rid), timeout=60, what="the requeued request to run")
