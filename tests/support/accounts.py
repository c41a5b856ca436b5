"""Real unix accounts for the tests, and a deployment made the way users make one.

When the tests run as root (CI does), ``Accounts`` creates a submit group
and four users, named ``spt_<run>_<role>`` so that they clash neither with
real ones nor with another test run's (below, by role):

- ``WORKER`` (spt_wrk): the worker user.  Its PRIMARY group is its own; it
  is only a member of the submit group (the design allows that, and a suite
  where they coincide hid a bug that stopped every reply);
- ``WEB`` (spt_web): the web application, a member of the submit group;
- ``MEMBER`` (spt_web2): a second member, not allowed some ops by ``[access]``;
- ``OUTSIDER`` (spt_out): in no group of ours.

``Deployment`` is a tree made by ``spoolops init --write-config`` run as
root, with the configuration it writes (``durable = yes`` and all) changed
only where a test tree must differ (``storage_root``, ``upload_staging_dir``,
``[access]``); the worker runs as ``WORKER`` under ``setpriv
--init-groups``; every client action runs in a process of its own account
(``runuser``).  Nothing is simulated: these are the processes, groups and
modes of a real host.  It shows the test environments' face
(``support.env.Env``): ``user`` is an account, None root; its ``client(user)``
runs each call in a process of ``user``.

The accounts need a Python they can execute and a package tree they can
read: the venv's own interpreter may live below /root (mode 0700), so a
system interpreter of the same version runs the same site-packages, copied
(hard links where possible) to a world-readable place when they are not
readable as they are.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from spoolops.client import Reply as ClientReply
from spoolops.config import Config, load_config, replace_config
from spoolops.errors import Timeout
from spoolops.transport import open_transport
from spoolops.transport.base import Transport

from . import PROJECT, SITEOPS
from .env import Env
from .requires import unavailable

ACCOUNT_PREFIX = "spt_"
# One set of accounts per test run, and per pytest-xdist worker within it:
# two runs on one host (a second suite, a helper's, the xdist workers) never
# share accounts, so one's teardown cannot delete another's users mid-test.
# The run's tag is its first process's pid (hex), inherited by every process
# it starts (the xdist workers, the accounts' own); a worker adds its number.
_RUN_TAG = os.environ.setdefault("SPOOLOPS_TEST_RUN", format(os.getpid(), "x"))
_WORKER_TAG = os.environ.get("PYTEST_XDIST_WORKER", "").removeprefix("gw")
TAG = _RUN_TAG + (f"g{_WORKER_TAG}" if _WORKER_TAG else "")


def account_name(role: str) -> str:
    """This run's name for a test account: ``spt_<tag>_<role>``."""
    return f"{ACCOUNT_PREFIX}{TAG}_{role}"


GROUP = account_name("sub")
WORKER = account_name("wrk")
WEB = account_name("web")
MEMBER = account_name("web2")
OUTSIDER = account_name("out")
USERS = (WORKER, WEB, MEMBER, OUTSIDER)
# the [access] rules of the deployments most tests share
SHARED_ACCESS = {"restricted": WEB, "update_headers": WEB, "ingest_upload": WEB}


def sweep_stale_accounts() -> None:
    """Remove the accounts and groups of runs whose first process is gone
    (a run killed before its teardown); never another live run's."""
    stale_users = [e.pw_name for e in pwd.getpwall() if _stale(e.pw_name)]
    for name in stale_users:
        run("userdel", "-f", name)
    for entry in grp.getgrall():
        if _stale(entry.gr_name):
            run("groupdel", entry.gr_name)


def _stale(name: str) -> bool:
    if not name.startswith(ACCOUNT_PREFIX) or name.count("_") < 2:
        return False
    tag = name[len(ACCOUNT_PREFIX):].split("_", 1)[0].split("g", 1)[0]
    try:
        pid = int(tag, 16)
    except ValueError:
        return False
    return pid != os.getpid() and not os.path.exists(f"/proc/{pid}")
