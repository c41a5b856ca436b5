"""Throwaway PostgreSQL clusters for the demo, the tests and the benchmarks.

``start_cluster`` runs ``initdb`` and ``pg_ctl`` from the machine's server
binaries (Debian's ``postgresql`` package) in a private folder (a new one
below /tmp by default), and ``destroy`` removes all of it again.  Never for
production data: ``fsync`` is off unless asked for.

Who may do what (issue 20, finding 6: the first version trusted every local
account, and a superuser can run programs as the server's account):

- **One way in.**  The server listens on a unix socket only
  (``listen_addresses = ''``), in ``<base>/sock``.
- **The server's account.**  PostgreSQL refuses to run as root, so when
  root starts a cluster the server runs as an account made for that cluster
  alone: ``spoolops-pg-<random>``, a system account with no shell and its
  own group, removed (with the group) by ``destroy``.  Never ``postgres``:
  on Debian that account owns the machine's real clusters, and whatever a
  superuser session makes the server do (``COPY ... TO PROGRAM``, reading
  and writing files) is done as the server's account, which owns nothing
  but this cluster.  Started by anyone else, the server runs as that
  account (a superuser session then gets what that account has already).
  An account left behind by a process that died before ``destroy`` (its
  folder gone, no process of its own) is removed by the next start as root.
- **The folders.**  ``<base>`` and ``<base>/sock`` belong to the server's
  account.  Started by root: mode 0710, group the account's own, which has
  no member but the accounts admitted (``clients``, ``admit``), socket 0770;
  group members can reach the socket and nothing else (the data folder is
  0700 and the log 0600, as ``initdb`` and ``pg_ctl`` make them).  Started
  by anyone else: 0700 and socket 0700 (that account's groups are not ours
  to vouch for).
- **Authentication.**  ``pg_hba.conf`` is one line, ``local all all peer
  map=spoolops``; never ``trust``, no password anywhere.  The kernel says
  which account connects (``SO_PEERCRED``) and ``pg_ident.conf`` says which
  roles that account may log in as:

  - the invoking account (root, or whoever started the cluster): the
    superuser ``postgres``, the role of its own name, and, unless ``peer``,
    every role it names through ``dsn(..., user)`` or ``allow``;
  - an admitted account: the role of its own name; admitted with
    ``named_roles`` (a test's worker account that logs in as a role the
    test made), also the roles the invoking account names -- never
    ``postgres``.

  The superuser by peer rather than by a password (scram) kept in a file:
  the invoking account is the only one that needs it and the kernel already
  names it; a password file is one more secret, readable by anyone who gets
  a copy of the folder or a backup, and good from any account that reaches
  the socket.  Per role because PostgreSQL 15's ``pg_ident.conf`` has no
  "every role" (16 added ``all``): a role that a test creates by SQL and
  logs into without asking ``dsn`` must be named with ``allow`` first.
  Adding a line reloads the server and waits until new sessions see it.

Trusts: the server binaries it finds, the kernel's word on who connects,
and the invoking account, which may do anything in the cluster (it is the
superuser) and whatever it admits.  Does not defend against root, nor limit
what an admitted account does as the roles it may log in as.

Diagnostics: ``PgUnavailable`` says which binary, account or step failed;
the server log is ``<base>/log`` (readable by the server's account and
root).
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpoolSetupError

PG_BIN_ENV = "SPOOLOPS_PG_BIN"
ACCOUNT_PREFIX = "spoolops-pg-"
MAP = "spoolops"
_NAME = re.compile(r"[^\s\"/#\\][^\s\"#\\]*")   # one pg_ident token, never a regex


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


def _checked_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a role or account name pgcluster will map: {name!r}")
    return name


def _uid_processes(uid: int) -> list[int]:
    """The pids of the processes whose real uid is ``uid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                for line in status:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            found.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return found


def _admin(*cmd: str) -> subprocess.CompletedProcess:
    """useradd and friends, retried while another one holds /etc/passwd's lock."""
    for attempt in range(20):
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode == 0 or "lock" not in done.stderr:
            return done
        time.sleep(0.1 * (attempt + 1))
    return done


def _remove_account(name: str) -> None:
    _admin("userdel", name)
    try:
        grp.getgrnam(name)
    except KeyError:
        return
    _admin("groupdel", name)


