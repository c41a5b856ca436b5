"""The PostgreSQL baselines of workload ``pg``: servers and their callers.

``python -m benchlib.pgpeers KIND DSN`` runs one server (it prints ``ready``
once it listens); ``benchlib.pgpeers:<Kind>Caller`` is its client half, run
by ``clientproc`` (``make_caller``'s ``module:Class``, target = the DSN):

* ``floor``: a bare LISTEN/NOTIFY round trip in psycopg 3.  The server
  LISTENs on ``req`` (one connection) and answers each ``<channel>:<n>`` with
  ``pg_notify('<channel>', n)`` (a second connection: ``notifies()`` holds
  the first one's lock).  A client has one autocommit connection LISTENing
  on its own channel, sends ``SELECT pg_notify('req', '<channel>:<n>')`` on
  it and waits with ``notifies(timeout=..., stop_after=1)``.  No table, no
  transaction of its own: the least a LISTEN/NOTIFY queue can do.
* ``dfloor``: the durable floor, the least a durable queue with a reply
  path can do over LISTEN/NOTIFY in psycopg 3; a logged table ``dfloor (id
  bigserial PRIMARY KEY, channel text, body text, reply text)``, no index
  but the key, autocommit connections, so each statement below is one
  round trip and one committed transaction, at the cluster's own
  ``synchronous_commit``.  The client LISTENs on its own channel and sends
  ``WITH r AS (INSERT INTO dfloor (channel, body) VALUES (...) RETURNING
  id) SELECT id, pg_notify('dfloor', id::text) FROM r`` (the request row
  and its NOTIFY, one commit).  The server LISTENs on ``dfloor`` (one
  connection) and answers each notification, one at a time, with ``WITH r
  AS (UPDATE dfloor SET reply = body WHERE id = <n> AND reply IS NULL
  RETURNING id, channel) SELECT pg_notify(channel, id::text) FROM r`` (a
  second connection; the reply row and its NOTIFY, one commit; the echo is
  computed in the statement, so the server never fetches the body).  The
  client, woken by its id, reads ``SELECT reply FROM dfloor WHERE id =
  <n>`` once (no write, so no commit to wait for).  Rows stay (nobody
  deletes them); the database goes with the cluster.
* ``pgqueuer``: pgqueuer's worker (``AsyncpgDriver``, ``batch_size=1``;
  its ``PsycopgDriver`` worker takes ~3 s a job: it runs ``notifies()`` on
  the connection its queries use).  pgqueuer stores no return values, so the
  glue is a reply table ``echo_reply (job_id bigint PRIMARY KEY, body
  bytea)``: the handler INSERTs the job's payload there (its own asyncpg
  connection); the client enqueues (``Queries.enqueue``), waits with
  ``CompletionWatcher(..., debounce=timedelta(0)).wait_for(job_id)`` (the
  default debounce adds 50 ms) on a second connection, then SELECTs the
  reply row.  Everything asyncpg, as the cluster's superuser.
* ``poll``: a queue polled once a second, as ``dbpoll`` but in PostgreSQL
  (psycopg 3): the client INSERTs a row and looks for its result once a
  second; the worker answers every queued row once a second.

Trusts: the throwaway cluster it is pointed at.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any

import psycopg

POLL_S = 1.0
REPLY_DDL = "CREATE TABLE IF NOT EXISTS echo_reply (job_id bigint PRIMARY KEY, body bytea)"
DFLOOR_DDL = ("CREATE TABLE IF NOT EXISTS dfloor (id bigserial PRIMARY KEY, channel text NOT NULL,"
              " body text NOT NULL, reply text)")
DFLOOR_SUBMIT = ("WITH r AS (INSERT INTO dfloor (channel, body) VALUES (%s, %s) RETURNING id)"
                 " SELECT id, pg_notify('dfloor', id::text) FROM r")
DFLOOR_ANSWER = ("WITH r AS (UPDATE dfloor SET reply = body WHERE id = %s AND reply IS NULL"
                 " RETURNING id, channel) SELECT pg_notify(channel, id::text) FROM r")
DFLOOR_COLLECT = "SELECT reply FROM dfloor WHERE id = %s"
POLL_DDL = ("CREATE TABLE IF NOT EXISTS pollq (id bigserial PRIMARY KEY, op text, args text,"
            " state text NOT NULL DEFAULT 'new', result text)")


# -- floor ---------------------------------------------------------------------------

def serve_floor(dsn: str) -> None:
    listener = psycopg.connect(dsn, autocommit=True)
    sender = psycopg.connect(dsn, autocommit=True)
    listener.execute("LISTEN req")
    print("ready", flush=True)
    for note in listener.notifies():
        channel, _, n = note.payload.rpartition(":")
        sender.execute("SELECT pg_notify(%s, %s)", (channel, n))


class PgFloorCaller:
    def __init__(self, dsn: str, durable: bool) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.channel = f"c{os.getpid()}"
        self.conn.execute(f"LISTEN {self.channel}")
        self.n = 0

    def call(self, op: str, args: dict[str, Any], timeout: float) -> str:
        self.n += 1
        want = str(self.n)
        self.conn.execute("SELECT pg_notify('req', %s)", (f"{self.channel}:{want}",))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for note in self.conn.notifies(timeout=end - time.monotonic(), stop_after=1):
                if note.payload == want:
                    return want
        raise TimeoutError(f"no floor reply to {want}")


# -- durable floor -------------------------------------------------------------------

def serve_durable_floor(dsn: str) -> None:
    listener = psycopg.connect(dsn, autocommit=True)
    sender = psycopg.connect(dsn, autocommit=True)
    sender.execute(DFLOOR_DDL)
    listener.execute("LISTEN dfloor")
    print("ready", flush=True)
    for note in listener.notifies():
        sender.execute(DFLOOR_ANSWER, (int(note.payload),))


class PgDurableFloorCaller:
    def __init__(self, dsn: str, durable: bool) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.channel = f"d{os.getpid()}"
        self.conn.execute(f"LISTEN {self.channel}")

    def call(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        rid = self.conn.execute(DFLOOR_SUBMIT, (self.channel, json.dumps(args))).fetchone()[0]
        want, woken = str(rid), False
        end = time.monotonic() + timeout
        while not woken and time.monotonic() < end:
            # the generator holds the connection's lock: leave it before the SELECT
            for note in self.conn.notifies(timeout=max(0.0, end - time.monotonic()),
                                           stop_after=1):
                woken = woken or note.payload == want
        if not woken:
            raise TimeoutError(f"no durable floor reply to {want}")
        return json.loads(self.conn.execute(DFLOOR_COLLECT, (rid,)).fetchone()[0])


# -- pgqueuer ------------------------------------------------------------------------

def _asyncpg_args(dsn: str) -> dict[str, Any]:
    from psycopg.conninfo import conninfo_to_dict
    info = conninfo_to_dict(dsn)
    return {"host": info.get("host"), "port": int(info.get("port", 5432)),
            "database": info.get("dbname"), "user": info.get("user")}


async def _asyncpg(dsn: str) -> Any:
    import asyncpg
    return await asyncpg.connect(**_asyncpg_args(dsn))


async def install_pgqueuer(dsn: str) -> None:
    """pgqueuer's schema (what ``pgq install`` runs) and the reply table."""
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries
    conn = await _asyncpg(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
        await conn.execute(REPLY_DDL)
    finally:
        await conn.close()


async def _serve_pgqueuer(dsn: str) -> None:
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    # glue: the reply writers (a pool: jobs run concurrently, an asyncpg
    # connection runs one query at a time)
    out = await asyncpg.create_pool(min_size=2, max_size=8, **_asyncpg_args(dsn))
    pgq = PgQueuer(AsyncpgDriver(await _asyncpg(dsn)))

    @pgq.entrypoint("echo")
    async def echo(job: Job) -> None:
        await out.execute("INSERT INTO echo_reply VALUES ($1, $2)", job.id, job.payload)

    print("ready", flush=True)
    await pgq.run(batch_size=1)


class PgqueuerCaller:
    """Synchronous face over one event loop; the watcher stays entered."""

    def __init__(self, dsn: str, durable: bool) -> None:
        from pgqueuer.core.completion import CompletionWatcher
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries
        self.loop = asyncio.new_event_loop()
        run = self.loop.run_until_complete
        self.driver = AsyncpgDriver(run(_asyncpg(dsn)))     # enqueue, status, reply
        self.queries = Queries(self.driver)
        self.watcher = CompletionWatcher(AsyncpgDriver(run(_asyncpg(dsn))),  # LISTEN only
                                         queries=self.queries, debounce=timedelta(0))
        run(self.watcher.__aenter__())
        atexit.register(self.close)

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.run_until_complete(self.watcher.__aexit__(None, None, None))
            self.loop.close()

    async def _call(self, args: dict[str, Any], timeout: float) -> Any:
        body = json.dumps(args).encode()
        (jid,) = await self.queries.enqueue("echo", body)
        status = await asyncio.wait_for(self.watcher.wait_for(jid), timeout)
        rows = await self.driver.fetch("SELECT body FROM echo_reply WHERE job_id = $1", jid)
        if status != "successful" or not rows:
            raise RuntimeError(f"pgqueuer job {jid}: {status}")
        return json.loads(bytes(rows[0]["body"]))

    def call(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        return self.loop.run_until_complete(self._call(args, timeout))


# -- a queue polled once a second -------------------------------------------------------

def serve_poll(dsn: str) -> None:
    db = psycopg.connect(dsn, autocommit=True)
    db.execute(POLL_DDL)
    print("ready", flush=True)
    while True:
        rows = db.execute("SELECT id, op, args FROM pollq WHERE state = 'new'").fetchall()
        for rid, op, args in rows:
            db.execute("UPDATE pollq SET state = 'done', result = %s WHERE id = %s",
                       (args if op == "echo" else "null", rid))
        time.sleep(POLL_S)


class PgPollCaller:
    def __init__(self, dsn: str, durable: bool) -> None:
        self.db = psycopg.connect(dsn, autocommit=True)

    def call(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        rid = self.db.execute("INSERT INTO pollq (op, args) VALUES (%s, %s) RETURNING id",
                              (op, json.dumps(args))).fetchone()[0]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            time.sleep(POLL_S)
            row = self.db.execute("SELECT result FROM pollq WHERE id = %s AND state = 'done'",
                                  (rid,)).fetchone()
            if row is not None:
                self.db.execute("DELETE FROM pollq WHERE id = %s", (rid,))
                return json.loads(row[0])
        raise TimeoutError(f"no result for {rid}")


def main(argv: list[str]) -> int:
    kind, dsn = argv[0], argv[1]
    logging.basicConfig(level=logging.WARNING)
    if kind == "floor":
        serve_floor(dsn)
    elif kind == "dfloor":
        serve_durable_floor(dsn)
    elif kind == "pgqueuer":
        asyncio.run(_serve_pgqueuer(dsn))
    elif kind == "poll":
        serve_poll(dsn)
    else:
        raise SystemExit(f"unknown server {kind!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