PROBE = "import spoolops.worker, spoolops.client, filelock, inotify_simple, astropy.io.fits"


def run(*cmd: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          **kw)


def unusable_reason() -> str | None:
    """Why real-account tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "real-account tests need root to create users (CI runs them as root)"
    for tool in ("useradd", "groupadd", "userdel", "setpriv", "runuser"):
        if shutil.which(tool) is None:
            return f"real-account tests need {tool}"
    return None


class Accounts:
    """Creates the group and users; ``remove`` deletes them again."""

    def __init__(self) -> None:
        self.python: str = ""
        self.pythonpath: list[str] = []
        self._runtime: Path | None = None

    def create(self) -> None:
        sweep_stale_accounts()                 # leftovers of aborted runs
        self.remove()
        steps = [("groupadd", GROUP),
                 ("useradd", "-M", "-U", "-G", GROUP, "-d", "/nonexistent", "-s",
                  "/usr/sbin/nologin", WORKER),
                 ("useradd", "-M", "-U", "-G", GROUP, "-d", "/nonexistent", "-s",
                  "/usr/sbin/nologin", WEB),
                 ("useradd", "-M", "-U", "-G", GROUP, "-d", "/nonexistent", "-s",
                  "/usr/sbin/nologin", MEMBER),
                 ("useradd", "-M", "-U", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                  OUTSIDER)]
        for step in steps:
            done = run(*step)
            if done.returncode != 0:
                self.remove()
                raise RuntimeError(f"{' '.join(step)} failed: {done.stderr.strip()}")
        why = self._find_python()
        if why is not None:
            self.remove()
            raise RuntimeError(why)

    def remove(self) -> None:
        for user in USERS:
            run("userdel", "-f", user)
        for group in (*USERS, GROUP):
            run("groupdel", group)
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)
            self._runtime = None

    # -- a Python the accounts can run -------------------------------------

    def _find_python(self) -> str | None:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        candidates = dict.fromkeys(c for c in (
            sys.executable, shutil.which(version) or "", f"/usr/bin/{version}",
            f"/usr/local/bin/{version}") if c)
        paths = [str(SITEOPS), str(PROJECT), sysconfig.get_paths()["purelib"],
                 sysconfig.get_paths()["platlib"]]
        for pythonpath in (list(dict.fromkeys(paths)), None):
            if pythonpath is None:
                pythonpath = self._readable_copy()
            for exe in candidates:
                probe = run("runuser", "-u", OUTSIDER, "--", exe, "-c", PROBE,
                            env=self._base_env(pythonpath), cwd="/", timeout=120)
                if probe.returncode == 0:
                    self.python, self.pythonpath = exe, pythonpath
                    return None
        return (f"no Python {sys.version_info.major}.{sys.version_info.minor} that the test"
                f" accounts can execute with this project's packages (tried"
                f" {', '.join(candidates)})")

    def _readable_copy(self) -> list[str]:
        """site-packages, the project and the site ops below /tmp, world-readable."""
        self._runtime = Path(tempfile.mkdtemp(prefix="spoolops-accounts-py-", dir="/tmp"))
        os.chmod(self._runtime, 0o755)
        skip = shutil.ignore_patterns("__pycache__", "pip", "pip-*", "ruff", "ruff-*",
                                      "_pytest", "pytest", "pytest-*", "setuptools",
                                      ".venv", ".git", "*.egg-info")
        copied = []
        for name, src in (("site", Path(sysconfig.get_paths()["purelib"])),
                          ("project", PROJECT), ("siteops", SITEOPS)):
            dest = self._runtime / name
            try:
                shutil.copytree(src, dest, ignore=skip, copy_function=os.link,
                                symlinks=True)
            except (OSError, shutil.Error):
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(src, dest, ignore=skip, symlinks=True)
            copied.append(str(dest))
        run("chmod", "-R", "a+rX", str(self._runtime))
        return [copied[2], copied[1], copied[0]]

    def _base_env(self, pythonpath: Sequence[str]) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8",
                "PYTHONPATH": os.pathsep.join(pythonpath), "PYTHONDONTWRITEBYTECODE": "1"}

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        env = self._base_env(self.pythonpath)
        env["HOME"] = str(home)
        env.update(extra)
        return env


@dataclass
class Reply:
    """What ``spoolops call`` printed and how it exited."""

    code: int
    reply: dict[str, Any] | None
    stderr: str


@dataclass
class Deployment(Env):
    """A queue made by ``spoolops init`` for the test accounts, and its workers
    (the spool, or with ``pg`` the PostgreSQL transport in ``cluster``'s
    database ``dbname``)."""

    accounts: Accounts
    base: Path
    workers: list[subprocess.Popen] = field(default_factory=list)
    cluster: Any = None
    dbname: str = ""
    web: ClassVar[str | None] = WEB
    _worker_user: ClassVar[str | None] = WORKER
    _cwd: ClassVar[str | None] = "/"

    # -- building -----------------------------------------------------------

    @classmethod
    def create(cls, accounts: Accounts, access: dict[str, str] | None = None,
               worker: dict[str, str] | None = None, pg: Any = None) -> Deployment:
        """``pg``: (cluster, database) -- the PostgreSQL transport instead, set
        up by the same 'spoolops init' with the test accounts as login roles
        (the cluster authenticates them by peer: role = unix account)."""
        base = Path(tempfile.mkdtemp(prefix="spoolops-deploy-", dir="/tmp"))
        os.chmod(base, 0o755)                    # every account must traverse it
        dep = cls(accounts, base)
        for user in (None, *USERS):
            home = dep.home(user)
            home.mkdir(parents=True, exist_ok=True)
            if user is not None:
                shutil.chown(home, user, user)
        # where the test tree differs from a host's: its folders.  Everything
        # else is what 'spoolops init --write-config' writes (durable = yes, ...)
        first = base / "where.conf"
        first.write_text(f"[spool]\nroot = {base / 'spool'}\n\n[storage]\n"
                         f"storage_root = {base / 'storage'}\n"
                         f"upload_staging_dir = {base / 'staging'}\n")
        transport: tuple[str, ...] = ()
        if pg is not None:
            dep.cluster, dep.dbname = pg
            transport = ("--transport", "postgresql", "--dsn", dep.cluster.dsn(dep.dbname),
                         "--admin-dsn", dep._superuser_dsn(),
                         "--web-login", WEB, "--web-login", MEMBER, "--worker-login", WORKER)
        done = dep.run_as(None, accounts.python, "-m", "spoolops", "--config", str(first),
                          "init", "--worker-user", WORKER, "--group", GROUP, *transport,
                          "--write-config", str(dep.config_path),
                          env=accounts.env(dep.home(None)))
        if done.returncode != 0:
            raise RuntimeError(f"spoolops init failed: {done.stderr}")
        first.unlink()
        dep._adjust_config(access or {}, worker or {})
        return dep

    def _adjust_config(self, access: dict[str, str], worker: dict[str, str]) -> None:
        """Extra [access] rules and [worker] settings a test asks for."""
        lines = []
        section = None
        for line in self.config_path.read_text().splitlines():
            if line.startswith("["):
                section = line.strip("[]")
            key = line.split("=", 1)[0].strip()
            if section == "worker" and key in worker:
                line = f"{key} = {worker.pop(key)}"
            lines.append(line)
        assert not worker, f"not keys of [worker]: {worker}"
        lines += [f"{op} = {users}" for op, users in access.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        os.chmod(self.config_path, 0o644)

    @property
    def config_path(self) -> Path:
        return self.base / "spoolops.conf"

    @property
    def config(self) -> Config:
        """The configuration as the file says now."""
        return load_config(self.config_path)

    @property
    def kind(self) -> str:
        return self.config.transport

    @property
    def root(self) -> Path:
        return self.base / "spool"

    @property
    def storage(self) -> Path:
        return self.base / "storage"

    @property
    def staging(self) -> Path:
        return self.base / "staging"

    def home(self, user: str | None) -> Path:
        return self.base / "home" / (user or "root")

    def env(self, user: str | None = None, **extra: str) -> dict[str, str]:
        return self.accounts.env(self.home(user), SPOOLOPS_CONFIG=str(self.config_path),
                                 **extra)

    def transport(self) -> Transport:
        """The queue as root sees it -- over PostgreSQL, as the cluster's
        superuser (root has no role of its own)."""
        if self.cluster is None:
            return open_transport(self.config)
        return open_transport(replace_config(self.config, dsn=self._superuser_dsn()))

    def _superuser_dsn(self) -> str:
        if self.cluster is None:
            return super()._superuser_dsn()
        return self.cluster.dsn(self.dbname, "postgres")

    # -- running things as an account ---------------------------------------

    def run_as(self, user: str | None, *cmd: str, timeout: float = 120,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``cmd`` in a process of ``user`` (None: root)."""
        if user is not None:
            cmd = ("runuser", "-u", user, "--", *cmd)
        return run(*cmd, timeout=timeout, env=env or self.env(user), cwd="/")

    def spoolops(self, *args: str, user: str | None = None, timeout: float = 120
                 ) -> subprocess.CompletedProcess:
        return self.run_as(user, self.accounts.python, "-m", "spoolops", *args,
                           timeout=timeout)

    def client(self, user: str | None = None) -> AccountClient:
        return AccountClient(self, user or WEB)

    def py(self, user: str | None, code: str, *args: str, timeout: float = 120
           ) -> subprocess.CompletedProcess:
        return self.run_as(user, self.accounts.python, "-c", code, *args, timeout=timeout)

    def py_json(self, user: str | None, code: str, *args: str, timeout: float = 120) -> Any:
        """Run ``code`` as ``user``; the JSON of its last output line."""
        done = self.py(user, code, *args, timeout=timeout)
        assert done.returncode == 0, f"as {user}: {done.stderr}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    def call(self, user: str | None, op: str, args: dict[str, Any] | None = None,
             *flags: str, timeout: float = 60) -> Reply:
        """``spoolops call OP --args-json ARGS`` as ``user``."""
        done = self.spoolops("call", op, "--args-json", json.dumps(args or {}),
                             "--timeout", str(timeout), *flags, user=user,
                             timeout=timeout + 60)
        try:
            reply = json.loads(done.stdout) if done.stdout.strip() else None
        except ValueError:
            reply = None
        return Reply(done.returncode, reply, done.stderr)

    # -- the worker -------------------------------------------------------

    def _worker_argv(self) -> list[str]:
        """As ``WORKER``, with its supplementary groups."""
        return ["setpriv", f"--reuid={WORKER}", f"--regid={WORKER}", "--init-groups", "--",
                self.accounts.python]

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.base, ignore_errors=True)


