"""One test environment per transport, with the same face, for the suite
that runs against both (``tests/test_e2e.py`` and friends).

``SpoolQueue`` is a ``SpoolEnv`` (a tree the test user owns); ``PgQueue``
is a database of its own in the session's throwaway cluster
(``spoolops.pgcluster``), set up by ``spoolops init --transport
postgresql`` with login roles ``web1`` and ``web2`` (submit) and ``wrk``
(worker), each process connecting as its role.  Both add what the tests
need to look at the queue without caring how it is kept: counts, the
targets running now, moving a request's place in line.
"""

from __future__ import annotations

import itertools
import os
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from conftest import SpoolEnv, make_env

from spoolops.admin import init_tree, resolve_accounts
from spoolops.client import Client
from spoolops.config import load_config
from spoolops.transport import open_transport
from spoolops.transport.base import Transport

WEB, WEB2, WORKER_ROLE = "web1", "web2", "wrk"
_db_numbers = itertools.count(1)


class QueueMixin:
    """What the transport-independent tests use."""

    kind: str

    def transport(self) -> Transport:
        """The queue as the worker's identity sees it."""
        return open_transport(self.config)

    def count(self, state: str) -> int:
        return self.transport().counts(0.0)[state].count or 0

    def quiet(self) -> bool:
        """Nothing queued, nothing running."""
        counts = self.transport().counts(0.0)
        return not counts["queued"].count and not counts["running"].count

    def running_targets(self) -> list[str]:
        found: list[str] = []
        for entry in self.transport().entries("running"):
            target = entry.fields.get("target")
            if target:
                found += target.split(",")
        return sorted(found)


@dataclass
class SpoolQueue(QueueMixin, SpoolEnv):
    kind: str = "spool"

    def client(self, user: str | None = None) -> Client:
        return Client(config=self.config)

    def client_env(self, user: str | None = None) -> dict[str, str]:
        return self.env()

    def set_queued_time(self, rid: str, when: float) -> None:
        path = self.spool.new / (rid + ".json")
        os.utime(path, (when, when))

    def replies_left(self) -> int:
        return len(list(self.spool.replies.iterdir()))


@dataclass
class PgQueue(QueueMixin, SpoolEnv):
    kind: str = "postgresql"
    cluster: Any = None
    dbname: str = ""
    client_configs: dict[str, Path] = field(default_factory=dict)

    def client(self, user: str | None = None) -> Client:
        return Client(config=self.client_configs[user or WEB])

    def client_env(self, user: str | None = None) -> dict[str, str]:
        return self.env(SPOOLOPS_CONFIG=str(self.client_configs[user or WEB]))

    def sql(self, query: str, *params: Any) -> list[tuple]:
        """As the cluster's superuser (to look, or to move things the tests
        need moved: never what the code under test relies on)."""
        import psycopg
        with psycopg.connect(self.cluster.dsn(self.dbname, "postgres"), autocommit=True) as c:
            cur = c.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def set_queued_time(self, rid: str, when: float) -> None:
        self.sql("UPDATE spoolops.requests SET submitted = %s WHERE id = %s",
                 datetime.fromtimestamp(when, tz=timezone.utc), rid)  # noqa: UP017

    def replies_left(self) -> int:
        return self.count("replies")

    def close(self) -> None:
        super().close()
        # a throwaway database: its cluster goes at the end of the session anyway
        self.cluster.psql(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')


def make_spool_queue(base: Path, extra: str = "", concurrency: int = 4) -> SpoolQueue:
    env = make_env(base, durable=True, extra=extra)
    if concurrency != 4:
        env.config_path.write_text(env.config_path.read_text().replace(
            "concurrency = 4", f"concurrency = {concurrency}"))
        env.config = load_config(env.config_path)
    return SpoolQueue(env.base, env.config_path, env.config)


def _pg_config(base: Path, dsn: str, extra: str, concurrency: int, grace: str) -> str:
    return textwrap.dedent(f"""\
        [spool]
        root = spool
        transport = postgresql
        durable = yes

        [postgresql]
        dsn = {dsn}
        lock_grace = {grace}

        [worker]
        rescan_interval = 2s
        concurrency = {concurrency}

        [storage]
        storage_root = storage
        upload_staging_dir = staging
        """) + "\n" + extra + "\n"


def make_pg_queue(cluster, base: Path, extra: str = "", concurrency: int = 4,
                  lock_grace: str = "4s", dbname: str | None = None) -> PgQueue:
    """A database of its own, set up the way 'spoolops init' does it."""
    base.mkdir(parents=True, exist_ok=True)
    dbname = dbname or f"t{os.getpid()}_{next(_db_numbers)}"
    cluster.psql(f'CREATE DATABASE "{dbname}"')
    worker_path = base / "spoolops.conf"
    worker_path.write_text(_pg_config(base, cluster.dsn(dbname, WORKER_ROLE), extra,
                                      concurrency, lock_grace))
    config = load_config(worker_path)
    init_tree(config, resolve_accounts(config), admin_dsn=cluster.dsn(dbname, "postgres"),
              web_logins=[WEB, WEB2], worker_logins=[WORKER_ROLE])
    clients = {}
    for role in (WEB, WEB2, WORKER_ROLE):
        path = base / f"client-{role}.conf"
        path.write_text(_pg_config(base, cluster.dsn(dbname, role), extra, concurrency,
                                   lock_grace))
        clients[role] = path
    return PgQueue(base, worker_path, config, cluster=cluster, dbname=dbname,
                   client_configs=clients)


def make_queue(kind: str, cluster, base: Path, **kw: Any) -> SpoolQueue | PgQueue:
    if kind == "spool":
        kw.pop("lock_grace", None)
        return make_spool_queue(base, **kw)
    return make_pg_queue(cluster, base, **kw)


def connect_as(env: PgQueue, role: str, **kw: Any):
    """An autocommit connection to ``env``'s database as ``role`` (as any
    program of its would open one: the role's own settings apply)."""
    import psycopg
    return psycopg.connect(env.cluster.dsn(env.dbname, role), autocommit=True, **kw)
