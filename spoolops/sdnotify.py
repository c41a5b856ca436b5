"""systemd's notify protocol, for a worker run as ``Type=notify`` with
``WatchdogSec``: ``READY=1`` once it serves, ``WATCHDOG=1`` from its main
loop, ``STOPPING=1`` when it stops.  A worker whose loop hangs (a deadlock,
a stopped process, a filesystem that never answers) stops pinging, and
systemd kills and restarts it; the next start recovers what it held.

A datagram to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or
an abstract name written with a leading ``@``); nothing at all when it is
unset (not under systemd).  ``$WATCHDOG_USEC`` is the watchdog's period (the
loop pings at half of it); ``$WATCHDOG_PID``, when set, names the process
that must ping (a child that inherited the environment does not).

Trusts: the environment systemd (or a test) gives the process.  What it
sends says nothing about any request.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def _address(env: Mapping[str, str]) -> str | None:
    name = env.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return "\0" + name[1:]          # Linux's abstract namespace
    return name if name.startswith("/") else None


class Notifier:
    """This process's link to systemd (inert when not run by it)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env)
        self.interval: float | None = None   # seconds between watchdog pings
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
            pid = env.get("WATCHDOG_PID")
            if usec > 0 and (pid is None or int(pid) == os.getpid()):
                # half the period, as sd_watchdog_enabled(3) advises: one late
                # ping is not yet a dead worker
                self.interval = usec / 1e6 / 2
        except ValueError:
            pass
        if self.address is None:
            self.interval = None
        self._next = 0.0
        self._sock: socket.socket | None = None

    def send(self, *fields: str) -> bool:
        """One message (``KEY=value`` lines); False if it could not go."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX,
                                           socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:
            # systemd restarting, or no socket any more: the next ping tries
            # again on a fresh socket
            self.close()
            return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")
        self._next = 0.0
        self.ping()

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def due_in(self) -> float | None:
        """Seconds until the next ping is due (None: no watchdog)."""
        if self.interval is None:
            return None
        return max(0.0, self._next - time.monotonic())

    def ping(self) -> None:
        """``WATCHDOG=1`` if one is due: called from the main loop only, so
        that a loop that hangs stops the pings."""
        if self.interval is None:
            return
        now = time.monotonic()
        if now >= self._next:
            self.send("WATCHDOG=1")
            self._next = now + self.interval

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
