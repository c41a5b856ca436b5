"""Contract: the public ``spoolops.Client`` keeps the same promises on every
transport, with a real worker serving the queue.

``call``/``call_reply`` return the op's result or its error type;
``submit`` + ``wait`` collect a reply; ``cancel`` withdraws a request still
queued (True; then no reply ever comes, so ``wait`` times out, as
``Client.cancel`` says) but not one already running (False; it is still
answered); ``wait``/``call`` time out on time; progress of a running op
reaches ``call(on_progress=...)`` and ``transport.progress_of``; a
fire-and-forget request leaves nothing behind; ``queue_length`` and
``pending_batches`` agree with what is queued and running.

The ``single`` queues run one request at a time (``concurrency = 1``), so
that a ``hold`` request keeps the worker busy and what follows stays queued
for as long as the test needs -- no sleep stands in for "still queued".
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from support.env import TRANSPORTS, queue_for
from support.waiting import wait_for

from spoolops import errors
from spoolops.client import Client

MARGIN_S = 1.5      # what a timeout may overrun by (a poll, a slow machine)


@pytest.fixture(params=TRANSPORTS)
def single(request, tmp_path: Path):
    """A queue of each transport whose worker runs one request at a time."""
    queue = queue_for(request, tmp_path, request.param, durable=True, concurrency=1)
    queue.start_worker()
    return queue


def _hold(client: Client, tmp_path: Path, name: str, **args) -> tuple[str, Path]:
    """Submit a ``hold`` request and wait until it runs (its first progress
    report); returns its id and the file that releases it."""
    release = tmp_path / f"release-{name}"
    rid = client.submit("hold", {"release": str(release), "tag": name, **args})
    wait_for(lambda: client.transport.progress_of(rid), what=f"{name} to run")
    return rid, release


def test_call_returns_the_result(served) -> None:
    """``call`` returns the op's result; ``call_reply`` the whole reply,
    naming this client as its submitter."""
    client = served.client()
    result = client.call("sleep", {"seconds": 0, "tag": "called"}, timeout=30)
    assert result["tag"] == "called" and result["end"] >= result["start"]
    reply = client.call_reply("whoami", timeout=30)
    assert reply.ok is True and reply.error is None
    assert reply.result == {"user": client.transport.submitter_name()}
    assert reply.submitted_by == client.transport.submitter_name()
    # not at once: the spool releases a request's pending mark just after
    # publishing its reply (PostgreSQL in the same step)
    wait_for(lambda: client.queue_length() == 0, what="the queue to be empty")


def test_call_reply_names_the_error_type(served) -> None:
    """An unknown op and a malformed request come back as ``ok: false`` with
    their error type; ``call`` raises the matching ``OpError``."""
    client = served.client()
    unknown = client.call_reply("no_such_op", timeout=30)
    assert unknown.ok is False and unknown.error["type"] == "UnknownOp"
    assert unknown.result is None
    bad = client.call_reply("sleep", {"seconds": -1}, timeout=30)
    assert bad.ok is False and bad.error["type"] == "BadRequest"
    assert "seconds" in bad.error["message"]
    with pytest.raises(errors.UnknownOp) as caught:
        client.call("no_such_op", timeout=30)
    assert caught.value.reply.error["type"] == "UnknownOp"
    with pytest.raises(errors.BadRequest):
        client.call("sleep", {"seconds": "soon"}, timeout=30)
    assert served.replies_left() == 0


def test_submit_then_wait(served) -> None:
    """``submit`` returns the id at once; ``wait`` collects the reply once."""
    client = served.client()
    rids = [client.submit("sleep", {"seconds": 0, "tag": f"t{n}"}) for n in range(3)]
    assert len(set(rids)) == 3
    for n, rid in enumerate(rids):
        reply = client.wait(rid, timeout=30)
        assert reply.id == rid and reply.ok is True and reply.op == "sleep"
        assert reply.result["tag"] == f"t{n}"
        assert reply.queued_at and reply.started_at and reply.finished_at
    assert served.replies_left() == 0
    with pytest.raises(errors.Timeout):      # collected: there is no second reply
        client.wait(rids[0], timeout=0.2)


@pytest.mark.parametrize("priority", ["9", True, 1.5, 10**7, -10**7])
def test_a_priority_the_worker_would_refuse_is_refused_at_submit(queue, priority) -> None:
    """On every transport alike: a priority that is not an integer within
    the bounds raises BadRequest and queues nothing (PostgreSQL's column
    would have cast "9" to 9, where the spool's worker refuses it)."""
    client = queue.client()
    with pytest.raises(errors.BadRequest, match="priority"):
        client.submit("echo", {"p": 1}, priority=priority)
    with pytest.raises(errors.BadRequest, match="priority"):
        client.call("echo", {"p": 1}, timeout=1, priority=priority)
    assert client.queue_length() == 0
    assert client.submit("echo", {"p": 2}, priority=-(10**6))


def test_cancel_queued_and_running(single, tmp_path: Path) -> None:
    """A queued request withdrawn (True) never runs and never gets a reply;
    a running one cannot be withdrawn (False) and is answered all the same."""
    client = single.client()
    running, release = _hold(client, tmp_path, "busy")
    queued = client.submit("sleep", {"seconds": 0, "tag": "withdrawn"})
    assert client.queue_length() == 2
    assert client.cancel(queued) is True
    assert client.cancel(queued) is False            # withdrawn once only
    assert client.queue_length() == 1
    assert client.cancel(running) is False
    release.touch()
    reply = client.wait(running, timeout=30)
    assert reply.ok is True and reply.result["tag"] == "busy"
    wait_for(lambda: client.queue_length() == 0, what="the queue to drain")
    # the worker is idle and nothing of the withdrawn request is left: no reply comes
    assert single.quiet() and single.replies_left() == 0
    with pytest.raises(errors.Timeout):
        client.wait(queued, timeout=0.3)


def test_timeouts_are_kept(single, tmp_path: Path) -> None:
    """``wait`` and ``call`` raise ``Timeout`` within their timeout (plus a
    small margin); ``call`` then withdraws its request, still queued."""
    client = single.client()
    running, release = _hold(client, tmp_path, "busy")
    queued = client.submit("sleep", {"seconds": 0})
    for timeout in (0.3, 1.0):
        start = time.monotonic()
        with pytest.raises(errors.Timeout):
            client.wait(queued, timeout=timeout)
        took = time.monotonic() - start
        assert timeout <= took < timeout + MARGIN_S, (timeout, took)
    start = time.monotonic()
    with pytest.raises(errors.Timeout):
        client.call("sleep", {"seconds": 0}, timeout=0.5)
    took = time.monotonic() - start
    assert 0.5 <= took < 0.5 + MARGIN_S, took
    assert client.queue_length() == 2        # the hold and the one submitted: call's is gone
    release.touch()
    assert client.wait(queued, timeout=30).ok is True
    assert client.wait(running, timeout=30).ok is True
    wait_for(lambda: single.quiet(), what="the queue to drain")
    assert single.replies_left() == 0


def test_progress_reaches_the_client(served, tmp_path: Path) -> None:
    """The progress a running op reports is what ``progress_of`` returns and
    what ``call(on_progress=...)`` is called with; the result follows."""
    client = served.client()
    rid, release = _hold(client, tmp_path, "watched")
    progress = client.transport.progress_of(rid)
    assert (progress["done"], progress["total"]) == (1, 2) and progress["updated_at"]
    release.touch()
    assert client.wait(rid, timeout=30).ok is True
    assert client.transport.progress_of(rid) is None      # answered: no progress left

    seen: list[dict] = []
    outcome: dict = {}
    release2 = tmp_path / "release-called"

    def call() -> None:
        try:
            outcome["result"] = client.call("hold", {"release": str(release2), "tag": "c"},
                                            timeout=30, on_progress=seen.append)
        except errors.SpoolError as exc:   # reported by the test below
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    try:
        wait_for(lambda: seen, what="the first progress report")
    finally:
        release2.touch()
        thread.join(40)
    assert "error" not in outcome, outcome
    assert outcome["result"]["tag"] == "c"
    assert (seen[0]["done"], seen[0]["total"]) == (1, 2)
    assert all(p["total"] == 2 and p["done"] in (1, 2) for p in seen)
    assert len(seen) == len({p["updated_at"] for p in seen})   # each report once


def test_fire_and_forget_leaves_nothing(served) -> None:
    """``submit(reply=False)``: the request runs, nobody is answered, and no
    trace of it stays in the queue."""
    client = served.client()
    rid = client.submit("sleep", {"seconds": 0, "batch": "ff-batch"}, reply=False)
    wait_for(lambda: client.queue_length() == 0 and client.pending_batches() == set(),
             what="the fire-and-forget request to be done")
    assert served.quiet() and served.replies_left() == 0
    assert served.count("failed") == 0
    assert served.transport().describe(rid) is None
    with pytest.raises(errors.Timeout):
        client.wait(rid, timeout=0.3)
    # a failing one leaves nothing either
    client.submit("crash", reply=False)
    wait_for(lambda: client.queue_length() == 0, what="the failing request to be done")
    assert served.replies_left() == 0 and served.count("failed") == 0


def test_queue_length_and_pending_batches_agree(single, tmp_path: Path) -> None:
    """Both count what is queued and running, by every submitter, whether
    the request waits for a reply or not; both fall to nothing once answered."""
    client = single.client()
    assert client.queue_length() == 0 and client.pending_batches() == set()
    running, release = _hold(client, tmp_path, "b-run", batch="run-batch")
    assert client.queue_length() == 1
    assert client.pending_batches() == {"run-batch"}
    queued = client.submit("sleep", {"seconds": 0, "batch": "queued-batch"})
    client.submit("sleep", {"seconds": 0, "batch": "quiet-batch"}, reply=False)
    client.submit("sleep", {"seconds": 0})                # no batch
    assert client.queue_length() == 4
    assert client.pending_batches() == {"run-batch", "queued-batch", "quiet-batch"}
    # a second client (another submitter where the transport has several) sees the same
    other = single.client("web2") if single.kind == "postgresql" else single.client()
    assert other.queue_length() == 4
    assert other.pending_batches() == {"run-batch", "queued-batch", "quiet-batch"}
    assert single.count("queued") == 3 and single.count("running") == 1
    release.touch()
    wait_for(lambda: client.queue_length() == 0, what="the queue to drain")
    assert client.pending_batches() == set() and other.pending_batches() == set()
    assert client.wait(running, timeout=30).ok and client.wait(queued, timeout=30).ok
