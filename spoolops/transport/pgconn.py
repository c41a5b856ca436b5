"""Connections to the PostgreSQL queue: pools, listeners, the worker's lock.

Connections are not fork-safe (libpq shares the socket with the child), so
each process makes its own: ``Pools`` and ``shared_reply_listener`` notice a
new pid and start afresh, never touching the parent's.  A listening
connection is never pooled (LISTEN would leak to other borrowers) and never
runs queries while it waits (psycopg holds the connection's lock in
``notifies()``), so each listener owns one connection and one thread:

* ``ReplyListener`` (clients): one per process, LISTENing on the channel of
  its role's replies, waking the waiters of the ids it is told about; on a
  lost connection it reconnects and wakes every waiter to look again.
* ``IntakeListener`` (worker): LISTENs for new requests and holds the
  worker's session-level advisory lock on the same connection, so that the
  lock dies with the worker's process or connection and the worker notices
  at once.  A connection lost for longer than half of ``lock_grace`` ends
  the worker (fail-stop: other workers take its requests over after
  ``lock_grace``).

Errors become ``TransportUnavailable`` (a ``ConnectionError``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from ..errors import SpoolSetupError, TransportUnavailable
from .base import Waiter

log = logging.getLogger("spoolops.transport")

RECONNECT_S = (0.05, 0.2, 0.5, 1.0)   # backoff between attempts, then the last forever
EX_TEMPFAIL = 75


def connect(dsn: str, **options: Any) -> psycopg.Connection:
    """A dedicated autocommit connection; ``SpoolSetupError`` when this
    account may not connect (no such role or database, authentication
    refused: retrying will not help), else ``TransportUnavailable``."""
    try:
        return psycopg.connect(dsn, autocommit=True, **options)
    except psycopg.Error as exc:
        raise _connect_error(exc) from None


def _connect_error(exc: psycopg.Error) -> Exception:
    text = _first(exc)
    state = getattr(exc, "sqlstate", None) or ""
    refused = state.startswith("28") or state == "3D000" or any(
        word in text for word in ("does not exist", "authentication failed",
                                  "no pg_hba.conf entry"))
    if refused:
        return SpoolSetupError(f"the queue database refuses this account: {text}")
    return TransportUnavailable(f"cannot connect to the queue database: {text}")


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Pools:
    """This process's connection pool for one DSN, made after any fork."""

    def __init__(self, dsn: str, max_size: int = 8, options: str = "") -> None:
        self.dsn, self.max_size, self.options = dsn, max_size, options
        self._pool: ConnectionPool | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _get(self) -> ConnectionPool:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                kwargs: dict[str, Any] = {"autocommit": True}
                if self.options:
                    kwargs["options"] = self.options
                # one connection first, so that a refused account or a server
                # that is down is said at once, not after the pool's retries
                probe = {"options": self.options} if self.options else {}
                connect(self.dsn, **probe).close()
                # the parent's pool (if any) is left alone: closing it here
                # would close the parent's sockets
                self._pool = ConnectionPool(self.dsn, min_size=1, max_size=self.max_size,
                                            kwargs=kwargs, open=False, timeout=10.0,
                                            name=f"spoolops-{os.getpid()}")
                self._pool.open(wait=False)
                self._pid = os.getpid()
            return self._pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection; connection failures become ``TransportUnavailable``
        (the pool drops a broken connection when it comes back)."""
        try:
            with self._get().connection() as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise TransportUnavailable(f"the queue database is unreachable: {_first(exc)}") \
                from None
        except Exception as exc:
            if type(exc).__name__ == "PoolTimeout":
                raise TransportUnavailable(f"no connection to the queue database: {exc}") \
                    from None
            raise

    def run(self, work: Callable[[psycopg.Connection], Any], retry: bool = True) -> Any:
        """``work(conn)``, once more on a fresh connection if the first was
        broken (a restarted server): only for work that is safe to repeat."""
        try:
            with self.connection() as conn:
                return work(conn)
        except TransportUnavailable:
            if not retry:
                raise
        with self.connection() as conn:
            return work(conn)

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None


_pools: dict[tuple[str, int, str], Pools] = {}
_pools_lock = threading.Lock()


def shared_pools(dsn: str, max_size: int = 8, options: str = "") -> Pools:
    """The one ``Pools`` of this process for these settings: clients made
    per web request share it (and a pool is never collected on one of its
    own threads)."""
    key = (dsn, max_size, options)
    with _pools_lock:
        pools = _pools.get(key)
        if pools is None:
            pools = _pools[key] = Pools(dsn, max_size, options)
        return pools


def shutdown() -> None:
    """Stop this process's reply listeners and close its pools (before the
    database goes away on purpose, e.g. at the end of the demo)."""
    with _listeners_lock:
        listeners = list(_listeners.values()) if _listeners_pid == os.getpid() else []
        _listeners.clear()
    for listener in listeners:
        listener.stop()
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for item in pools:
        item.close()


def listen(conn: psycopg.Connection, channel: str) -> None:
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


class _PgWaiter(Waiter):
    def __init__(self, listener: ReplyListener, rid: str) -> None:
        self.listener, self.rid = listener, rid
        self.event = threading.Event()

    def wait(self, timeout: float) -> None:
        self.event.wait(timeout)
        self.event.clear()

    def close(self) -> None:
        self.listener.forget(self)


class ReplyListener:
    """One thread and connection per process: wakes waiters by request id."""

    READY_WAIT_S = 5.0

    def __init__(self, dsn: str, channel_of: Callable[[psycopg.Connection], str]) -> None:
        self.dsn, self.channel_of = dsn, channel_of
        self._waiters: dict[str, set[_PgWaiter]] = {}
        self._lock = threading.Lock()
        self._listening = threading.Event()   # LISTEN has been in place
        self._tried = threading.Event()       # the first connection was made or failed
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="spoolops-replies",
                                        daemon=True)
        self._thread.start()

    def expect(self, rid: str) -> _PgWaiter:
        waiter = _PgWaiter(self, rid)
        with self._lock:
            self._waiters.setdefault(rid, set()).add(waiter)
        # the first waiter of a process waits for LISTEN to be in place, so
        # that a reply to a request published next cannot pass unseen (when
        # the database is down, publishing says so at once and the caller's
        # own polling is the safety net)
        self._tried.wait(self.READY_WAIT_S)
        return waiter

    def forget(self, waiter: _PgWaiter) -> None:
        with self._lock:
            waiters = self._waiters.get(waiter.rid)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[waiter.rid]

    def _wake(self, rid: str | None) -> None:
        with self._lock:
            if rid is None:
                targets = [w for ws in self._waiters.values() for w in ws]
            else:
                targets = list(self._waiters.get(rid, ()))
        for waiter in targets:
            waiter.event.set()

    def _run(self) -> None:
        attempt = 0
        while not self._stop:
            try:
                conn = psycopg.connect(self.dsn, autocommit=True)
            except psycopg.Error as exc:
                if attempt == 0 and self._listening.is_set():
                    # (a first connection that fails is the caller's to report)
                    log.warning("event=reply_listener_down error=%r", _first(exc))
                self._tried.set()
                time.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
                attempt += 1
                continue
            try:
                listen(conn, self.channel_of(conn))
                self._listening.set()
                self._tried.set()
                if attempt:
                    log.info("event=reply_listener_back")
                attempt = 0
                self._wake(None)   # anything may have been missed meanwhile: look again
                while not self._stop:
                    for note in conn.notifies(timeout=1.0):
                        self._wake(note.payload)
            except psycopg.Error as exc:
                log.warning("event=reply_listener_lost error=%r", _first(exc))
                self._wake(None)
            finally:
                conn.close()

    def stop(self) -> None:
        self._stop = True
        self._thread.join(timeout=2.0)


_listeners: dict[tuple[str, str], ReplyListener] = {}
_listeners_pid = 0
_listeners_lock = threading.Lock()


def shared_reply_listener(dsn: str, channel_of: Callable[[psycopg.Connection], str]
                          ) -> ReplyListener:
    """This process's listener for ``dsn`` (a fresh one after fork)."""
    global _listeners_pid
    with _listeners_lock:
        if _listeners_pid != os.getpid():
            _listeners.clear()       # the parent's threads do not exist here
            _listeners_pid = os.getpid()
        key = (dsn, channel_of.__qualname__)
        listener = _listeners.get(key)
        if listener is None:
            listener = _listeners[key] = ReplyListener(dsn, channel_of)
        return listener


