"""The PostgreSQL queue's shared value: one schema in one database, as one
process reaches it.

``PgQueue`` holds what every side of the transport needs -- the
configuration, the schema's names, the connection pools, the worker's id
while it serves -- and the few questions they all ask: does this role read
every row or only its own; which running rows are a dead or hung worker's.
The client side (``pg.client``), the operators' side (``pg.view``) and the
worker (``pg.worker``) build on it, and none of them imports another.

Trusts: the configuration it is given.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ...config import Config
from ...errors import SpoolSetupError
from .conn import shared_pools
from .schema import Names, sql_name

# (process-wide: the role's answer does not change while it runs)
_READS_ALL: dict[tuple, bool] = {}


class PgQueue:
    """One queue in one PostgreSQL schema, as this process reaches it."""

    def __init__(self, config: Config) -> None:
        if not config.dsn and not os.environ.get("PGHOST") and \
                not os.environ.get("PGSERVICE") and not os.environ.get("PGDATABASE"):
            raise SpoolSetupError("[postgresql] dsn is empty: name the queue's database")
        self.config = config
        self.dsn = config.dsn
        self.names = Names(config.schema, config.channel or config.schema,
                           config.submit_role, config.worker_role)
        self.s = sql_name(config.schema)
        self.durable = config.durable
        self.max_request_bytes = config.max_request_bytes
        self.work_dir = Path(config.root) / "work"
        self.host = socket.gethostname()
        # durable = no: commits need not wait for the server's WAL flush
        options = "" if self.durable else "-c synchronous_commit=off"
        self.pools = shared_pools(self.dsn, max(8, config.concurrency + 4), options)
        self.me: int | None = None            # this worker's id, while it serves

    def reads_all(self) -> bool:
        """Whether this role reads every request (the worker role, a
        superuser) or, a web role, its own through ``my_requests`` and the
        definer functions (asked once per process and DSN)."""
        key = (self.dsn, self.names.schema, self.names.worker_role)
        known = _READS_ALL.get(key)
        if known is None:
            row = self.pools.run(lambda c: c.execute(
                "SELECT pg_has_role(session_user, %s, 'USAGE') OR r.rolsuper OR"
                " r.rolbypassrls FROM pg_roles r WHERE r.rolname = session_user",
                (self.names.worker_role,)).fetchone())
            known = _READS_ALL[key] = bool(row and row[0])
        return known

    def rows_source(self) -> str:
        return f"{self.s}.requests" if self.reads_all() else f"{self.s}.my_requests"

    def stale_sql(self) -> str:
        """SQL: the moment before which a heartbeat is stale (half of
        ``lock_grace``: the worker writes one every quarter)."""
        return f"clock_timestamp() - interval '{self.config.lock_grace / 2:.3f} seconds'"

    def dead_workers_sql(self) -> str:
        """Running rows of other workers that are not alive, fenced, gone, or
        whose heartbeat is stale (``pg.view.requeue`` uses it too: only
        ``%(me)s`` as a parameter)."""
        s, alive = self.s, self.names.lock_held("r.claimed_by")
        return (f"SELECT r.id, r.claimed_by, r.attempt, r.run IS NOT NULL, w.host, w.work_dir,"
                f" w.pid, w.lost_at, clock_timestamp(), {alive}, w.backend_pid, w.fenced_at IS NOT NULL"
                f" FROM {s}.requests"
                f" r LEFT JOIN {s}.workers w ON w.id = r.claimed_by WHERE r.state = 'running'"
                " AND r.claimed_by IS DISTINCT FROM %(me)s AND (w.id IS NULL OR w.fenced_at IS"
                f" NOT NULL OR w.heartbeat < {self.stale_sql()} OR NOT {alive})"
                " ORDER BY r.claimed_at")
