"""Reply channels over PostgreSQL (issue 22): a reply wakes only the process
that waits for it, and no role can listen to another's processes.

Real server (the session's throwaway cluster), real roles (``web1``,
``web2``), the worker in its own process; listening sessions are plain
psycopg connections, as any program of a role could open.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg
import pytest
from support.env import WEB, WEB2, connect_as

from spoolops.transport.pg.conn import existing_reply_listener


def _heard(conn: psycopg.Connection, seconds: float) -> list[str]:
    payloads: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        payloads += [n.payload for n in conn.notifies(timeout=0.2, stop_after=100)]
    return payloads


def test_a_call_wakes_only_its_own_process(pgq) -> None:
    """``Client.call`` publishes while it waits: its reply is NOTIFYed on
    this process's own channel, and another process of the same role (a
    session LISTENing on the role's channel) hears nothing of it; a request
    published without a waiter (``submit``) is answered on the role's
    channel, which every process of the role hears."""
    other = connect_as(pgq, WEB)                        # another process of web1
    other.execute("SELECT spoolops.listen('reply')")
    pgq.start_worker()
    client = pgq.client(WEB)
    assert client.call("echo", {"n": 1}, timeout=30) == {"n": 1}
    rid = client.submit("echo", {"n": 2})
    assert client.wait(rid, timeout=30).result == {"n": 2}
    heard = _heard(other, 1.0)
    assert heard == [rid], heard                        # the submit's, not the call's
    listener = existing_reply_listener(client.transport.dsn, client.transport._reply_channel)
    assert listener is not None and len(listener.process) == 16


def test_a_role_cannot_listen_to_another_roles_process(pgq) -> None:
    """The process channel's name is made by the database from the caller's
    own role: web2 asking for web1's process's random part gets a channel of
    its own, and hears none of web1's replies; a random part that is not
    hex, or one for another kind of channel, is refused."""
    pgq.start_worker()
    victim = pgq.client(WEB)
    assert victim.call("echo", {}, timeout=30) == {}    # its listener is up
    process = existing_reply_listener(victim.transport.dsn,
                                      victim.transport._reply_channel).process
    spy = connect_as(pgq, WEB2)
    spy.execute("SELECT spoolops.listen('reply', %s)", (process,))
    spy.execute("SELECT spoolops.listen('reply')")
    for n in range(3):
        assert victim.call("echo", {"n": n}, timeout=30) == {"n": n}
        rid = victim.submit("echo", {"k": n})
        victim.wait(rid, timeout=30)
    assert _heard(spy, 1.0) == []
    for bad in ("reply'); LISTEN x; --", "ABCDEF0123456789", "0123", "g" * 16):
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            spy.execute("SELECT spoolops.listen('reply', %s)", (bad,))
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        spy.execute("SELECT spoolops.listen('events', %s)", (process,))


def test_a_reply_to_a_request_of_another_process_still_comes(pgq) -> None:
    """``spoolops submit`` in one process, the wait in another: the request
    was published with no waiter, so its reply comes on the role's channel,
    and the waiting process is woken when it comes -- not by its backstop
    poll (every 2 s)."""
    pgq.start_worker()
    code = "from spoolops.client import Client; print(Client().submit('sleep', {'seconds': 1}))"
    done = subprocess.run([sys.executable, "-c", code], env=pgq.env(WEB),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    rid = done.stdout.strip()
    started = time.monotonic()
    reply = pgq.client(WEB).wait(rid, timeout=30)
    assert reply.ok, reply
    assert time.monotonic() - started < 1.8
