"""Contract: the operator's views against a real worker tell the same story
on every transport -- ``status --prometheus`` numbers, ``show`` of a
running request (its worker, target and progress), ``ls`` oldest first
with its fields, ``tail --json`` following a request's life and a
withdrawal, and the worker's ``metrics_file``.

The commands run as the operator (``queue.spoolops``: the worker's
configuration); requests come from the web client (``queue.client()``).
What only the spool shows (its run files, a junk file's quarantine) is in
``test_inspect.py``.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.tail import events_for, start_tail, tail_ready
from support.waiting import wait_for

from spoolops import UnknownOp


def _metrics(env) -> dict[tuple[str, tuple], float]:
    result = env.spoolops("status", "--prometheus")
    samples = {}
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_prometheus_numbers_match_the_queue(queue) -> None:
    client = queue.client()
    queued = [client.submit("echo", {"n": n}) for n in range(3)]
    m = _metrics(queue)
    assert m[("spoolops_requests", (("state", "queued"),))] == 3
    assert m[("spoolops_worker_up", ())] == 0
    assert m[("spoolops_oldest_age_seconds", (("state", "queued"),))] >= 0
    queue.start_worker()
    for rid in queued:
        client.wait(rid, timeout=30)
    with pytest.raises(UnknownOp):                 # the failure is what is counted
        client.call("no_such_op", {}, timeout=30)
    client.submit("echo", {"left": 1})
    wait_for(lambda: queue.count("replies") == 1, what="the uncollected reply")

    def settled():
        m = _metrics(queue)
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


def test_show_running_request_names_pid_target_and_progress(served, tmp_path) -> None:
    client = served.client()
    release = tmp_path / "release"
    rid = client.submit("hold", {"release": str(release), "target": "t1", "tag": "x"})
    progress = wait_for(lambda: client.transport.progress_of(rid), what="the op's progress")
    assert (progress["done"], progress["total"]) == (1, 2)
    pid = served.workers[0].pid
    shown = served.spoolops("show", rid[:20])
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "state:    running" in text
    assert f"by worker pid {pid}" in text and "target t1" in text, text
    assert "progress: [###############...............]  50.0%" in text, text
    info = json.loads(served.spoolops("show", rid, "--json").stdout)
    assert info["state"] == "running" and info["run"]["started_at"]
    assert info["run"]["pid"] == pid and info["run"]["targets"] == ["t1"]
    assert info["run"]["progress"]["total"] == 2
    listing = served.spoolops("ls", "active").stdout
    assert rid in listing and "hold" in listing and "t1" in listing, listing
    release.touch()
    assert client.wait(rid, timeout=60).ok


def test_ls_oldest_first_with_fields(queue) -> None:
    client = queue.client()
    first = client.submit("update_headers", {"filename": "a.fits", "values": {}}, priority=2)
    second = client.submit("echo", {})
    queue.set_queued_time(first, time.time() - 60)       # the first is the older
    lines = queue.spoolops("ls", "new").stdout.splitlines()
    assert lines[0].startswith("state")
    assert first in lines[1] and "update_headers" in lines[1] and "a.fits" in lines[1], lines
    assert second in lines[2] and "echo" in lines[2], lines
    rows = [json.loads(line) for line in queue.spoolops("ls", "--json").stdout.splitlines()]
    assert [r["id"] for r in rows] == [first, second]
    assert rows[0]["priority"] == 2 and rows[0]["user"]
    assert rows[0]["age_s"] >= 59 and rows[0]["state"] == "queued"










def test_tail_follows_a_request_and_a_withdrawal(queue) -> None:
    """A request withdrawn while queued: queued, then removed.  A request
    served: queued, started (by the worker's pid), finished (ok, with its
    duration).  (That a collected reply is an event too is the spool's
    alone: PostgreSQL says nothing of a collect -- every NOTIFY wakes every
    listening session.)"""
    tail = start_tail(queue)
    try:
        deadline = time.monotonic() + 20          # events come within milliseconds
        tail_ready(queue, tail, deadline)
        client = queue.client()
        withdrawn = client.submit("echo", {"withdrawn": 1})
        assert client.cancel(withdrawn) is True
        gone = events_for(tail, withdrawn, "removed", deadline)
        worker = queue.start_worker()
        rid = client.submit("sleep", {"seconds": 0.3, "tag": "t"})
        events = events_for(tail, rid, "finished", deadline)
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(30) == 0
    finally:
        tail.kill()
    assert [e["event"] for e in gone] == ["queued", "removed"], gone
    assert [e["event"] for e in events] == ["queued", "started", "finished"], events
    assert events[0]["op"] == "sleep"
    assert events[1]["pid"] == worker.pid
    assert events[2]["ok"] is True and events[2]["duration_s"] >= 0.25
    assert client.wait(rid, timeout=30).result["tag"] == "t"


def test_worker_keeps_metrics_file(queue, tmp_path) -> None:
    metrics = tmp_path / "spoolops.prom"
    text = queue.config_path.read_text()
    assert "concurrency = 4" in text
    queue.config_path.write_text(text.replace(
        "concurrency = 4", f"concurrency = 4\nmetrics_file = {metrics}"))
    queue.start_worker()
    queue.client().call("echo", {}, timeout=30)

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
