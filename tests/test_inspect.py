"""Operator views against a real worker, what the spool alone shows: the
run file behind ``show``, a junk file's quarantine in ``show``/``ls``, and
``tail`` reporting a collected reply's removal (over PostgreSQL a collect
is no event).  What every transport shows -- ``status --prometheus``,
``show`` of a running request, ``ls``, ``tail`` of a request's life, the
metrics file -- is in ``contract/test_contract_inspect.py``."""

from __future__ import annotations

import json
import signal
import time

from support.env import SpoolEnv
from support.tail import events_for, start_tail, tail_ready
from support.waiting import wait_for


def test_running_request_run_file_names_pid_op_and_progress(running: SpoolEnv,
                                                            tmp_path) -> None:
    """The run record of a running request is ``active/ID.json.run``: its
    worker's pid, its op, its progress (what ``show`` reads)."""
    client = running.client()
    release = tmp_path / "release"
    rid = client.submit("hold", {"release": str(release), "target": "t1", "tag": "x"})
    run_file = running.spool.active / (rid + ".json.run")

    def progress():
        try:
            return json.loads(run_file.read_text()).get("progress")
        except (OSError, ValueError):
            return None
    assert wait_for(progress, what="the op's progress in its run file")["done"] == 1
    run = json.loads(run_file.read_text())
    assert run["pid"] == running.workers[0].pid and run["op"] == "hold"
    assert run["targets"] == ["t1"]
    info = json.loads(running.spoolops("show", rid, "--json").stdout)
    assert info["path"] == str(running.spool.active / (rid + ".json")), info
    release.touch()
    assert client.wait(rid, timeout=60).ok


def test_show_failed_entry_with_reason(running: SpoolEnv) -> None:
    bad = running.spool.new / "not-a-request.txt"
    bad.write_text("hello")
    wait_for(lambda: (running.spool.failed / "not-a-request.txt.reason").exists(),
             what="quarantine")
    text = running.spoolops("show", "not-a-request.txt").stdout
    assert "state:    failed" in text and "no reply can be addressed" in text
    rows = [json.loads(line) for line in
            running.spoolops("ls", "failed", "--json").stdout.splitlines()]
    assert rows[0]["id"] == "not-a-request.txt" and "no reply" in rows[0]["reason"]










def test_tail_sees_a_full_lifecycle(running: SpoolEnv) -> None:
    tail = start_tail(running)
    try:
        deadline = time.monotonic() + 60
        tail_ready(running, tail, deadline)
        client = running.client()
        rid = client.submit("sleep", {"seconds": 0.3, "tag": "t"})
        events = events_for(tail, rid, "finished", deadline)
        client.wait(rid, timeout=30)   # collected only once tail has seen it published
        events += events_for(tail, rid, "removed", deadline)
        # a junk file: tail reports its quarantine ("failed", with the reason)
        (running.spool.new / "junk.txt").write_text("not a request")
        failed = events_for(tail, "junk.txt", "failed", deadline)
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(30) == 0
    finally:
        tail.kill()
    kinds = [e["event"] for e in events]
    assert kinds == ["queued", "started", "finished", "removed"], events
    assert events[1]["pid"] == running.workers[0].pid
    assert events[2]["ok"] is True and events[2]["duration_s"] >= 0.25
    assert "no reply can be addressed" in failed[-1]["reason"]


