"""Connections to the PostgreSQL queue: pools, listeners, the worker's lock.

Connections are not fork-safe (libpq shares the socket with the child), so
each process makes its own: ``Pools`` and ``shared_reply_listener`` notice a
new pid and start afresh, never touching the parent's.  A listening
connection is never pooled (LISTEN would leak to other borrowers) and never
runs queries while it waits (psycopg holds the connection's lock in
``notifies()``), so each listener owns one connection and one thread:

* ``ReplyListener`` (clients): one per process, LISTENing on the channel of
  its role's replies and on the process's own (``process``: the random part
  of its name, new in every process; the replies to requests it published
  while waiting for them come there, and wake no other process), waking the
  waiters of the ids it is told about; on a lost connection it reconnects
  and wakes every waiter to look again.
* ``IntakeListener`` (worker): LISTENs for new requests and holds the
  worker's session-level advisory lock on the same connection, so that the
  lock dies with the worker's process or connection and the worker notices
  at once.  The key is random and new on every connection, and the worker
  registers it with its backend's pid (``on_locked``): liveness is that pid
  holding that key (``pg.schema.Names.lock_held``), which no other role's
  session can fake -- taking a key (any role may take any key, and every
  key is visible in ``pg_locks``) proves nothing.  A connection lost for
  longer than half of ``lock_grace`` ends the worker (fail-stop: other
  workers take its requests over after ``lock_grace``), and so does a
  registration found fenced (``WorkerFenced``: another worker took this
  one's requests over while it was frozen or cut off).

Every session runs with ``SESSION_OPTIONS`` (``search_path = pg_catalog,
pg_temp``: nothing planted in a schema on a default path is ever called).
A pooled connection that has something to read while idle (a server's
goodbye) is never sent on, and a server that refuses new sessions is said at
once (``NotSent``: nothing was sent).

Errors become ``TransportUnavailable`` (a ``ConnectionError``).
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from ...errors import SpoolSetupError, TransportUnavailable
from ..base import Waiter

log = logging.getLogger("spoolops.transport")

RECONNECT_S = (0.05, 0.2, 0.5, 1.0)   # backoff between attempts, then the last forever
EX_TEMPFAIL = 75

# -- session settings: every session the transport opens ------------------------
# search_path: nothing but the catalog (and this session's own temporary
# objects, last), so that no function or operator any role planted in a
# schema on a default path (``public``, writable by every role up to
# PostgreSQL 14) is ever called in place of a built-in; the transport names
# its own objects with their schema.  idle_in_transaction_session_timeout:
# no session of ours idles in a transaction.  After the DSN's own options
# (and $PGOPTIONS): the last -c of a name wins.
SESSION_OPTIONS = ("-c search_path=pg_catalog,pg_temp"
                   " -c idle_in_transaction_session_timeout=60s")
CONNECT_TIMEOUT_S = 5      # unless the DSN or $PGCONNECT_TIMEOUT says otherwise
POOL_WAIT_S = 0.5          # for an idle pooled connection, before asking if the server is up


def session_kwargs(dsn: str, options: str = "") -> dict[str, Any]:
    """The keywords of ``psycopg.connect`` for a session of the transport."""
    try:
        given = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        given = {}
    ours = " ".join(part for part in (str(given.get("options") or os.environ.get(
        "PGOPTIONS", "")), SESSION_OPTIONS, options) if part)
    kwargs: dict[str, Any] = {"options": ours}
    if "connect_timeout" not in given and not os.environ.get("PGCONNECT_TIMEOUT"):
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
    return kwargs


def connect(dsn: str, **options: Any) -> psycopg.Connection:
    """A dedicated autocommit connection; ``SpoolSetupError`` when this
    account may not connect (no such role or database, authentication
    refused: retrying will not help), else ``TransportUnavailable``."""
    kwargs = session_kwargs(dsn, options.pop("options", ""))
    kwargs.update(options)
    try:
        return psycopg.connect(dsn, autocommit=True, **kwargs)
    except psycopg.Error as exc:
        raise _connect_error(exc) from None


class NotSent(TransportUnavailable):
    """No connection to send on: nothing was sent (so nothing was done)."""


def _connect_error(exc: psycopg.Error) -> Exception:
    text = _first(exc)
    state = getattr(exc, "sqlstate", None) or ""
    refused = state.startswith("28") or state in ("3D000", "42501") or any(
        word in text for word in ("does not exist", "authentication failed",
                                  "no pg_hba.conf entry", "permission denied for database"))
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
                kwargs: dict[str, Any] = {"autocommit": True,
                                          **session_kwargs(self.dsn, self.options)}
                # one connection first, so that a refused account or a server
                # that is down is said at once, not after the pool's retries
                connect(self.dsn, options=self.options).close()
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
        """A pooled connection that looked alive before anything was sent on
        it: ``NotSent`` while getting it (a server that is down is said at
        once, not after the pool's wait), ``TransportUnavailable`` for a
        connection failure of the work (which may or may not have been done;
        the pool drops a broken connection when it comes back)."""
        pool = self._get()
        conn = self._healthy(pool)
        try:
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise TransportUnavailable(f"the queue database is unreachable: {_first(exc)}") \
                from None
        finally:
            pool.putconn(conn)

    def _healthy(self, pool: ConnectionPool) -> psycopg.Connection:
        for _ in range(self.max_size + 1):
            try:
                try:
                    conn = pool.getconn(timeout=POOL_WAIT_S)
                except PoolTimeout:
                    if not self.reachable():
                        raise NotSent("the queue database is unreachable") from None
                    conn = pool.getconn()
            except PoolTimeout as exc:
                raise NotSent(f"no connection to the queue database: {exc}") from None
            if not _stale(conn):
                return conn
            # something came on an idle connection: the server's goodbye (a
            # restart, a terminated backend) -- never send on it
            conn.close()
            pool.putconn(conn)
            if not self.reachable():
                raise NotSent("the queue database is unreachable (it closed this"
                              " process's connections and refuses new ones)")
        raise NotSent("no live connection to the queue database")

    def reachable(self) -> bool:
        """Whether a new session can be opened now (on failure paths only)."""
        try:
            connect(self.dsn, options=self.options).close()
        except (TransportUnavailable, SpoolSetupError):
            return False
        return True

    def run(self, work: Callable[[psycopg.Connection], Any], retry: bool = True) -> Any:
        """``work(conn)``, once more on a fresh connection if the first was
        broken (a restarted server) and the server answers again: only for
        work that is safe to repeat."""
        try:
            with self.connection() as conn:
                return work(conn)
        except NotSent:
            raise
        except TransportUnavailable:
            if not retry or not self.reachable():
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


def listen(conn: psycopg.Connection, channel: str, process: str | None = None) -> None:
    """LISTEN on ``channel``; on a ``pg.schema.DbChannel``, whose real name
    only the database says, through the schema's ``listen`` function
    (``process``: the channel of this process's own, of that random part)."""
    listen_sql = getattr(channel, "listen_sql", None)
    if listen_sql is not None:
        conn.execute(listen_sql() if process is None else listen_sql(process))
    else:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


def _stale(conn: psycopg.Connection) -> bool:
    """An idle connection that has something to read (or none at all)."""
    if conn.closed or conn.broken:
        return True
    try:
        return bool(select.select([conn.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return True


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
        # the random part of this process's own reply channel (see reply_to)
        self.process = secrets.token_hex(8)
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

    def reply_to(self, rid: str) -> str | None:
        """Where the reply to ``rid`` should be NOTIFYed: this process's own
        channel while somebody here waits for it (``Client.call``: waiting
        before the request is published), with LISTEN in place; else None,
        the role's channel (any process of the role may wait for it)."""
        if not self._listening.is_set():
            return None
        with self._lock:
            return self.process if rid in self._waiters else None

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
                conn = psycopg.connect(self.dsn, autocommit=True, **session_kwargs(self.dsn))
            except psycopg.Error as exc:
                if attempt == 0 and self._listening.is_set():
                    # (a first connection that fails is the caller's to report)
                    log.warning("event=reply_listener_down error=%r", _first(exc))
                self._tried.set()
                time.sleep(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)])
                attempt += 1
                continue
            try:
                channel = self.channel_of(conn)
                listen(conn, channel)
                if getattr(channel, "listen_sql", None) is not None:
                    listen(conn, channel, self.process)
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


def existing_reply_listener(dsn: str, channel_of: Callable[[psycopg.Connection], str]
                            ) -> ReplyListener | None:
    """This process's listener for ``dsn`` if it has one (none is made)."""
    with _listeners_lock:
        if _listeners_pid != os.getpid():
            return None
        return _listeners.get((dsn, channel_of.__qualname__))


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


class WorkerFenced(Exception):
    """This worker's registration says another worker took its requests over
    (or is gone): it must stop at once, whatever it runs."""


class IntakeListener:
    """The worker's listening connection, which also holds its advisory lock.

    ``fileno()`` is a pipe that turns readable when ids arrived (or the
    connection was lost and found again: ``take`` then returns None, asking
    for a full scan)."""

    def __init__(self, dsn: str, channel: str, grace_s: float,
                 on_locked: Callable[[psycopg.Connection, int], object]) -> None:
        self.dsn, self.channel, self.grace_s = dsn, channel, grace_s
        # run on the locked connection each time the lock is (re)taken, with
        # the key: registers it and this backend's pid (WorkerFenced: stop)
        self.on_locked = on_locked
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
            # a fresh random key per connection: one a squatter saw in
            # pg_locks is never needed again (typed and schema-qualified, so
            # that no function planted in a schema on the path is called)
            for _ in range(8):
                key = secrets.randbelow(2**63 - 1) + 1
                if conn.execute("SELECT pg_catalog.pg_try_advisory_lock(%s::bigint)",
                                (key,)).fetchone()[0]:
                    break
            else:
                raise TransportUnavailable("no free advisory key for the worker's lock")
            self.on_locked(conn, key)
            listen(conn, self.channel)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # a server going down between the connect and these: try again
            # (an error escaping here would end the listening thread)
            conn.close()
            raise TransportUnavailable(f"the worker's lock: {_first(exc)}") from None
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
            except WorkerFenced as exc:
                # its requests are another worker's now: nothing it does may count
                log.critical("event=worker_fenced_self reason=%r action=exit", str(exc))
                logging.shutdown()
                os._exit(EX_TEMPFAIL)
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