CLIENT_METHOD = """
import json, sys
from spoolops import Client, Timeout
name, args, kw = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
try:
    value = getattr(Client(), name)(*args, **kw)
except Timeout as exc:
    print(json.dumps({"timeout": str(exc)}))
else:
    print(json.dumps({"value": getattr(value, "raw", value)}))
"""


@dataclass
class AccountClient:
    """``Client``'s methods, each run in a process of ``user`` (a ``Client()``
    of its own there, with the deployment's configuration): what
    ``Deployment.client`` gives.  A ``Reply`` comes back whole; ``Timeout``
    and a failed call's ``OpError`` are raised here as the client raised them."""

    dep: Deployment
    user: str

    def _run(self, name: str, *args: Any, timeout: float = 120, **kw: Any) -> Any:
        out = self.dep.py_json(self.user, CLIENT_METHOD, name, json.dumps(args),
                               json.dumps(kw), timeout=timeout)
        if "timeout" in out:
            raise Timeout(out["timeout"])
        return out["value"]

    def submit(self, op: str, args: dict[str, Any] | None = None, **kw: Any) -> str:
        return self._run("submit", op, args, **kw)

    def wait(self, rid: str, timeout: float = 30.0) -> ClientReply:
        return ClientReply.from_dict(self._run("wait", rid, timeout, timeout=timeout + 60))

    def call_reply(self, op: str, args: dict[str, Any] | None = None, timeout: float = 30.0,
                   **kw: Any) -> ClientReply:
        return ClientReply.from_dict(self._run("call_reply", op, args, timeout,
                                               timeout=timeout + 60, **kw))

    def call(self, op: str, args: dict[str, Any] | None = None, timeout: float = 30.0,
             **kw: Any) -> Any:
        return self.call_reply(op, args, timeout, **kw).raise_for_error()

    def cancel(self, rid: str) -> bool:
        return self._run("cancel", rid)


