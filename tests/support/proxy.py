"""A unix-socket proxy that loses answers: between a client and the
session's PostgreSQL server, it cuts a connection after the server
answered a statement that committed, before the answer arrives (a real
lost answer, as a network or a server restart would make one).

Trusts: the test that starts it.
"""

from __future__ import annotations

import os
import re
import select
import socket
import threading
import time
from collections import Counter
from pathlib import Path


class LossyProxy:
    """A unix-socket proxy in front of the server.  It cuts a connection
    right after the server answered a statement that committed, before the
    answer reaches the client -- a submit whose arguments carry
    ``"lose_submit": N``, a collect whose reply carries ``"lose_collect":
    N``, or the worker's claim (``claim_batch``) whose rows carry
    ``"lose_claim": N`` (each N once) -- and then refuses connections for
    ``outage_s``, as a server restarting would."""

    # (the quotes escaped too: inside an array parameter, as the worker's
    # answer in place sends the rows it read)
    SUBMIT = re.compile(rb'\\?"lose_submit\\?": (\d+)')
    COLLECT = re.compile(rb'"lose_collect": (\d+)')
    CLAIM = re.compile(rb'"lose_claim": (\d+)')

    def __init__(self, folder: Path, port: int, upstream: str, outage_s: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port, self.outage_s = folder, port, outage_s
        self.path = str(folder / f".s.PGSQL.{port}")
        self.upstream = upstream
        self.seen: set[bytes] = set()
        self.cut = {"submit": 0, "collect": 0, "claim": 0}
        # statements sent through it, by the function they call
        self.statements: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = False
        self._down_until = 0.0
        self._listener = self._listen()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock.bind(self.path)
        os.chmod(self.path, 0o777)
        sock.listen(64)
        return sock

    def _accept(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self._listener], [], [], 0.05)
            if time.monotonic() < self._down_until:
                continue
            if not os.path.exists(self.path):          # back up after an outage
                self._listener.close()
                self._listener = self._listen()
                continue
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self.upstream)
            except OSError:
                client.close()
                continue
            state = {"drop": False, "closed": False, "claim": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(client, server, state),
                             daemon=True).start()

    def _new(self, token: bytes, kind: str) -> bool:
        with self._lock:
            if token in self.seen:
                return False
            self.seen.add(token)
            self.cut[kind] += 1
            return True

    def _up(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                for match in self.SUBMIT.finditer(data):
                    if self._new(b"s" + match.group(1), "submit"):
                        state["drop"] = True
                if b"claim_batch" in data:
                    state["claim"] = True
                    with self._lock:
                        self.statements["claim_batch"] += data.count(b"claim_batch(")
                server.sendall(data)
        except OSError:
            pass
        finally:
            self._close(client, server, state)

    def _down(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        buffer = b""
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                buffer += data
                # whole messages only (type, length), so that ReadyForQuery is seen
                out = b""
                while len(buffer) >= 5:
                    length = int.from_bytes(buffer[1:5], "big")
                    if len(buffer) < 1 + length:
                        break
                    message, buffer = buffer[:1 + length], buffer[1 + length:]
                    for match in self.COLLECT.finditer(message):
                        if self._new(b"c" + match.group(1), "collect"):
                            state["drop"] = True
                    if state["claim"]:
                        for match in self.CLAIM.finditer(message):
                            if self._new(b"k" + match.group(1), "claim"):
                                state["drop"] = True
                        if message[:1] == b"Z":
                            state["claim"] = False
                    if state["drop"]:
                        if message[:1] == b"Z":       # the statement is over: cut
                            self._outage()
                            return
                        continue
                    out += message
                if out:
                    client.sendall(out)
        except OSError:
            pass
        finally:
            self._close(client, server, state)

    def _outage(self) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.outage_s
            try:
                os.unlink(self.path)          # a new connection: "no such file"
            except FileNotFoundError:
                pass

    @staticmethod
    def _close(client: socket.socket, server: socket.socket, state: dict) -> None:
        if state["closed"]:
            return
        state["closed"] = True
        for sock in (client, server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def stop(self) -> None:
        self._stop = True
        self._thread.join(2)
        self._listener.close()


# a web application's calls: one refused (TransportUnavailable: nothing was
# queued) is made again, as a new request, a little later


def proxy_for_worker(env, cluster, folder: Path, outage_s: float = 0.3) -> LossyProxy:
    """A ``LossyProxy`` in front of ``cluster`` that ``env``'s worker (its
    configuration; the clients keep theirs) connects through: start the
    worker after this."""
    proxy = LossyProxy(folder, cluster.port,
                       str(Path(cluster.host) / f".s.PGSQL.{cluster.port}"), outage_s)
    env.config_path.write_text(env.config_path.read_text().replace(
        f"host={cluster.host}", f"host={proxy.folder}"))
    return proxy
