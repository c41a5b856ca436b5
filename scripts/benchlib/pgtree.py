"""A real spoolops queue over PostgreSQL for the bench (nothing borrowed from tests/).

``PgSpoolops`` does what ``tests/support/env.py`` ``make_pg_env`` does: a
database of its own in the cluster, a config file with ``[spool] transport
= postgresql``, ``durable = yes`` and ``[postgresql] dsn`` (the worker's, as
role ``wrk``), ``spoolops.admin.init_tree`` through the superuser's DSN with
login roles ``web1`` (submit) and ``wrk`` (worker), and a client config per
role.  The worker runs as ``python -m spoolops worker`` with
``SPOOLOPS_CONFIG`` set, logging to a file; it is up once its log says
``event=worker_ready``.

Trusts: the throwaway cluster and the folder it is given.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from spoolops.admin import init_tree, resolve_accounts
from spoolops.config import load_config

from .common import child_env

WEB, WORKER_ROLE = "web1", "wrk"


def _config(dsn: str, log: Path) -> str:
    return textwrap.dedent(f"""\
        [spool]
        root = spool
        transport = postgresql
        durable = yes

        [postgresql]
        dsn = {dsn}
        lock_grace = 4s

        [worker]
        rescan_interval = 2s
        concurrency = 4
        log = {log}

        [storage]
        storage_root = storage
        upload_staging_dir = staging
        """)


class PgSpoolops:
    def __init__(self, cluster: Any, base: Path, dbname: str) -> None:
        self.cluster, self.base, self.dbname = cluster, base, dbname
        base.mkdir(parents=True, exist_ok=True)
        self.log_path = base / "worker.log"
        cluster.psql(f'CREATE DATABASE "{dbname}"')
        self.config_path = base / "spoolops.conf"
        self.config_path.write_text(_config(cluster.dsn(dbname, WORKER_ROLE), self.log_path))
        self.config = load_config(self.config_path)
        init_tree(self.config, resolve_accounts(self.config),
                  admin_dsn=cluster.dsn(dbname, "postgres"), web_logins=[WEB],
                  worker_logins=[WORKER_ROLE])
        self.client_config = base / f"client-{WEB}.conf"
        self.client_config.write_text(_config(cluster.dsn(dbname, WEB), self.log_path))
        self.schema = self.config.schema
        self.worker: subprocess.Popen | None = None

    def start_worker(self, wait: bool = True) -> subprocess.Popen:
        self.worker = proc = subprocess.Popen(
            [sys.executable, "-m", "spoolops", "worker"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, env=child_env(SPOOLOPS_CONFIG=str(self.config_path)))
        if not wait:
            return proc
        mark = f"event=worker_ready pid={proc.pid} "
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.log_path.exists() and mark in self.log_path.read_text(errors="replace"):
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("worker did not come up (no event=worker_ready)")

    def stop_worker(self) -> None:
        proc, self.worker = self.worker, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def sql(self, query: str, *params: Any) -> list[tuple]:
        """As the cluster's superuser (to look, never what spoolops relies on)."""
        import psycopg
        with psycopg.connect(self.cluster.dsn(self.dbname, "postgres"), autocommit=True) as c:
            cur = c.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def close(self) -> None:
        self.stop_worker()
        self.cluster.psql(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
