"""Shared fixtures: a real spool tree, a real worker process, real clients.

Nothing here mocks the filesystem, inotify or FITS I/O.  The worker always
runs as a separate process (``python -m spoolops worker``) with the test site
operations of ``tests/siteops`` on its path, found through the real
``spoolops.ops`` entry-point group, and logs to a file the tests read
(readiness is its ``event=worker_ready`` line).

Two ways to deploy:

- ``spool_env`` / ``running``: one tree owned by the user running the tests
  (quick; ``durable = no``);
- ``deployment`` (shared, with a worker) / ``fresh_deployment`` (per test,
  no worker yet): the real thing, as ``tests/accounts.py`` builds it --
  distinct unix accounts, the config ``spoolops init`` writes.  They need
  root; elsewhere they skip, saying why.

``unavailable(reason)`` is how a test that cannot run here says so: a skip
with its reason, except in CI (``CI=true``), where a missing tool or an
unusable account fails the run instead of passing it silently.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spoolops.admin import init_tree, resolve_accounts
from spoolops.client import Client
from spoolops.config import Config, load_config
from spoolops.transport.spool import SpoolTransport

TESTS = Path(__file__).resolve().parent
SITEOPS = TESTS / "siteops"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip with ``reason`` -- or, in CI, fail: CI must run every test."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: everything must run here)", pytrace=False)
    pytest.skip(reason)


def require_fitsverify() -> str:
    """The path of ``fitsverify``, the independent judge of FITS files."""
    found = shutil.which("fitsverify")
    if found is None:
        unavailable("fitsverify is not installed (Debian package fitsverify):"
                    " no independent verdict on the FITS files")
    return found


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
    def spool(self) -> SpoolTransport:
        """The spool, through its transport (its folders are the documented layout)."""
        return SpoolTransport(self.config.root, self.config.durable,
                              self.config.max_request_bytes, self.config.worker_user)

    def client(self) -> Client:
        return Client(config=self.config)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SITEOPS), str(TESTS.parent)] + env.get("PYTHONPATH", "").split(os.pathsep))
        env["SPOOLOPS_CONFIG"] = str(self.config_path)
        env.update(extra)
        return env

    def spoolops(self, *args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run the ``spoolops`` command line."""
        return subprocess.run([sys.executable, "-m", "spoolops", *args], check=False,
                              capture_output=True, text=True, timeout=timeout,
                              env=self.env(), **kw)

    def start_worker(self, *args: str, wait: bool = True, log: Path | None = None,
                     prefix: Sequence[str] = (), **env: str) -> subprocess.Popen:
        """``spoolops worker ARGS`` (after ``prefix``, e.g. a setpriv command);
        its log is ``proc.log_path``."""
        log = log or self.base / f"worker-{len(self.workers)}.log"
        cmd = [*prefix, sys.executable, "-m", "spoolops", "worker", *args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env(**env), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out)
        proc.log_path = log  # type: ignore[attr-defined]
        self.workers.append(proc)
        if wait:
            self.wait_log(proc, f"event=worker_ready pid={proc.pid}")
        return proc

    def wait_log(self, proc: subprocess.Popen, text: str, timeout: float = 60) -> str:
        """Wait until the worker's log holds ``text``; returns the log."""
        return wait_log(proc, text, timeout)

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


