"""The test environments: one face, ``Env``, and the kinds that show it.

- ``SpoolEnv``: a spool tree the test's own account owns
  (``make_spool_env``; ``durable`` as each test asks);
- ``PgEnv``: a database of its own in the session's throwaway cluster
  (``spoolops.pgcluster``), set up by ``spoolops init --transport
  postgresql`` with login roles ``web1`` and ``web2`` (submit) and ``wrk``
  (worker), each process connecting as its role (``make_pg_env``);
- ``Deployment`` (``support.accounts``): a tree ``spoolops init`` made for
  real unix accounts, over either transport.

A test that runs on both transports takes the ``queue`` fixture (or
``queue_for``) and uses only the face; what one kind alone has stays on it:
``SpoolEnv.spool`` (the folders), ``PgEnv.sql`` (the database as its
superuser), ``Deployment.run_as`` / ``py`` / ``call`` (other accounts).
Nothing is mocked: every worker is a ``python -m spoolops worker`` process
with the test site operations (``tests/siteops``) on its path, logging to a
file the tests read.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from spoolops.admin import init_tree, resolve_accounts
from spoolops.client import Client
from spoolops.config import Config, load_config
from spoolops.transport import open_transport
from spoolops.transport.base import Transport
from spoolops.transport.spool import SpoolTransport

from . import PROJECT, SITEOPS
from .waiting import wait_log

TRANSPORTS = ("spool", "postgresql")
# the login roles of a PgEnv's database: two web applications and the worker
WEB, WEB2, WORKER_ROLE = "web1", "web2", "wrk"


class Env(ABC):
    """The face of every test environment: a queue of one transport, its
    configuration, the worker processes started on it, and its clients.

    Every kind has these attributes:

    - ``kind``: the transport, ``"spool"`` or ``"postgresql"``;
    - ``base``: the environment's folder (its configuration, the worker logs);
    - ``config_path``, ``config``: the worker's configuration file and its
      ``Config``;
    - ``workers``: the processes ``start_worker`` started, oldest first
      (each with ``log_path``, its log);
    - ``web``: the web client's ``user`` when a method is given none.

    A ``user`` argument says whose side acts: a unix account on real
    accounts, a login role over PostgreSQL; on a tree of the test's own
    account there is one side, and ``user`` changes nothing.  For commands
    (``spoolops``, ``env``), ``None`` is the operator's side (root on real
    accounts, the worker's configuration over PostgreSQL); for clients
    (``client``, ``client_env``), the web client (``web``).
    """

    kind: str
    base: Path
    config_path: Path
    config: Config
    workers: list[subprocess.Popen]
    web: ClassVar[str | None] = None
    # the account the worker runs as, for ``env`` (None: the operator's side)
    _worker_user: ClassVar[str | None] = None
    # the folder commands run in (None: the test's own)
    _cwd: ClassVar[str | None] = None

    # -- processes ---------------------------------------------------------------

    @abstractmethod
    def env(self, user: str | None = None, **extra: str) -> dict[str, str]:
        """The environment of a process acting as ``user`` (its configuration
        in ``$SPOOLOPS_CONFIG``, the test site operations on its path), with
        ``extra`` added."""

    def client_env(self, user: str | None = None) -> dict[str, str]:
        """The environment of a client process of ``user`` (None: ``web``)."""
        return self.env(user or self.web)

    @abstractmethod
    def client(self, user: str | None = None) -> Any:
        """A ``Client`` of ``user`` (None: ``web``).  On real accounts it has
        ``Client``'s ``submit``, ``wait``, ``call``, ``call_reply`` and
        ``cancel``, each run in a process of the account."""

    @abstractmethod
    def spoolops(self, *args: str, user: str | None = None, timeout: float = 120
                 ) -> subprocess.CompletedProcess:
        """The ``spoolops ARGS`` command line as ``user`` (None: the
        operator's side), output captured as text; its exit is not checked."""

    @abstractmethod
    def _worker_argv(self) -> list[str]:
        """The command that runs Python as the worker (``-m spoolops worker``
        follows)."""

    def start_worker(self, *args: str, wait: bool = True, log: Path | None = None,
                     prefix: Sequence[str] = (), **env: str) -> subprocess.Popen:
        """``spoolops worker ARGS`` as the worker, after ``prefix`` (e.g. a
        setpriv or prlimit command), with ``env`` added to its environment;
        its log (``log``, by default a new file in ``base``) is
        ``proc.log_path``.  ``wait``: return once it logs that it is ready."""
        log = log or self.base / f"worker-{len(self.workers)}.log"
        cmd = [*prefix, *self._worker_argv(), "-m", "spoolops", "worker", *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env(self._worker_user, **env), cwd=self._cwd,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        proc.log_path = log  # type: ignore[attr-defined]
        self.workers.append(proc)
        if wait:
            self.wait_log(proc, f"event=worker_ready pid={proc.pid}")
        return proc

    def wait_log(self, proc: subprocess.Popen, text: str, timeout: float = 60) -> str:
        """Wait until the worker's log holds ``text``; returns the log."""
        return wait_log(proc, text, timeout)

    def worker_logs(self) -> str:
        """The logs of every worker started, oldest first, one after another."""
        return "".join(w.log_path.read_text(errors="replace") for w in self.workers)

    def stop_worker(self, proc: subprocess.Popen, sig: int = signal.SIGTERM,
                    timeout: float = 60) -> int:
        """Send ``sig`` to a worker still running; its exit status."""
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def close(self) -> None:
        """Kill the workers still running (a stopped one is continued first)."""
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(30)

    # -- the queue, whatever keeps it -------------------------------------------------

    def transport(self) -> Transport:
        """The queue as the worker's side sees it (a new handle each time)."""
        return open_transport(self.config)

    def count(self, state: str) -> int:
        """How many requests are in ``state`` (queued, running, replies, ...)."""
        return self.transport().counts(0.0)[state].count or 0

    def quiet(self) -> bool:
        """Nothing queued, nothing running."""
        counts = self.transport().counts(0.0)
        return not counts["queued"].count and not counts["running"].count

    def running_targets(self) -> list[str]:
        """The targets of the requests running now, sorted."""
        found: list[str] = []
        for entry in self.transport().entries("running"):
            target = entry.fields.get("target")
            if target:
                found += target.split(",")
        return sorted(found)

    def replies_left(self) -> int:
        """How many replies nobody has collected."""
        if self.kind == "spool":
            return len(list(self.transport().replies.iterdir()))  # type: ignore[attr-defined]
        return self.count("replies")

    def set_queued_time(self, rid: str, when: float) -> None:
        """Move queued request ``rid``'s place in line: queued at ``when``
        (epoch seconds)."""
        if self.kind == "spool":
            path = self.transport().new / (rid + ".json")  # type: ignore[attr-defined]
            os.utime(path, (when, when))
        else:
            _superuser_sql(self._superuser_dsn(),
                           "UPDATE spoolops.requests SET submitted = %s WHERE id = %s",
                           datetime.fromtimestamp(when, tz=timezone.utc), rid)  # noqa: UP017

    def _superuser_dsn(self) -> str:
        """The connection string of the database's superuser (PostgreSQL only)."""
        raise TypeError(f"a {self.kind} queue has no database")


def _superuser_sql(dsn: str, query: str, *params: Any) -> list[tuple]:
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return cur.fetchall() if cur.description else []


@dataclass
class _OwnAccount(Env):
    """An environment every process of which runs as the test's own account."""

    base: Path
    config_path: Path
    config: Config
    workers: list[subprocess.Popen] = field(default_factory=list)

    def _config_for(self, user: str | None) -> Path:
        return self.config_path

    def env(self, user: str | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SITEOPS), str(PROJECT)] + env.get("PYTHONPATH", "").split(os.pathsep))
        env["SPOOLOPS_CONFIG"] = str(self._config_for(user))
        env.update(extra)
        return env

    def spoolops(self, *args: str, user: str | None = None, timeout: float = 120
                 ) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "spoolops", *args], check=False,
                              capture_output=True, text=True, timeout=timeout,
                              env=self.env(user))

    def _worker_argv(self) -> list[str]:
        return [sys.executable]


