"""Throwaway PostgreSQL clusters for the demo, the tests and the benchmarks.

``start_cluster`` runs ``initdb`` and ``pg_ctl`` from the machine's server
binaries (Debian's ``postgresql`` package) in a private folder, listening on
a unix socket only.  PostgreSQL refuses to run as root, so when started by
root the server runs as an unprivileged account (``postgres`` when it
exists).  Never for production data: ``fsync`` is off unless asked for.

Trusts: the binaries it finds and the account it is told to use.
Diagnostics: ``PgUnavailable`` says which binary or account is missing;
the server log is in ``<base>/log``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SpoolSetupError

PG_BIN_ENV = "SPOOLOPS_PG_BIN"


class PgUnavailable(SpoolSetupError):
    """No PostgreSQL server binaries (or no account to run them as) here."""


def find_bindir() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: ``$SPOOLOPS_PG_BIN``, ``pg_config
    --bindir``, the newest ``/usr/lib/postgresql/*/bin``, then ``$PATH``."""
    candidates: list[str] = []
    if os.environ.get(PG_BIN_ENV):
        candidates.append(os.environ[PG_BIN_ENV])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True,
                                             text=True, check=True).stdout.strip())
        except (OSError, subprocess.CalledProcessError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: [int(x) for x in p.split("/")[4].split(".")
                                        if x.isdigit()], reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(os.path.dirname(initdb))
    for folder in candidates:
        if os.access(os.path.join(folder, "initdb"), os.X_OK) and \
                os.access(os.path.join(folder, "pg_ctl"), os.X_OK):
            return Path(folder)
    raise PgUnavailable("no PostgreSQL server binaries (initdb, pg_ctl): install Debian's"
                        f" 'postgresql' package, or set ${PG_BIN_ENV}")


@dataclass
class Cluster:
    """A running throwaway cluster."""

    base: Path
    bindir: Path
    run_as: str | None
    port: int = 5432
    durable: bool = False

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def host(self) -> str:
        """The socket folder (libpq's ``host``)."""
        return str(self.base / "sock")

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        text = f"host={self.host} port={self.port} dbname={dbname}"
        return text + (f" user={user}" if user else "")

    def _run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(a) for a in args]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise PgUnavailable(f"{' '.join(cmd)} failed: {result.stderr.strip()[-800:]}")
        return result

    def start(self) -> None:
        opts = (f"-k {self.host} -p {self.port} -c listen_addresses='' "
                f"-c max_connections=300 -c unix_socket_permissions=0777")
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.base / "log", "-w",
                  "-t", "60", "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop",
                  check=False)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run ``sql`` as the cluster's superuser (for set-up and tests)."""
        return self._run(self.bindir / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
                         "-h", self.host, "-p", str(self.port), "-U", "postgres",
                         "-d", dbname, "-c", sql).stdout

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster(base: str | os.PathLike | None = None, run_as: str | None = None,
                  peer: bool = False, durable: bool = False) -> Cluster:
    """initdb and start a cluster in ``base`` (a new folder under /tmp by
    default).  Its superuser is ``postgres`` (trusted on the socket).
    ``peer``: every other role must log in as the unix account of its name,
    as in a production ``pg_hba.conf``; otherwise any role is trusted."""
    bindir = find_bindir()
    if os.geteuid() == 0:
        run_as = run_as or "postgres"
        try:
            pw = pwd.getpwnam(run_as)
        except KeyError:
            raise PgUnavailable(f"PostgreSQL will not run as root and there is no"
                                f" {run_as!r} account to run it as") from None
    elif run_as is not None and run_as != pwd.getpwuid(os.geteuid()).pw_name:
        raise PgUnavailable("only root can run the cluster as another account")
    else:
        run_as = None
    folder = Path(base) if base else Path(tempfile.mkdtemp(prefix="spoolops-pg-", dir="/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sock").mkdir(exist_ok=True)
    os.chmod(folder, 0o755)
    if run_as is not None:
        for path in (folder, folder / "sock"):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    cluster = Cluster(folder, bindir, run_as, durable=durable)
    cluster._run(bindir / "initdb", "-D", cluster.data, "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C", "--no-instructions",
                 *(() if durable else ("--no-sync",)))
    if peer:
        hba = cluster.data / "pg_hba.conf"
        cluster._run("sh", "-c", f"printf '%s\\n' 'local all postgres trust'"
                     f" 'local all all peer' > {hba}")
    cluster.start()
    return cluster