def wait_log(proc: subprocess.Popen, text: str, timeout: float = 60) -> str:
    """Wait until a worker's log (``proc.log_path``) holds ``text``; returns
    the log.  Fails at once if the worker exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]
        if text in content:
            return content
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}: {content}")
        time.sleep(0.02)   # poll interval of a wait with a deadline (a log line)
    raise AssertionError(f"no {text!r} in the worker log within {timeout} s")


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


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)   # poll interval of a wait with a deadline, not a stand-in
    raise AssertionError(f"timed out waiting for {what}")


def is_root() -> bool:
    return os.geteuid() == 0


# -- real accounts ------------------------------------------------------------

@pytest.fixture(scope="session")
def accounts():
    """The test accounts (created once per session, removed at the end)."""
    from accounts import Accounts, unusable_reason
    why = unusable_reason()
    if why is not None:
        unavailable(why)
    made = Accounts()
    try:
        made.create()
    except RuntimeError as exc:
        unavailable(str(exc))
    yield made
    made.remove()


def _shared_access() -> dict[str, str]:
    from accounts import WEB
    return {"restricted": WEB, "update_headers": WEB, "ingest_upload": WEB}


SHARED_ACCESS = _shared_access()


@pytest.fixture(scope="session")
def deployment(accounts):
    """One real deployment with its worker running, shared by many tests
    (each leaves it as it found it)."""
    from accounts import Deployment
    dep = Deployment.create(accounts, access=SHARED_ACCESS)
    dep.start_worker()
    yield dep
    dep.close()


@pytest.fixture
def fresh_deployment(accounts):
    """A real deployment of this test's own, no worker started yet."""
    from accounts import Deployment
    dep = Deployment.create(accounts, access=SHARED_ACCESS)
    yield dep
    dep.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line saying what did not run here and why (CI turns these into failures)."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons: dict[str, int] = {}
    for report in skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        parts = "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items()))
        terminalreporter.write_line(f"spoolops: {len(skipped)} test(s) did not run here: {parts}")
    else:
        terminalreporter.write_line("spoolops: every test ran (none skipped)")


class Lines:
    """The lines a child process prints, read by a thread, waited for with a
    deadline (select() on a buffered pipe misses lines already buffered)."""

    def __init__(self, stream) -> None:
        import queue
        import threading
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def next(self, until: float) -> str | None:
        """The next line, or None if none comes before ``until`` (monotonic)."""
        import queue
        try:
            return self._queue.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            return None


# -- both transports ------------------------------------------------------------

TRANSPORTS = ("spool", "postgresql")


@pytest.fixture(scope="session")
def pg_cluster(request):
    """A throwaway PostgreSQL cluster for the session (the machine's server
    binaries, run as an unprivileged account when the tests run as root)."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        unavailable(f"psycopg 3 / psycopg_pool are not installed ({exc}): pip install"
                    " '.[postgresql]'")
    from spoolops.pgcluster import PgUnavailable, start_cluster
    try:
        cluster = start_cluster()
    except PgUnavailable as exc:
        unavailable(f"no PostgreSQL to test with: {exc}")
    try:
        # the tests log in as the roles they name through cluster.dsn(); this
        # one only from a configuration written by hand (test_pg's outsider)
        cluster.allow("outsider")
        from accounts import WORKER, unusable_reason
        if unusable_reason() is None:
            # test_fitsstorage_pg runs the worker account's site code as an archive role
            try:
                request.getfixturevalue("accounts")
                cluster.admit(WORKER, named_roles=True)
            except (pytest.skip.Exception, pytest.fail.Exception, PgUnavailable):
                pass                 # the real-account tests say why themselves
    except BaseException:
        cluster.destroy()
        raise
    yield cluster
    cluster.destroy()


def queue_for(request, tmp_path: Path, kind: str, **kw):
    from queues import make_queue
    cluster = request.getfixturevalue("pg_cluster") if kind == "postgresql" else None
    env = make_queue(kind, cluster, tmp_path / "q", **kw)
    request.addfinalizer(env.close)
    return env


@pytest.fixture(params=TRANSPORTS)
def queue(request, tmp_path: Path):
    """An empty queue of each transport (no worker yet)."""
    return queue_for(request, tmp_path, request.param)


@pytest.fixture
def served(queue):
    """A queue of each transport with its worker running."""
    queue.start_worker()
    return queue


@pytest.fixture
def pgq(pg_cluster, tmp_path: Path):
    """A PostgreSQL queue of its own (schema, roles web1/web2/worker), no worker."""
    from queues import make_pg_queue
    env = make_pg_queue(pg_cluster, tmp_path / "q")
    yield env
    env.close()


@pytest.fixture
def ctx(tmp_path: Path):
    """An operation's context on a throwaway storage/staging/work tree, for
    running operations in-process."""
    from spoolops.config import Config
    from spoolops.ops import OpContext
    for name in ("storage", "staging", "work"):
        (tmp_path / name).mkdir()
    config = Config(storage_root=tmp_path / "storage", upload_staging_dir=tmp_path / "staging",
                    root=tmp_path / "spool")
    return OpContext(config=config, work_dir=tmp_path / "work", request_id="req-1")