# -- what several real-account test files do (one place, not copies) ---------

def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def gid(group: str) -> int:
    return grp.getgrnam(group).gr_gid


def errno_of(dep: Deployment, user: str, code: str) -> str:
    """Run ``code`` as ``user``; the errno name it raised, or 'ok'."""
    wrapper = ("import errno, os, sys\ntry:\n" +
               "".join(f"    {line}\n" for line in code.splitlines()) +
               "    print('ok')\nexcept OSError as exc:\n"
               "    print(errno.errorcode.get(exc.errno, exc))\n")
    done = dep.py(user, wrapper)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def submit(dep: Deployment, user: str, op: str, args: dict, **kw: Any) -> str:
    """``Client.submit`` in a process of ``user``; the request id."""
    return dep.client(user).submit(op, args, **kw)


WAIT = """
import json, sys
from spoolops import Client, OpError, Timeout
try:
    reply = Client().wait(sys.argv[1], timeout=float(sys.argv[2]))
    print(json.dumps({"ok": reply.ok, "result": reply.result, "error": reply.error,
                      "submitted_by": reply.submitted_by}))
except Timeout as exc:
    print(json.dumps({"timeout": str(exc)}))
"""


def wait_reply(dep: Deployment, user: str, rid: str, timeout: float = 60) -> dict:
    """``Client.wait`` in a process of ``user`` (collects the reply)."""
    return dep.py_json(user, WAIT, rid, str(timeout), timeout=timeout + 60)