@dataclass
class SpoolEnv(_OwnAccount):
    """A spool tree the test's account owns, with its config and workers."""

    kind: ClassVar[str] = "spool"

    @property
    def spool(self) -> SpoolTransport:
        """The spool, through its transport (its folders are the documented layout)."""
        return SpoolTransport(self.config.root, self.config.durable,
                              self.config.max_request_bytes, self.config.worker_user)

    def client(self, user: str | None = None) -> Client:
        return Client(config=self.config)


@dataclass
class PgEnv(_OwnAccount):
    """A database of its own in ``cluster``; each role has a configuration
    file of its own (``client_configs``), the worker's is ``config_path``."""

    kind: ClassVar[str] = "postgresql"
    web: ClassVar[str | None] = WEB
    cluster: Any = None
    dbname: str = ""
    client_configs: dict[str, Path] = field(default_factory=dict)

    def _config_for(self, user: str | None) -> Path:
        return self.client_configs[user] if user else self.config_path

    def client(self, user: str | None = None) -> Client:
        return Client(config=self.client_configs[user or WEB])

    def sql(self, query: str, *params: Any) -> list[tuple]:
        """As the cluster's superuser (to look, or to move things the tests
        need moved: never what the code under test relies on)."""
        return _superuser_sql(self._superuser_dsn(), query, *params)

    def _superuser_dsn(self) -> str:
        return self.cluster.dsn(self.dbname, "postgres")

    def close(self) -> None:
        super().close()
        # a throwaway database: its cluster goes at the end of the session anyway
        self.cluster.psql(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')


# -- making them ------------------------------------------------------------------------

def make_spool_env(base: Path, *, durable: bool, extra: str = "", concurrency: int = 4,
                   **spool_keys: str) -> SpoolEnv:
    """A spool tree below ``base`` (config ``base/spoolops.conf``, relative
    paths), made by ``init_tree``; ``extra`` is appended to the config,
    ``spool_keys`` go to its ``[spool]`` section."""
    base.mkdir(parents=True, exist_ok=True)
    lines = ["[spool]", "root = spool", f"durable = {'yes' if durable else 'no'}"]
    lines += [f"{k} = {v}" for k, v in spool_keys.items()]
    lines += ["", "[worker]", "rescan_interval = 2s", f"concurrency = {concurrency}", "",
              "[storage]", "storage_root = storage", "upload_staging_dir = staging", "",
              extra]
    path = base / "spoolops.conf"
    path.write_text("\n".join(lines) + "\n")
    config = load_config(path)
    init_tree(config, resolve_accounts(config))
    return SpoolEnv(base, path, config)


_db_numbers = itertools.count(1)


def _pg_config(dsn: str, durable: bool, extra: str, concurrency: int, grace: str) -> str:
    return textwrap.dedent(f"""\
        [spool]
        root = spool
        transport = postgresql
        durable = {'yes' if durable else 'no'}

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


def make_pg_env(cluster, base: Path, *, durable: bool = True, extra: str = "",
                concurrency: int = 4, lock_grace: str = "4s", dbname: str | None = None
                ) -> PgEnv:
    """A database of its own in ``cluster``, set up the way 'spoolops init'
    does it, with the roles ``WEB``, ``WEB2`` and ``WORKER_ROLE``."""
    base.mkdir(parents=True, exist_ok=True)
    dbname = dbname or f"t{os.getpid()}_{next(_db_numbers)}"
    cluster.psql(f'CREATE DATABASE "{dbname}"')
    worker_path = base / "spoolops.conf"
    worker_path.write_text(_pg_config(cluster.dsn(dbname, WORKER_ROLE), durable, extra,
                                      concurrency, lock_grace))
    config = load_config(worker_path)
    init_tree(config, resolve_accounts(config), admin_dsn=cluster.dsn(dbname, "postgres"),
              web_logins=[WEB, WEB2], worker_logins=[WORKER_ROLE])
    clients = {}
    for role in (WEB, WEB2, WORKER_ROLE):
        path = base / f"client-{role}.conf"
        path.write_text(_pg_config(cluster.dsn(dbname, role), durable, extra, concurrency,
                                   lock_grace))
        clients[role] = path
    return PgEnv(base, worker_path, config, cluster=cluster, dbname=dbname,
                 client_configs=clients)


def make_env(kind: str, cluster, base: Path, *, durable: bool, **kw: Any) -> SpoolEnv | PgEnv:
    """An environment of transport ``kind`` (``cluster``: PostgreSQL's)."""
    if kind == "spool":
        kw.pop("lock_grace", None)
        return make_spool_env(base, durable=durable, **kw)
    return make_pg_env(cluster, base, durable=durable, **kw)


def queue_for(request, tmp_path: Path, kind: str, *, durable: bool, **kw: Any
              ) -> SpoolEnv | PgEnv:
    """``make_env`` for a test (``request``: pytest's): the session's cluster
    for PostgreSQL, closed when the test ends."""
    cluster = request.getfixturevalue("pg_cluster") if kind == "postgresql" else None
    env = make_env(kind, cluster, tmp_path / "q", durable=durable, **kw)
    request.addfinalizer(env.close)
    return env


# -- what tests of one kind do with it ----------------------------------------------------

def connect_as(env: PgEnv, role: str, **kw: Any):
    """An autocommit connection to ``env``'s database as ``role`` (as any
    program of its would open one: the role's own settings apply)."""
    import psycopg
    return psycopg.connect(env.cluster.dsn(env.dbname, role), autocommit=True, **kw)


def stage_reply(spool: SpoolTransport, rid: str, reply: dict) -> None:
    """A reply the worker finished but did not publish (``work/ID.reply``,
    whole, as the worker's staging leaves it): what recovery finds after a
    crash between the two steps."""
    from spoolops.formats import encode_json
    from spoolops.transport.spool.names import STAGED_REPLY_SUFFIX
    staged = spool.work / f"{rid}{STAGED_REPLY_SUFFIX}"
    partial = staged.with_name(staged.name + ".tmp")
    partial.write_bytes(encode_json(reply))
    os.replace(partial, staged)
