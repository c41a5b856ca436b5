"""Shared fixtures: a real spool tree, a real worker process, real clients.

Nothing here mocks the filesystem, inotify or FITS I/O.  The worker always
runs as a separate process (``python -m spoolops worker``) with the test site
operations of ``tests/siteops`` on its path, found through the real
``spoolops.ops`` entry-point group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spoolops.admin import init_tree, resolve_accounts
from spoolops.client import Client
from spoolops.config import Config, load_config
from spoolops.lock import worker_alive
from spoolops.spool import Spool

TESTS = Path(__file__).resolve().parent
SITEOPS = TESTS / "siteops"


def write_config(base: Path, durable: bool = False, extra: str = "", **spool_keys: str) -> Path:
    """A config file for a tree below ``base`` (relative paths)."""
    lines = ["[spool]", "root = spool", f"durable = {'yes' if durable else 'no'}"]
    lines += [f"{k} = {v}" for k, v in spool_keys.items()]
    lines += ["", "[worker]", "rescan_interval = 2s", "concurrency = 4", "",
              "[storage]", "storage_root = storage", "upload_staging_dir = staging", "",
              extra]
    path = base / "spoolops.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class SpoolEnv:
    """A spool tree with its config, and the worker processes started on it."""

    base: Path
    config_path: Path
    config: Config
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def spool(self) -> Spool:
        return Spool(self.config.root, self.config.durable, self.config.max_request_bytes)

    def client(self) -> Client:
        return Client(config=self.config)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SITEOPS), str(TESTS.parent)] + env.get("PYTHONPATH", "").split(os.pathsep))
        env["SPOOLOPS_CONFIG"] = str(self.config_path)
        env.update(extra)
        return env

    def spoolops(self, *args: str, timeout: float = 60, user: str | None = None,
                 **kw) -> subprocess.CompletedProcess:
        """Run the ``spoolops`` command line (optionally as another user)."""
        cmd = [sys.executable, "-m", "spoolops", *args]
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                              env=self.env(), **kw)

    def start_worker(self, *args: str, wait: bool = True, stderr=None,
                     user: str | None = None, **env: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "spoolops", "worker", *args]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *cmd]
        proc = subprocess.Popen(cmd, env=self.env(**env), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL,
                                stderr=stderr if stderr is not None else subprocess.DEVNULL)
        self.workers.append(proc)
        if wait:
            self.wait_worker_up(proc)
        return proc

    def wait_worker_up(self, proc: subprocess.Popen, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            alive, pid = worker_alive(self.spool.lock_path)
            # the lock is taken before recovery and the first scan; the
            # stats file is written once the loop is about to serve
            if alive and pid == proc.pid and (self.spool.work / "stats.json").exists():
                return
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode} while starting")
            time.sleep(0.02)
        raise AssertionError("worker did not come up")

    def stop_worker(self, proc: subprocess.Popen, sig: int = signal.SIGTERM,
                    timeout: float = 60) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout)

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def make_env(base: Path, durable: bool = False, extra: str = "", **spool_keys: str) -> SpoolEnv:
    base.mkdir(parents=True, exist_ok=True)
    path = write_config(base, durable, extra, **spool_keys)
    config = load_config(path)
    init_tree(config, resolve_accounts(config))
    return SpoolEnv(base, path, config)


@pytest.fixture
def spool_env(tmp_path: Path):
    env = make_env(tmp_path / "tree")
    yield env
    env.close()


@pytest.fixture
def running(spool_env: SpoolEnv):
    """A spool with a worker running on it."""
    spool_env.start_worker()
    return spool_env


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def is_root() -> bool:
    return os.geteuid() == 0
