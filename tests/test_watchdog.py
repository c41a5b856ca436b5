"""The worker and systemd's watchdog (``Type=notify``, ``WatchdogSec``): the
worker says ``READY=1`` once it serves, then ``WATCHDOG=1`` from its main
loop at half the period -- and nothing while it is frozen, so that systemd
kills and restarts a hung worker.  The test plays systemd: a datagram
socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract name with a
leading ``@``), ``$WATCHDOG_USEC`` the period.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import time

import pytest

from spoolops.sdnotify import Notifier

PERIOD_S = 0.6     # WatchdogSec: pings every 0.3 s


def _listen(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:] if name.startswith("@") else name)
    return sock


def _messages(sock: socket.socket, for_s: float) -> list[tuple[float, str]]:
    """What arrives within ``for_s`` seconds, with its time of arrival."""
    out = []
    end = time.monotonic() + for_s
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        out.append((time.monotonic(), data.decode()))
    return out


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_the_worker_feeds_the_watchdog_only_while_its_loop_turns(spool_env, tmp_path,
                                                                 abstract: bool) -> None:
    name = f"@spoolops-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else \
        str(tmp_path / "notify.sock")
    sock = _listen(name)
    try:
        worker = spool_env.start_worker(NOTIFY_SOCKET=name,
                                        WATCHDOG_USEC=str(int(PERIOD_S * 1e6)))
        first = _messages(sock, 1.5)
        assert first, "nothing sent to NOTIFY_SOCKET"
        assert first[0][1].splitlines()[0] == "READY=1", first[0]
        pings = [at for at, text in first if text == "WATCHDOG=1"]
        assert len(pings) >= 3, first
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < PERIOD_S, f"pings {gaps} apart: systemd would kill it"
        # a frozen worker pings no more (systemd would kill it after PERIOD_S)
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            _messages(sock, 0.1)             # what was on its way
            assert _messages(sock, 3 * PERIOD_S) == []
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        assert [text for _, text in _messages(sock, 1.0)].count("WATCHDOG=1") >= 2
        assert spool_env.client().call("echo", {"alive": 1}, timeout=30) == {"alive": 1}
        spool_env.stop_worker(worker)
        assert "STOPPING=1" in [text for _, text in _messages(sock, 0.5)]
    finally:
        sock.close()


def test_no_socket_no_watchdog_and_a_childs_environment_is_not_its_own() -> None:
    """Not under systemd (no NOTIFY_SOCKET): nothing is sent; WATCHDOG_PID
    naming another process (a child that inherited the variables): no pings."""
    assert Notifier({}).interval is None and not Notifier({}).send("READY=1")
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000",
                     "WATCHDOG_PID": str(os.getpid() + 1)}).interval is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000",
                     "WATCHDOG_PID": str(os.getpid())}).interval == 0.5
    assert Notifier({"NOTIFY_SOCKET": "relative", "WATCHDOG_USEC": "1000000"}).interval \
        is None
