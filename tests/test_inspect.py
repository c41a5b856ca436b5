"""Operator views against a real worker: status, show, ls, tail, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.env import SpoolEnv, make_spool_env
from support.waiting import Lines, wait_for

from spoolops import UnknownOp


def _metrics(env: SpoolEnv) -> dict[tuple[str, tuple], float]:
    result = env.spoolops("status", "--prometheus")
    samples = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_prometheus_numbers_match_the_spool(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    queued = [client.submit("echo", {"n": n}) for n in range(3)]
    m = _metrics(spool_env)
    assert m[("spoolops_requests", (("state", "queued"),))] == 3
    assert m[("spoolops_worker_up", ())] == 0
    assert m[("spoolops_oldest_age_seconds", (("state", "queued"),))] >= 0
    spool_env.start_worker()
    for rid in queued:
        client.wait(rid, timeout=30)
    with pytest.raises(UnknownOp):                 # the failure is what is counted
        client.call("no_such_op", {}, timeout=30)
    uncollected = client.submit("echo", {"left": 1})
    wait_for(lambda: (spool_env.spool.replies / (uncollected + ".json")).exists(),
             what="reply")

    def settled():
        m = _metrics(spool_env)
        return m if m.get(("spoolops_served_total", (("op", "echo"), ("outcome", "ok")))) == 4 \
            else None
    m = wait_for(settled, what="stats saved")
    assert m[("spoolops_worker_up", ())] == 1
    assert m[("spoolops_requests", (("state", "queued"),))] == 0
    assert m[("spoolops_requests", (("state", "replies"),))] == 1
    # an op name the worker does not know is no label of its own (issue 19, 6)
    assert m[("spoolops_served_total", (("op", "-"), ("outcome", "UnknownOp")))] == 1
    assert m[("spoolops_operation_seconds_count", (("op", "echo"),))] == 4
    assert m[("spoolops_operation_seconds_bucket", (("le", "+Inf"), ("op", "echo")))] == 4


def test_show_running_request_names_pid_and_progress(running: SpoolEnv, tmp_path) -> None:
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
    text = running.spoolops("show", rid[:20]).stdout
    assert "state:    running" in text
    assert f"by worker pid {running.workers[0].pid}" in text and "target t1" in text
    assert "progress: [###############...............]  50.0%" in text, text
    info = json.loads(running.spoolops("show", rid, "--json").stdout)
    assert info["state"] == "running" and info["run"]["started_at"]
    assert info["run"]["progress"]["total"] == 2
    listing = running.spoolops("ls", "active").stdout
    assert rid in listing and "hold" in listing and "t1" in listing
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


def test_ls_oldest_first_with_fields(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    first = client.submit("update_headers", {"filename": "a.fits", "values": {}}, priority=2)
    second = client.submit("echo", {})
    past = time.time() - 60                         # the first is the older, by its mtime
    os.utime(spool_env.spool.new / f"{first}.json", (past, past))
    lines = spool_env.spoolops("ls", "new").stdout.splitlines()
    assert lines[0].startswith("state")
    assert first in lines[1] and "update_headers" in lines[1] and "a.fits" in lines[1]
    assert second in lines[2] and "echo" in lines[2]
    rows = [json.loads(line) for line in spool_env.spoolops("ls", "--json").stdout.splitlines()]
    assert [r["id"] for r in rows] == [first, second]
    assert rows[0]["priority"] == 2 and rows[0]["user"]


def _tail(env: SpoolEnv) -> subprocess.Popen:
    tail = subprocess.Popen([sys.executable, "-m", "spoolops", "tail", "--json"],
                            env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    tail.lines = Lines(tail.stdout)  # type: ignore[attr-defined]
    return tail


def _next_event(tail: subprocess.Popen, until: float) -> dict | None:
    """The next event tail prints, or None if it prints none before ``until``."""
    line = tail.lines.next(until)  # type: ignore[attr-defined]
    return json.loads(line) if line else None


def _tail_ready(env: SpoolEnv, tail: subprocess.Popen, deadline: float) -> None:
    """tail has set its watches once it reports something: probe until it does."""
    client = env.client()
    while _next_event(tail, time.monotonic() + 1.0) is None:
        assert time.monotonic() < deadline, "tail never reported an event"
        client.wait(client.submit("echo", {"probe": 1}), timeout=30)


def _events_for(tail: subprocess.Popen, key: str, last: str, deadline: float) -> list[dict]:
    seen: list[dict] = []
    while not seen or seen[-1]["event"] != last:
        event = _next_event(tail, deadline)
        assert event is not None, f"tail printed no more events: {seen}"
        if event.get("id") == key:
            seen.append(event)
    return seen


def test_tail_sees_a_full_lifecycle(running: SpoolEnv) -> None:
    tail = _tail(running)
    try:
        deadline = time.monotonic() + 60
        _tail_ready(running, tail, deadline)
        client = running.client()
        rid = client.submit("sleep", {"seconds": 0.3, "tag": "t"})
        events = _events_for(tail, rid, "finished", deadline)
        client.wait(rid, timeout=30)   # collected only once tail has seen it published
        events += _events_for(tail, rid, "removed", deadline)
        # a junk file: tail reports its quarantine ("failed", with the reason)
        (running.spool.new / "junk.txt").write_text("not a request")
        failed = _events_for(tail, "junk.txt", "failed", deadline)
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(30) == 0
    finally:
        tail.kill()
    kinds = [e["event"] for e in events]
    assert kinds == ["queued", "started", "finished", "removed"], events
    assert events[1]["pid"] == running.workers[0].pid
    assert events[2]["ok"] is True and events[2]["duration_s"] >= 0.25
    assert "no reply can be addressed" in failed[-1]["reason"]


def test_worker_keeps_metrics_file(tmp_path) -> None:
    env = make_spool_env(tmp_path / "t", durable=False)
    metrics = tmp_path / "spoolops.prom"
    env.config_path.write_text(env.config_path.read_text().replace(
        "concurrency = 4", f"concurrency = 4\nmetrics_file = {metrics}"))
    try:
        env.start_worker()
        env.client().call("echo", {}, timeout=30)

        def served():
            try:
                text = metrics.read_text()
            except FileNotFoundError:
                return None
            return text if 'spoolops_served_total{op="echo",outcome="ok"} 1' in text else None
        text = wait_for(served, what="metrics file")
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"spoolops_requests", "spoolops_worker_up", "spoolops_served",
                "spoolops_operation_seconds"} <= names
    finally:
        env.close()