def running_file(dep: Deployment, rid: str) -> Path:
    return dep.root / "active" / f"{rid}.json.run"


def fits_file(dep: Deployment, name: str) -> Path:
    """A small FITS file in storage, owned by the worker user as the archive's are."""
    import numpy as np
    from astropy.io import fits
    path = dep.storage / name
    hdu = fits.PrimaryHDU(np.arange(64, dtype=">i2").reshape(8, 8))
    hdu.header["OBJECT"] = "deploy"
    hdu.add_checksum()
    hdu.writeto(path)
    os.chown(path, uid(WORKER), gid(WORKER))
    os.chmod(path, 0o644)
    return path


# -- root's commands, as a test runs them ------------------------------------------------

ROOT_AS_LIMIT = 1 << 30      # bytes of address space for root's commands (and flood readers)


def capped() -> tuple[str, ...]:
    """The prefix that caps a command's memory: a hostile file must not
    exhaust the host through root's command."""
    if shutil.which("prlimit") is None:
        unavailable("prlimit (util-linux) is needed to cap root's commands' memory")
    return ("prlimit", f"--as={ROOT_AS_LIMIT}", "--")


def spoolops_as_root(dep: Deployment, *args: str, timeout: float
                     ) -> subprocess.CompletedProcess:
    """``spoolops ARGS`` run by root, memory capped, in a session of its own
    (a stray signal to "my process group" hits nothing else); fails the test
    if it does not exit within ``timeout``."""
    import pytest
    try:
        return subprocess.run([*capped(), dep.accounts.python, "-m", "spoolops", *args],
                              check=False, env=dep.env(None), cwd="/", capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"'spoolops {' '.join(args)}' as root hung (no exit within {timeout} s)")