class IntakeListener:
    """The worker's listening connection, which also holds its advisory lock.

    ``fileno()`` is a pipe that turns readable when ids arrived (or the
    connection was lost and found again: ``take`` then returns None, asking
    for a full scan)."""

    def __init__(self, dsn: str, channel: str, lock_key: tuple[int, int],
                 grace_s: float,
                 on_locked: Callable[[psycopg.Connection], object] | None = None) -> None:
        self.dsn, self.channel, self.lock_key, self.grace_s = dsn, channel, lock_key, grace_s
        self.on_locked = on_locked   # run each time the lock is (re)taken
        self._ids: list[str] = []
        self._lost = False
        self._lock = threading.Lock()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False
        self.conn = self._connect_and_lock()
        self._thread = threading.Thread(target=self._run, name="spoolops-intake",
                                        daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._read_fd

    def _connect_and_lock(self) -> psycopg.Connection:
        conn = connect(self.dsn)
        try:
            got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", self.lock_key
                               ).fetchone()[0]
            if not got:
                raise TransportUnavailable("the worker's lock is still held by its old"
                                           " session")
            if self.on_locked is not None:
                self.on_locked(conn)
            listen(conn, self.channel)
        except BaseException:
            conn.close()
            raise
        return conn

    def take(self) -> list[str] | None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            ids, self._ids = self._ids, []
            lost, self._lost = self._lost, False
        return None if lost else ids

    def _signal(self) -> None:
        try:
            os.write(self._write_fd, b"n")
        except BlockingIOError:
            pass   # already readable

    def _run(self) -> None:
        while not self._stop:
            try:
                for note in self.conn.notifies(timeout=0.5):
                    with self._lock:
                        self._ids.append(note.payload)
                    self._signal()
                continue
            except psycopg.Error as exc:
                if self._stop:
                    return
                log.error("event=worker_connection_lost error=%r action=reconnect",
                          _first(exc))
            self._reconnect()

    def _reconnect(self) -> None:
        lost_at = time.monotonic()
        attempt = 0
        while not self._stop:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
            try:
                self.conn = self._connect_and_lock()
            except TransportUnavailable as exc:
                if time.monotonic() - lost_at > self.grace_s / 2:
                    # other workers treat this one as dead after lock_grace and
                    # take its requests over: stop before that, whatever runs
                    log.critical("event=worker_lock_lost for_s=%.1f error=%r action=exit"
                                 " (another worker takes over its requests)",
                                 time.monotonic() - lost_at, str(exc))
                    logging.shutdown()
                    os._exit(EX_TEMPFAIL)
                time.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
                attempt += 1
                continue
            log.warning("event=worker_connection_back after_s=%.2f",
                        time.monotonic() - lost_at)
            with self._lock:
                self._lost = True       # notifications may have been missed: rescan
            self._signal()
            return

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2.0)
        try:
            self.conn.close()        # ends the session: the advisory lock goes with it
        except psycopg.Error:
            pass
        os.close(self._read_fd)
        os.close(self._write_fd)
