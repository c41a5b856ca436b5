"""The client on the spool: one inotify instance per process, no thread of its
own, trusted reply files only, its tmp/ left clean.  The client's promises on
every transport are in test_e2e.py and contract/ (test_contract_client.py,
test_contract_lifecycle.py: a reply that came before ``wait``, an oversize
request)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from support.env import SpoolEnv
from support.requires import is_root
from support.waiting import wait_for

from spoolops import Client, Timeout


def _inotify_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify":
                count += 1
        except OSError:
            pass
    return count


def test_sixty_four_threads_share_one_inotify_instance(running: SpoolEnv, tmp_path) -> None:
    """64 threads of 4 clients wait at once (their requests are held running
    until all 64 have been claimed): the process has one inotify instance."""
    before = _inotify_fds()
    clients = [running.client() for _ in range(4)]
    release = tmp_path / "release"
    results: dict[int, object] = {}

    def work(n: int) -> None:
        client = clients[n % 4]
        results[n] = client.call("hold", {"release": str(release), "tag": n},
                                 timeout=120)["tag"]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(64)]
    for t in threads:
        t.start()
    # every thread is inside wait() once all 64 requests are queued or running
    queued = lambda: len(os.listdir(running.spool.new)) + len(
        [n for n in os.listdir(running.spool.active) if n.endswith(".json")])
    wait_for(lambda: queued() == 64, timeout=120, what="64 requests waiting")
    during = _inotify_fds()
    release.touch()
    for t in threads:
        t.join(180)
    assert results == {n: n for n in range(64)}
    # one instance was added for the whole process, however many threads wait
    assert during - before <= 1 and _inotify_fds() - before <= 1


def test_reply_is_deleted_after_reading(running: SpoolEnv) -> None:
    client = running.client()
    rid = client.submit("echo", {"a": 1})
    wait_for(lambda: (running.spool.replies / (rid + ".json")).exists(),
             what="reply file")
    reply = client.wait(rid, timeout=10)
    assert reply.result == {"a": 1}
    assert not (running.spool.replies / (rid + ".json")).exists()
    with pytest.raises(Timeout):
        client.wait(rid, timeout=0.2)  # collected once, never twice


@pytest.mark.skipif(not is_root(), reason="forging a reply owned by another uid needs root")
def test_forged_reply_is_ignored_and_real_one_wins(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    rid = client.submit("echo", {"real": True})
    forged = spool_env.spool.replies / (rid + ".json")
    forged.write_text(json.dumps({"version": 1, "id": rid, "op": "echo", "ok": True,
                                  "result": {"real": False}, "error": None}))
    os.chown(forged, 54321, 54321)
    with pytest.raises(Timeout):
        client.wait(rid, timeout=0.5)
    assert forged.exists()  # the client does not delete what it does not trust
    spool_env.start_worker()
    assert client.wait(rid, timeout=30).result == {"real": True}


def test_reply_with_wrong_id_or_junk_is_ignored(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    rid = client.submit("echo", {"n": 1})
    path = spool_env.spool.replies / (rid + ".json")
    path.write_text(json.dumps({"id": "someone-else", "ok": True, "result": 1}))
    with pytest.raises(Timeout):
        client.wait(rid, timeout=0.3)
    path.write_text("{ not json")
    with pytest.raises(Timeout):
        client.wait(rid, timeout=0.3)
    path.unlink()
    target = spool_env.base / "elsewhere.json"
    target.write_text(json.dumps({"id": rid, "ok": True, "result": "via symlink"}))
    path.symlink_to(target)
    with pytest.raises(Timeout):
        client.wait(rid, timeout=0.3)
    path.unlink()
    spool_env.start_worker()
    assert client.wait(rid, timeout=30).result == {"n": 1}


def test_client_without_spool_says_so(tmp_path: Path) -> None:
    from spoolops import SpoolError
    client = Client(root=tmp_path / "nothing-here")
    with pytest.raises(SpoolError, match="spoolops init"):
        client.submit("echo", {})


def test_oversize_request_refused_by_client(spool_env: SpoolEnv) -> None:
    from spoolops import BadRequest
    client = spool_env.client()
    with pytest.raises(BadRequest, match="max_request_bytes"):
        client.submit("echo", {"blob": "x" * 70000})
    assert list(spool_env.spool.tmp.iterdir()) == []


def test_no_client_thread_runs_while_nobody_waits(running: SpoolEnv) -> None:
    """An idle web process is not woken by the replies to others: the client
    has no thread of its own; a waiting caller reads inotify itself."""
    before = set(threading.enumerate())
    client = running.client()
    assert client.call("echo", {"a": 1}, timeout=30) == {"a": 1}
    other = Client(config=running.config)
    for n in range(20):  # replies to another client in this process, nobody waiting here
        other.wait(other.submit("echo", {"n": n}), timeout=30)
    assert set(threading.enumerate()) == before
    assert client.call("echo", {"b": 2}, timeout=30) == {"b": 2}
