"""Privilege separation with real unix accounts (needs root; CI runs as root).

A session fixture creates a submit group and three users (names unlikely to
clash with real ones):

- ``spt_data``: the worker user, primary group ``spt_data`` = the submit group;
- ``spt_web``: the web user, a member of ``spt_data``;
- ``spt_out``: an outsider, in no group of ours;

runs ``spoolops init`` for them on a tree every user can traverse, starts
the worker as ``spt_data`` (``setpriv``), and shows what each user can and
cannot do.  Everything the users do runs in their own processes
(``runuser``).  The accounts are removed at the end, and leftovers of an
aborted run are removed first.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SITEOPS, TESTS, is_root, wait_for

from spoolops.config import load_config
from spoolops.lock import worker_alive
from spoolops.spool import DIR_MODES, Spool

pytestmark = pytest.mark.skipif(
    not is_root() or shutil.which("useradd") is None or shutil.which("setpriv") is None,
    reason="real-account tests need root and useradd/setpriv (CI runs them as root)")

GROUP, WORKER, WEB, OUTSIDER = "spt_data", "spt_data", "spt_web", "spt_out"
USERS = (WEB, OUTSIDER, WORKER)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


def _remove_accounts() -> None:
    for user in USERS:
        _run("userdel", "-f", user)
    for group in (WEB, OUTSIDER, GROUP):
        _run("groupdel", group)


def _create_accounts() -> None:
    _remove_accounts()  # leftovers from an aborted run
    steps = [("groupadd", GROUP),
             ("useradd", "-M", "-N", "-g", GROUP, "-d", "/nonexistent", "-s",
              "/usr/sbin/nologin", WORKER),
             ("useradd", "-M", "-U", "-G", GROUP, "-d", "/nonexistent", "-s",
              "/usr/sbin/nologin", WEB),
             ("useradd", "-M", "-U", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
              OUTSIDER)]
    for step in steps:
        done = _run(*step)
        if done.returncode != 0:
            _remove_accounts()
            pytest.fail(f"{' '.join(step)} failed: {done.stderr.strip()}")


def _python_for(user: str) -> str | None:
    """An interpreter ``user`` can run that imports our dependencies.

    The venv's own interpreter may live under /root (mode 0700); a system
    interpreter of the same version, given the venv's site-packages on
    PYTHONPATH, runs the same code."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, shutil.which(version) or "", f"/usr/bin/{version}",
                  f"/usr/local/bin/{version}"]
    env = _user_env()
    for exe in dict.fromkeys(c for c in candidates if c):
        probe = subprocess.run(["runuser", "-u", user, "--", exe, "-c",
                                "import spoolops.worker, filelock, inotify_simple"],
                               check=False, capture_output=True, env=env, timeout=60,
                               cwd="/")
        if probe.returncode == 0:
            return exe
    return None


def _user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    paths = [str(SITEOPS), str(TESTS.parent), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra)
    return env


@dataclass
class Site:
    """The tree, its config and the worker running as the worker user."""

    base: Path
    config_path: Path
    python: str
    worker: subprocess.Popen | None = None

    @property
    def config(self):
        return load_config(self.config_path)

    @property
    def spool(self) -> Spool:
        return Spool(self.config.root)

    def env(self, user: str | None = None) -> dict[str, str]:
        # astropy (imported by the FITS ops) writes under $HOME: give each user one
        home = self.base / "home" / (user or "root")
        if not home.exists():
            home.mkdir(parents=True)
            if user is not None:
                shutil.chown(home, user)
        return _user_env(SPOOLOPS_CONFIG=str(self.config_path), HOME=str(home))

    def as_user(self, user: str | None, *cmd: str, timeout: float = 120
                ) -> subprocess.CompletedProcess:
        if user is not None:
            cmd = ("runuser", "-u", user, "--", *cmd)
        return subprocess.run(cmd, check=False, capture_output=True, text=True,
                              timeout=timeout, env=self.env(user), cwd="/")

    def spoolops(self, user: str | None, *args: str, timeout: float = 120
                 ) -> subprocess.CompletedProcess:
        return self.as_user(user, self.python, "-m", "spoolops", *args, timeout=timeout)

    def py(self, user: str, code: str, *args: str) -> subprocess.CompletedProcess:
        return self.as_user(user, self.python, "-c", code, *args)

    def start_worker(self) -> subprocess.Popen:
        cmd = ["setpriv", f"--reuid={WORKER}", f"--regid={GROUP}", "--init-groups", "--",
               self.python, "-m", "spoolops", "worker"]
        self.worker = subprocess.Popen(cmd, env=self.env(WORKER), cwd="/", stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: self.worker.poll() is not None or (
            worker_alive(self.spool.lock_path)[1] == self.worker.pid and
            (self.spool.work / "stats.json").exists()), timeout=60, what="worker start")
        assert self.worker.poll() is None, self.worker.stderr.read().decode()
        return self.worker


