"""Contract: a request's life around the worker and the client, on every
transport (the ``queue`` / ``served`` fixtures).

- one worker per home: a second one exits 2, naming the holder and
  ``--standby``; a standby waits, and takes over when the worker dies
  (SIGKILL: it re-runs the idempotent request cut off; SIGTERM: the
  worker finishes it first);
- SIGTERM: the worker finishes what runs (each answered), starts nothing
  more, exits 0; what was queued stays queued -- nothing is lost -- and
  the next worker serves it;
- a reply that arrived before the client waits is still found (no lost
  wake-up), and collected once;
- a request larger than ``max_request_bytes`` is refused by the client
  (``BadRequest``) and nothing is queued.

Real worker processes; the test site op ``hold`` keeps requests
running until the test releases them (no sleep stands in for "running").
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from support.waiting import wait_for

from spoolops import BadRequest, Timeout


def test_a_second_worker_refuses_naming_the_holder(served) -> None:
    result = served.spoolops("worker", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "another worker" in result.stderr and "--standby" in result.stderr
    assert f"pid {served.workers[0].pid}" in result.stderr, result.stderr
    assert served.client().call("echo", {"still": 1}, timeout=30) == {"still": 1}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["KILL", "TERM"])
def test_standby_takes_over_when_the_worker_dies(queue, tmp_path: Path, sig: int) -> None:
    first = queue.start_worker()
    standby = queue.start_worker("--standby", wait=False)
    # it logs this line, then waits for the lock: from here it must take nothing
    queue.wait_log(standby, "event=standby")
    client = queue.client()
    assert client.call("echo", {"n": 1}, timeout=30)["n"] == 1
    release = tmp_path / "release"
    rid = client.submit("hold", {"release": str(release), "tag": "cut"})
    wait_for(lambda: client.transport.progress_of(rid), what="hold to run")
    assert standby.poll() is None
    assert f"event=worker_ready pid={standby.pid}" not in standby.log_path.read_text()
    first.send_signal(sig)
    if sig == signal.SIGTERM:
        release.touch()                  # the worker finishes it, then lets go
        assert first.wait(60) == 0
    queue.wait_log(standby, f"event=worker_ready pid={standby.pid}")
    release.touch()
    reply = client.wait(rid, timeout=60)
    # SIGKILL: re-run by the standby (idempotent); SIGTERM: finished by the first
    assert reply.ok and reply.result["tag"] == "cut"
    assert reply.result["pid"] == (standby.pid if sig == signal.SIGKILL else first.pid)
    assert client.call("echo", {"n": 2}, timeout=30)["n"] == 2
    assert queue.stop_worker(standby) == 0
    assert queue.quiet()


def test_sigterm_finishes_running_and_keeps_queued(queue, tmp_path: Path) -> None:
    proc = queue.start_worker()
    client = queue.client()
    release = tmp_path / "release"
    # four holds fill the worker's four slots: the echoes behind them wait
    held = [client.submit("hold", {"release": str(release), "tag": f"h{i}"}) for i in range(4)]
    wait_for(lambda: all(client.transport.progress_of(rid) for rid in held),
             what="4 holds running")
    queued = [client.submit("echo", {"n": n}) for n in range(20)]
    proc.send_signal(signal.SIGTERM)
    # stopping, it waits for what runs (until released here)
    release.touch()
    assert proc.wait(60) == 0, proc.log_path.read_text()
    # what ran has its reply, nothing is left running; the rest is answered or
    # still queued: nothing lost
    assert queue.count("running") == 0
    for rid in held:
        reply = client.wait(rid, timeout=10)
        assert reply.ok and reply.result["pid"] == proc.pid
    answered = {rid for rid in queued if client.transport.collect(rid, remove=False)}
    assert len(answered) + queue.count("queued") == len(queued), answered
    queue.start_worker()
    for n, rid in enumerate(queued):
        assert client.wait(rid, timeout=60).result == {"n": n}
    wait_for(lambda: queue.quiet() and queue.replies_left() == 0, what="nothing left")


def test_wait_after_reply_arrived(served) -> None:
    """A reply published before ``wait`` is called is still found."""
    client = served.client()
    rid = client.submit("echo", {"late": 1})
    wait_for(lambda: served.count("replies") == 1, what="the reply")
    assert client.wait(rid, timeout=5).result == {"late": 1}
    # (PostgreSQL's client removes a reply it took on a thread of its own, just after)
    wait_for(lambda: served.replies_left() == 0, what="the reply to be gone")
    with pytest.raises(Timeout):                  # collected once, never twice
        client.wait(rid, timeout=0.2)


def test_oversize_request_refused_by_client(queue) -> None:
    client = queue.client()
    limit = queue.config.max_request_bytes
    with pytest.raises(BadRequest, match="max_request_bytes"):
        client.submit("echo", {"blob": "x" * (limit + 1)})
    assert queue.count("queued") == 0 and client.queue_length() == 0
    # just under the limit is fine
    rid = client.submit("echo", {"blob": "x" * (limit // 2)})
    assert queue.count("queued") == 1
    assert client.cancel(rid) is True
