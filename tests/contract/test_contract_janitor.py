"""Contract: the janitor's report and exit code, on every transport (the
``queue`` / ``served`` fixtures).

- on a clean queue with a live worker: nothing to do, exit 0;
- by age alone (its injectable clock, ``now``): an uncollected reply is
  removed once older than ``reply_ttl``, a request queued longer than
  ``stuck_after`` is reported stuck and left queued; at an earlier time
  nothing is done or reported;
- beside a live worker, a running request is never touched; one running
  longer than ``stuck_after`` is reported (``running_long``), not stopped.

Real worker processes, the janitor as the command (``queue.spoolops``) or
in-process (``run_janitor``, for its clock), with the worker's
configuration.  How the janitor recovers a killed worker's requests is in
``test_contract_recovery.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from support.waiting import wait_for

from spoolops.janitor import run_janitor

DAY = 86400.0


def test_clean_queue_exits_zero(served) -> None:
    assert served.client().call("echo", {"x": 1}, timeout=30) == {"x": 1}
    proc = served.spoolops("janitor", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["worker"]["alive"] is True and report["stuck"] is False
    assert report["actions"] == [] and report["findings"] == [], report
    text = served.spoolops("janitor")
    assert text.returncode == 0 and "nothing to do" in text.stdout, text.stdout


def test_injected_clock_ages_replies_and_queued_requests(queue) -> None:
    """No worker: a reply nobody collected and a request still queued.  A
    minute on, nothing is due; two days on, the reply goes and the queued
    request is reported stuck (and kept)."""
    client = queue.client()
    worker = queue.start_worker()
    answered = client.submit("echo", {"left": "uncollected"})
    wait_for(lambda: queue.count("replies") == 1, what="the reply")
    assert queue.stop_worker(worker) == 0
    queued = client.submit("echo", {"left": "queued"})

    soon = run_janitor(queue.config, dry_run=True, now=lambda: time.time() + 60)
    assert soon.actions == [] and soon.findings == [], soon.to_dict()
    assert not soon.stuck and soon.worker["alive"] is False

    later = run_janitor(queue.config, dry_run=True, now=lambda: time.time() + 2 * DAY)
    assert [a.done for a in later.actions] == [False] and answered in later.actions[0].path
    assert queue.count("replies") == 1                  # a dry run removes nothing

    later = run_janitor(queue.config, now=lambda: time.time() + 2 * DAY)
    assert later.stuck, later.to_dict()
    assert [(a.done, a.error) for a in later.actions] == [(True, None)], later.to_dict()
    assert answered in later.actions[0].path
    assert [f.kind for f in later.findings] == ["stuck"]
    assert queued in later.findings[0].path
    assert client.transport.collect(answered) is None
    assert queue.count("replies") == 0 and queue.count("queued") == 1
    # still served when a worker comes
    queue.start_worker()
    assert client.wait(queued, timeout=30).result == {"left": "queued"}


def test_live_worker_running_request_is_left_alone(served, tmp_path: Path) -> None:
    client = served.client()
    release = tmp_path / "release"
    rid = client.submit("hold", {"release": str(release), "tag": "busy"})
    wait_for(lambda: client.transport.progress_of(rid), what="hold to run")
    report = run_janitor(served.config, now=lambda: time.time() + 60)
    assert report.worker["alive"] is True and not report.stuck, report.to_dict()
    assert report.actions == [] and report.findings == [], report.to_dict()
    assert served.transport().describe(rid)["state"] == "running"
    # much later (by the clock), the same request counts as running too long
    late = run_janitor(served.config, now=lambda: time.time() + 3600)
    assert late.stuck and [f.kind for f in late.findings] == ["running_long"], late.to_dict()
    assert rid in late.findings[0].path
    assert late.actions == []
    assert served.transport().describe(rid)["state"] == "running"
    release.touch()
    assert client.wait(rid, timeout=60).result["tag"] == "busy"