@pytest.fixture(scope="session")
def site() -> Iterator[Site]:
    _create_accounts()
    base = Path(tempfile.mkdtemp(prefix="spoolops-accounts-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)  # every test user must traverse it
        python = _python_for(OUTSIDER)
        if python is None:
            pytest.skip("no Python interpreter the test accounts can execute (the venv's"
                        f" interpreter {sys.executable} is not reachable by other users)")
        config_path = base / "spoolops.conf"
        config_path.write_text(
            "[spool]\nroot = spool\ndurable = no\n\n[worker]\nrescan_interval = 2s\n\n"
            "[storage]\nstorage_root = storage\nupload_staging_dir = staging\n\n"
            "[access]\nrestricted = nobody-allowed\n")
        config_path.chmod(0o644)
        s = Site(base, config_path, python)
        done = s.spoolops(None, "init", "--worker-user", WORKER, "--group", GROUP,
                          "--write-config", str(base / "written.conf"))
        assert done.returncode == 0, done.stderr
        # the written config (worker_user and group filled in) is the one used
        config_path.write_text((base / "written.conf").read_text())
        s.start_worker()
        yield s
        if s.worker is not None and s.worker.poll() is None:
            s.worker.send_signal(signal.SIGTERM)
            s.worker.wait(60)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        _remove_accounts()


def _call(site: Site, user: str, op: str, *args: str, timeout: float = 60
          ) -> subprocess.CompletedProcess:
    return site.spoolops(user, "call", op, *args, "--timeout", str(timeout),
                         timeout=timeout + 60)


def _errno_of(site: Site, user: str, code: str) -> str:
    """Run ``code`` as ``user``; the errno name it raised, or 'ok'."""
    wrapper = ("import errno, os, sys\ntry:\n" +
               "".join(f"    {line}\n" for line in code.splitlines()) +
               "    print('ok')\nexcept OSError as exc:\n"
               "    print(errno.errorcode.get(exc.errno, exc))\n")
    done = site.py(user, wrapper)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# -- init -------------------------------------------------------------------

def test_init_sets_owners_modes_and_setgid(site: Site) -> None:
    worker = pwd.getpwnam(WORKER)
    for name, mode in DIR_MODES.items():
        st = os.lstat(site.spool.root / name)
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert (st.st_uid, st.st_gid) == (worker.pw_uid, worker.pw_gid), name
    st = os.lstat(site.config.storage_root)
    assert st.st_uid == worker.pw_uid and stat.S_IMODE(st.st_mode) & 0o022 == 0


def test_init_is_idempotent_and_repairs(site: Site) -> None:
    again = site.spoolops(None, "init")
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout and "mode of" not in again.stdout
    os.chmod(site.spool.new, 0o777)
    repaired = site.spoolops(None, "init")
    assert repaired.returncode == 0, repaired.stderr
    assert f"mode of {site.spool.new} set to 2730" in repaired.stdout
    assert stat.S_IMODE(os.stat(site.spool.new).st_mode) == 0o2730


def test_init_refuses_non_root_on_a_tree_it_cannot_chown(site: Site) -> None:
    done = site.spoolops(WEB, "init")
    assert done.returncode == 2
    assert "root" in done.stderr and "Traceback" not in done.stderr


# -- the web user -------------------------------------------------------------

def test_web_user_submits_and_gets_replies(site: Site) -> None:
    done = _call(site, WEB, "whoami")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["ok"] and reply["result"] == {"user": WEB}
    assert reply["submitted_by"] == WEB
    # the request file was the web user's; access control follows the owner
    denied = _call(site, WEB, "restricted")
    assert denied.returncode == 1
    assert json.loads(denied.stdout)["error"]["type"] == "PermissionDenied"


def test_web_user_cannot_write_storage_root(site: Site) -> None:
    storage = site.config.storage_root
    existing = storage / "existing.fits"
    existing.write_bytes(b"data")
    os.chown(existing, pwd.getpwnam(WORKER).pw_uid, pwd.getpwnam(WORKER).pw_gid)
    assert _errno_of(site, WEB, f"open({str(storage / 'new.fits')!r}, 'xb')") == "EACCES"
    assert _errno_of(site, WEB, f"open({str(existing)!r}, 'r+b')") == "EACCES"
    assert _errno_of(site, WEB, f"os.unlink({str(existing)!r})") == "EACCES"
    assert existing.read_bytes() == b"data"


def test_web_user_cannot_list_queued_requests(site: Site) -> None:
    for d in (site.spool.new, site.spool.tmp, site.spool.work):
        assert _errno_of(site, WEB, f"os.listdir({str(d)!r})") == "EACCES", d


def test_web_user_cannot_delete_or_rename_in_active(site: Site) -> None:
    worker = pwd.getpwnam(WORKER)
    victim = site.spool.active / "someone-elses-running-request.json"
    victim.write_text("{}")
    os.chown(victim, worker.pw_uid, worker.pw_gid)
    try:
        assert _errno_of(site, WEB, f"os.unlink({str(victim)!r})") == "EACCES"
        assert _errno_of(site, WEB, f"os.rename({str(victim)!r},"
                                    f" {str(site.spool.new / 'stolen.json')!r})") == "EACCES"
        assert _errno_of(site, WEB, f"open({str(victim)!r}, 'w')") == "EACCES"
        assert victim.exists()
    finally:
        victim.unlink()


def test_forged_reply_is_rejected_by_the_client(site: Site) -> None:
    """The web user plants a reply before the worker answers: ignored."""
    code = """
import json, os, sys
from spoolops import Client
client = Client()
rid = client.submit("sleep", {"seconds": 2, "tag": "real"})
forged = {"version": 1, "id": rid, "op": "sleep", "ok": True,
          "result": {"tag": "forged"}, "error": None}
with open(os.path.join(client.spool.replies, rid + ".json"), "x") as f:
    json.dump(forged, f)
reply = client.wait(rid, timeout=60)
print(json.dumps(reply.result))
"""
    done = site.py(WEB, code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["tag"] == "real"


# -- the outsider -------------------------------------------------------------

def test_outsider_cannot_create_anything_in_the_spool(site: Site) -> None:
    for d in ("tmp", "new", "replies", "active", "failed", "work"):
        path = site.spool.root / d / "intruder.json"
        assert _errno_of(site, OUTSIDER, f"open({str(path)!r}, 'x')") == "EACCES", d
    done = _call(site, OUTSIDER, "echo", "--arg", "x=1", timeout=5)
    assert done.returncode == 2 and "permission denied" in done.stderr.lower()


def test_outsider_cannot_read_replies(site: Site) -> None:
    rid = site.spoolops(WEB, "call", "echo", "--arg", "secret=42", "--no-wait")
    assert rid.returncode == 0, rid.stderr
    reply = site.spool.replies / f"{rid.stdout.strip()}.json"
    wait_for(reply.exists, timeout=60, what="reply")
    assert _errno_of(site, OUTSIDER, f"open({str(reply)!r}).read()") == "EACCES"
    assert _errno_of(site, OUTSIDER, f"os.listdir({str(site.spool.replies)!r})") == "EACCES"
    # the web user (group member) collects it
    assert _errno_of(site, WEB, f"open({str(reply)!r}).read()") == "ok"


# -- hostile entries planted by the web user ----------------------------------

def test_hostile_entries_from_the_web_user(site: Site) -> None:
    new = site.spool.new
    code = f"""
import os, socket
new = {str(new)!r}
os.symlink("/etc/shadow", os.path.join(new, "acct-symlink.json"))
os.mkfifo(os.path.join(new, "acct-fifo.json"))
os.mkdir(os.path.join(new, "acct-dir.json"), 0o755)
fd = os.open(os.path.join(new, "acct-unreadable.json"), os.O_CREAT | os.O_WRONLY, 0o600)
os.write(fd, b'{{"version": 1, "id": "acct-unreadable", "op": "echo"}}')
os.close(fd)
with open(os.path.join(new, "acct-badjson.json"), "w") as f:
    f.write("{{not json")
"""
    done = site.py(WEB, code)
    assert done.returncode == 0, done.stderr
    failed = site.spool.failed
    expect = {"acct-symlink.json": "symbolic link", "acct-fifo.json": "FIFO",
              "acct-dir.json": "directory", "acct-unreadable.json": "permission denied"}
    for name, phrase in expect.items():
        reason = failed / f"{name}.reason"
        wait_for(reason.exists, timeout=60, what=f"reason for {name}")
        assert phrase in reason.read_text(), (name, reason.read_text())
    # a directory owned by the web user cannot be moved: left and skipped
    assert (new / "acct-dir.json").is_dir()
    bad = site.spool.replies / "acct-badjson.json"
    wait_for(bad.exists, timeout=60, what="reply to bad JSON")
    assert json.loads(bad.read_text())["error"]["type"] == "BadRequest"
    bad.unlink()
    # the worker survived and serves
    assert site.worker is not None and site.worker.poll() is None
    after = _call(site, WEB, "echo", "--arg", "after=1")
    assert after.returncode == 0 and json.loads(after.stdout)["result"] == {"after": "1"}
    os.rmdir(new / "acct-dir.json")


# -- doctor -------------------------------------------------------------------

def _doctor(site: Site) -> subprocess.CompletedProcess:
    return site.spoolops(None, "doctor")


def test_doctor_passes_on_a_good_tree_and_flags_a_bad_mode(site: Site) -> None:
    good = _doctor(site)
    assert good.returncode == 0, good.stdout + good.stderr
    os.chmod(site.spool.replies, 0o777)
    try:
        bad = _doctor(site)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "replies" in bad.stdout and "spoolops init" in bad.stdout
    finally:
        os.chmod(site.spool.replies, 0o2770)
