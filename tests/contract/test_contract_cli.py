"""Contract: the operator's commands in their ``--json`` form tell the same
story on every transport -- ``status`` counts, ``ls <state>`` ids, ``show``
state and reply, ``requeue`` of a failed request, ``janitor --dry-run``.

The commands run as the queue's own user (``queue.spoolops``: the worker's
configuration).  Where the transports name things differently the test
uses each one's own names (``OperatorSide.place_of``; ``ls`` takes the
words of ``STATE_WORDS`` on both): the queued state lives in ``new/`` on
the spool and in rows ``queued`` in PostgreSQL, and so on.

The queue runs one request at a time (``concurrency = 1``): a ``hold``
request keeps the worker busy, so what is queued stays queued while the
commands look.  ``reply_ttl`` and ``failed_ttl`` are one second, so that
the janitor's dry run has something it would remove.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.contract import DESCRIBED, Handles, entry_of
from support.env import TRANSPORTS, queue_for
from support.waiting import wait_for

from spoolops.transport.base import STATE_WORDS, STATES

JANITOR = "[janitor]\nreply_ttl = 1s\nfailed_ttl = 1s\n"
WORD_OF = {state: word for word, state in STATE_WORDS.items()}
REQUEUED_TO = {"spool": "running", "postgresql": "queued"}


@pytest.fixture(params=TRANSPORTS)
def single(request, tmp_path: Path):
    """A queue of each transport whose worker runs one request at a time."""
    queue = queue_for(request, tmp_path, request.param, durable=True, concurrency=1,
                      extra=JANITOR)
    queue.start_worker()
    return queue


def _json(queue, *args: str):
    done = queue.spoolops(*args)
    assert done.returncode == 0, (args, done.returncode, done.stdout, done.stderr)
    return json.loads(done.stdout)


def _ls(queue, word: str) -> list[dict]:
    done = queue.spoolops("ls", word, "--json")
    assert done.returncode == 0, (word, done.stderr)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _populate(queue, request, tmp_path: Path) -> tuple[dict[str, set[str]], Path]:
    """One answered (reply not collected), one running (held), two queued,
    one kept aside (failed: as the worker's quarantine keeps it)."""
    client = queue.client()
    answered = client.submit("sleep", {"seconds": 0, "tag": "answered"})
    wait_for(lambda: queue.count("replies") == 1, what="the first reply")
    release = tmp_path / "release"
    running = client.submit("hold", {"release": str(release), "tag": "held"})
    wait_for(lambda: client.transport.progress_of(running), what="the hold to run")
    queued = {client.submit("sleep", {"seconds": 0, "tag": f"q{n}"}) for n in range(2)}
    failed = client.submit("sleep", {"seconds": 0, "tag": "kept aside"})
    # the worker is busy: it claims nothing while the hold runs
    keeper = Handles(queue, request).worker(lock=False)
    assert keeper.quarantine(entry_of(keeper, failed), "kept aside by the CLI contract",
                             claimed=False).moved
    expected = {"queued": queued, "running": {running}, "failed": {failed},
                "replies": {answered}}
    assert {s: queue.count(s) for s in STATES} == {s: len(v) for s, v in expected.items()}
    return expected, release


@pytest.mark.slow
def test_status_ls_and_show_agree(single, request, tmp_path: Path) -> None:
    """``status --json`` counts, ``ls WORD --json`` ids and ``show ID --json``
    states agree with what was done, state by state, in the transport's
    own words."""
    expected, release = _populate(single, request, tmp_path)
    transport = single.transport()
    status = _json(single, "status", "--json")
    assert status["worker"]["alive"] is True and status["problems"] == []
    for state in STATES:
        assert status[state]["count"] == len(expected[state]), (state, status[state])
        assert status[state]["oldest_age_s"] >= 0
        rows = _ls(single, WORD_OF[state])
        assert {row["id"] for row in rows} == expected[state], (state, rows)
        assert all(row["state"] == state for row in rows)
        for rid in expected[state]:
            info = _json(single, "show", rid, "--json")
            assert info["id"] == rid and info["state"] == DESCRIBED[state], (state, info)
    # the places each transport names for its states
    places = {state: transport.place_of(state) for state in STATES}
    if single.kind == "spool":
        assert places == {"queued": "new/", "running": "active/", "failed": "failed/",
                          "replies": "replies/"}
    else:
        assert places == {"queued": "queued", "running": "running", "failed": "failed",
                          "replies": "answered"}
    # 'ls' with no state lists all four, each once
    done = single.spoolops("ls", "--json")
    assert done.returncode == 0, done.stderr
    everything = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert sorted(row["id"] for row in everything) == sorted(set().union(*expected.values()))
    # show: the reply of the answered one, the reason of the failed one, the run of the held one
    (answered,) = expected["replies"]
    info = _json(single, "show", answered, "--json")
    assert info["reply"]["ok"] is True and info["reply"]["result"]["tag"] == "answered"
    (failed,) = expected["failed"]
    assert "kept aside by the CLI contract" in str(_json(single, "show", failed, "--json")
                                                    ["reason"])
    (running,) = expected["running"]
    run = _json(single, "show", running, "--json")["run"]
    assert run["progress"]["done"] == 1 and run["progress"]["total"] == 2
    missing = single.spoolops("show", "no-such-request", "--json")
    assert missing.returncode == 1 and missing.stdout == ""
    release.touch()
    # the spool retires a request just before it publishes the reply: wait for both
    wait_for(lambda: single.quiet() and single.count("replies") == 4,
             what="the queue to drain")
    status = _json(single, "status", "--json")
    assert (status["queued"]["count"], status["running"]["count"]) == (0, 0)
    assert status["replies"]["count"] == 1 + 1 + 2        # nobody collected them
    assert status["failed"]["count"] == 1


def test_requeue_of_a_failed_request_is_answered(single, request, tmp_path: Path) -> None:
    """``requeue`` puts a failed request back (and refuses one that is not
    failed); the worker then answers it, to the client that submitted it."""
    expected, release = _populate(single, request, tmp_path)
    (failed,) = expected["failed"]
    (queued_one, _) = sorted(expected["queued"])
    # only a failed (or orphaned) request can be requeued
    refused = single.spoolops("requeue", queued_one)
    assert refused.returncode == 1 and "requeued" not in refused.stdout
    done = single.spoolops("requeue", failed)
    assert done.returncode == 0, done.stderr
    assert f"requeued {failed} (was in {single.transport().place_of('failed')})" in done.stdout
    # where it goes back differs: the spool never puts it back through new/
    # (a member could swap it there) but into active/ with no run record, for
    # the worker to adopt; PostgreSQL puts the row back in line, queued
    back = REQUEUED_TO[single.kind]
    assert _json(single, "show", failed, "--json")["state"] == back
    assert failed in {row["id"] for row in _ls(single, WORD_OF[back])}
    assert _ls(single, WORD_OF["failed"]) == []
    assert single.spoolops("requeue", failed).returncode == 1    # not failed any more
    release.touch()
    reply = single.client().wait(failed, timeout=30)
    assert reply.ok is True and reply.result["tag"] == "kept aside"
    wait_for(lambda: single.quiet(), what="the queue to drain")
    assert _json(single, "status", "--json")["failed"]["count"] == 0


def test_janitor_dry_run_removes_nothing(single, request, tmp_path: Path) -> None:
    """With a reply and a failed entry past their ttl, ``janitor --json
    --dry-run`` says it would remove them and removes nothing; the real run
    then removes them."""
    expected, release = _populate(single, request, tmp_path)
    release.touch()
    wait_for(lambda: single.quiet() and single.count("replies") == 4,
             what="the queue to drain")
    transport = single.transport()
    oldest = max(e.mtime for state in ("replies", "failed") for e in transport.entries(state))
    wait_for(lambda: time.time() > oldest + 1.5, what="the entries to pass their ttl")
    before = {s: single.count(s) for s in STATES}
    assert before == {"queued": 0, "running": 0, "failed": 1, "replies": 4}
    report = _json(single, "janitor", "--json", "--dry-run")
    assert report["dry_run"] is True and report["worker"]["alive"] is True
    assert report["actions"], report
    assert all(a["done"] is False and a["error"] is None for a in report["actions"]), report
    (failed,) = expected["failed"]
    named = " ".join(a["path"] for a in report["actions"])
    assert failed in named
    assert all(rid in named for rid in expected["replies"] | expected["queued"])
    assert {s: single.count(s) for s in STATES} == before
    assert _json(single, "show", failed, "--json")["state"] == "failed"
    report = _json(single, "janitor", "--json")
    assert report["dry_run"] is False and all(a["done"] for a in report["actions"]), report
    assert {s: single.count(s) for s in STATES} == {s: 0 for s in STATES}
