"""``spoolops tail --json`` as tests follow it: started in its own process,
its events read with deadlines, made sure to be following before a test
acts.  Any environment of ``support.env`` (its ``env()`` runs the command
as the queue's operator)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from .waiting import Lines


def start_tail(env) -> subprocess.Popen:
    """``spoolops tail --json`` on ``env``; its lines in ``tail.lines``."""
    tail = subprocess.Popen([sys.executable, "-m", "spoolops", "tail", "--json"],
                            env=env.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    tail.lines = Lines(tail.stdout)  # type: ignore[attr-defined]
    return tail


def next_event(tail: subprocess.Popen, until: float) -> dict | None:
    """The next event tail prints, or None if it prints none before ``until``."""
    line = tail.lines.next(until)  # type: ignore[attr-defined]
    return json.loads(line) if line else None


def tail_ready(env, tail: subprocess.Popen, deadline: float) -> None:
    """tail follows once it reports something: probe (a request queued and
    withdrawn, or served if a worker takes it first) until it does."""
    client = env.client()
    while next_event(tail, time.monotonic() + 1.0) is None:
        assert time.monotonic() < deadline, "tail never reported an event"
        client.cancel(client.submit("echo", {"probe": 1}))


def events_for(tail: subprocess.Popen, key: str, last: str, deadline: float) -> list[dict]:
    """The events tail prints for id ``key``, up to the first ``last`` one."""
    seen: list[dict] = []
    while not seen or seen[-1]["event"] != last:
        event = next_event(tail, deadline)
        assert event is not None, f"tail printed no more events: {seen}"
        if event.get("id") == key:
            seen.append(event)
    return seen