def _sweep_stale_accounts() -> None:
    """Accounts of clusters whose process died before ``destroy``: their
    folder (the account's home) is gone and they run nothing."""
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(ACCOUNT_PREFIX) and \
                not os.path.exists(entry.pw_dir) and not _uid_processes(entry.pw_uid):
            _remove_account(entry.pw_name)


def _make_account(home: Path) -> pwd.struct_passwd:
    name = ACCOUNT_PREFIX + secrets.token_hex(4)
    shell = "/usr/sbin/nologin" if os.path.exists("/usr/sbin/nologin") else "/bin/false"
    done = _admin("useradd", "--system", "--user-group", "--no-create-home",
                  "--home-dir", str(home), "--shell", shell,
                  "--comment", "spoolops throwaway PostgreSQL cluster", name)
    if done.returncode != 0:
        raise PgUnavailable(f"could not create the account {name!r} to run PostgreSQL"
                            f" as: {done.stderr.strip()}")
    return pwd.getpwnam(name)


@dataclass
class Cluster:
    """A running throwaway cluster.  ``run_as``: the server's account when it
    is not the invoking one (root started it); ``invoker``: the account that
    started it, the one trusted inside."""

    base: Path
    bindir: Path
    run_as: str | None
    port: int = 5432
    durable: bool = False
    peer: bool = False
    invoker: str = ""
    made_account: bool = False
    roles: set[str] = field(default_factory=set)      # the invoker may log in as these
    clients: set[str] = field(default_factory=set)    # accounts admitted as themselves
    stand_ins: set[str] = field(default_factory=set)  # ... and as the roles in ``roles``
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def host(self) -> str:
        """The socket folder (libpq's ``host``)."""
        return str(self.base / "sock")

    def dsn(self, dbname: str = "postgres", user: str | None = None) -> str:
        """A connection string for the invoking account.  Without ``peer``,
        naming a role here is what lets the invoking account log in as it."""
        if user is not None and not self.peer:
            self.allow(user)
        text = f"host={self.host} port={self.port} dbname={dbname}"
        return text + (f" user={user}" if user else "")

    # -- who may log in as what ---------------------------------------------

    def allow(self, *roles: str) -> None:
        """Let the invoking account log in as ``roles`` (they need not exist yet)."""
        with self._lock:
            new = {_checked_name(r) for r in roles} - self.roles
            if new:
                self.roles |= new
                self._write_ident()
                self._reload()

    def admit(self, *accounts: str, named_roles: bool = False) -> None:
        """Let the unix ``accounts`` reach the socket (membership of the server
        account's group) and log in as the role of their own name; with
        ``named_roles``, also as each role the invoking account may use (not
        the superuser): for test code run as another account against roles
        the tests make.  Root only; processes started after this call have
        the group."""
        if self.run_as is None or not self.made_account:
            raise PgUnavailable("only a cluster started by root can admit other accounts")
        with self._lock:
            names = {_checked_name(a) for a in accounts}
            new = names - self.clients
            for account in sorted(new):
                done = _admin("usermod", "--append", "--groups", self.run_as, account)
                if done.returncode != 0:
                    raise PgUnavailable(f"could not admit {account!r}: {done.stderr.strip()}")
            stand_ins = names - self.stand_ins if named_roles else set()
            if new or stand_ins:
                self.clients |= new
                self.stand_ins |= stand_ins
                self._write_ident()
                self._reload()

    def _write_ident(self) -> None:
        pairs = [(self.invoker, "postgres"), (self.invoker, self.invoker)]
        pairs += [(self.invoker, role) for role in sorted(self.roles)]
        pairs += [(account, account) for account in sorted(self.clients)]
        pairs += [(account, role) for account in sorted(self.stand_ins)
                  for role in sorted(self.roles)]
        lines = ["# written by spoolops.pgcluster: MAPNAME SYSTEM-USERNAME PG-USERNAME"]
        lines += [f'{MAP} "{system}" "{role}"' for system, role in dict.fromkeys(pairs)]
        # the file is the server account's (mode 0600); root writes it in place
        (self.data / "pg_ident.conf").write_text("\n".join(lines) + "\n")

    def _write_hba(self) -> None:
        (self.data / "pg_hba.conf").write_text(
            "# written by spoolops.pgcluster: the unix socket only, each account as the\n"
            "# roles pg_ident.conf lists for it; no trust, no passwords, no TCP\n"
            f"local all all peer map={MAP}\n")

    def _load_time(self) -> str | None:
        try:
            return self.psql("SELECT pg_conf_load_time()").strip()
        except PgUnavailable:
            return None

    def _reload(self) -> None:
        """Make the server read pg_ident.conf again and wait until a new session
        sees it (a new backend inherits the postmaster's reload time, and the
        postmaster reads the authentication files in the same step)."""
        if not (self.data / "postmaster.pid").exists():
            return                                # read at the next start
        before = self._load_time()
        if before is None:
            return
        self._run(self.bindir / "pg_ctl", "-D", self.data, "reload", check=False)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            now = self._load_time()
            if now is None or now != before:
                return
            time.sleep(0.02)
        raise PgUnavailable("the server did not reload its configuration within 30 s")

    # -- the server -----------------------------------------------------------

    def _run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        """As the server's account."""
        cmd = [str(a) for a in args]
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                cwd=self.base)
        if check and result.returncode != 0:
            raise PgUnavailable(f"{' '.join(cmd)} failed: {result.stderr.strip()[-800:]}")
        return result

    def start(self) -> None:
        mode = "0770" if self.made_account else "0700"
        opts = (f"-k {self.host} -p {self.port} -c listen_addresses='' "
                f"-c max_connections=300 -c unix_socket_permissions={mode}")
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
        """Run ``sql`` as the cluster's superuser (for set-up and tests), from
        the invoking account."""
        cmd = [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At",
               "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", dbname,
               "-c", sql]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PgUnavailable(f"psql failed: {result.stderr.strip()[-800:]}")
        return result.stdout

    def destroy(self) -> None:
        """Stop the server, remove its folder and (when made for it) its account."""
        if self.data.exists():
            self.stop("immediate")
        if self.made_account and self.run_as is not None:
            try:
                uid = pwd.getpwnam(self.run_as).pw_uid
            except KeyError:
                uid = None
            if uid is not None:
                end = time.monotonic() + 10
                while _uid_processes(uid) and time.monotonic() < end:
                    time.sleep(0.05)
                for pid in _uid_processes(uid):   # the server's own, if any lingers
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                _remove_account(self.run_as)
        shutil.rmtree(self.base, ignore_errors=True)


def start_cluster(base: str | os.PathLike | None = None, peer: bool = False,
                  durable: bool = False, clients: tuple[str, ...] | list[str] = ()
                  ) -> Cluster:
    """initdb and start a cluster in ``base`` (a new folder under /tmp by
    default).  Its superuser is ``postgres``, for the invoking account only.
    ``peer``: the invoking account logs in as ``postgres`` or as itself and
    nothing else, as a production ``pg_hba.conf`` would have it; otherwise
    as any role it names (``dsn``, ``allow``).  ``clients``: unix accounts
    admitted as the role of their own name (root only; see ``admit``)."""
    bindir = find_bindir()
    try:
        invoker = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        raise PgUnavailable(f"uid {os.geteuid()} has no account name to authenticate"
                            " by peer") from None
    root = os.geteuid() == 0
    if clients and not root:
        raise PgUnavailable("only root can admit other accounts to a cluster")
    if root:
        _sweep_stale_accounts()
    folder = Path(base) if base else Path(tempfile.mkdtemp(prefix="spoolops-pg-", dir="/tmp"))
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    (folder / "sock").mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder / "sock", 0o700)
    account = _make_account(folder) if root else None
    cluster = Cluster(folder, bindir, account.pw_name if account else None,
                      durable=durable, peer=peer, invoker=_checked_name(invoker),
                      made_account=account is not None)
    try:
        if account is not None:
            for path in (folder, folder / "sock"):
                os.chown(path, account.pw_uid, account.pw_gid)
                os.chmod(path, 0o710)
        cluster._run(bindir / "initdb", "-D", cluster.data, "-U", "postgres",
                     "--auth-local=peer", "--auth-host=reject", "-E", "UTF8", "--locale=C",
                     "--no-instructions", *(() if durable else ("--no-sync",)))
        cluster._write_hba()
        cluster._write_ident()
        cluster.start()
        if clients:
            cluster.admit(*clients)
    except BaseException:
        cluster.destroy()
        raise
    return cluster
