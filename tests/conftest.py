"""The suite's fixtures and pytest hooks (helpers live in ``support``).

Nothing here mocks the filesystem, inotify or FITS I/O.  The environments
(``support.env.Env``: one face for every kind) run the worker as a separate
process (``python -m spoolops worker``) with the test site operations of
``tests/siteops`` on its path, found through the real ``spoolops.ops``
entry-point group, logging to a file the tests read (readiness is its
``event=worker_ready`` line).

Three ways to deploy:

- ``spool_env`` / ``running``: one tree owned by the user running the tests
  (quick; ``durable = no``);
- ``queue`` / ``served``: a queue of each transport (parametrised: the
  spool with ``durable = yes``, and PostgreSQL in the session's throwaway
  cluster, ``pg_cluster``); ``pgq``: a PostgreSQL one alone;
- ``deployment`` (shared, with a worker) / ``fresh_deployment`` (per test,
  no worker yet): the real thing, as ``support.accounts`` builds it --
  distinct unix accounts, the config ``spoolops init`` writes.  They need
  root; elsewhere they skip, saying why (``support.requires.unavailable``;
  in CI a failure).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.accounts import (
    SHARED_ACCESS,
    WORKER,
    Accounts,
    Deployment,
    unusable_reason,
)
from support.env import TRANSPORTS, make_pg_env, make_spool_env, queue_for
from support.requires import unavailable


@pytest.fixture
def spool_env(tmp_path: Path):
    env = make_spool_env(tmp_path / "tree", durable=False)
    yield env
    env.close()


@pytest.fixture
def running(spool_env):
    """A spool with a worker running on it."""
    spool_env.start_worker()
    return spool_env


# -- real accounts ------------------------------------------------------------

@pytest.fixture(scope="session")
def accounts():
    """The test accounts (created once per session, removed at the end)."""
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


@pytest.fixture(scope="session")
def deployment(accounts):
    """One real deployment with its worker running, shared by many tests
    (each leaves it as it found it)."""
    dep = Deployment.create(accounts, access=SHARED_ACCESS)
    dep.start_worker()
    yield dep
    dep.close()


@pytest.fixture
def fresh_deployment(accounts):
    """A real deployment of this test's own, no worker started yet."""
    dep = Deployment.create(accounts, access=SHARED_ACCESS)
    yield dep
    dep.close()


def pytest_collection_modifyitems(session, config, items) -> None:
    """Tests marked ``slow`` first (a stable sort: the same order in every
    pytest-xdist worker), so that none of them starts last and leaves one
    worker running alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


# -- both transports ------------------------------------------------------------

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


@pytest.fixture(params=TRANSPORTS)
def queue(request, tmp_path: Path):
    """An empty queue of each transport (no worker yet; ``durable = yes``)."""
    return queue_for(request, tmp_path, request.param, durable=True)


@pytest.fixture
def served(queue):
    """A queue of each transport with its worker running."""
    queue.start_worker()
    return queue


@pytest.fixture
def pgq(pg_cluster, tmp_path: Path):
    """A PostgreSQL queue of its own (schema, roles web1/web2/worker), no worker."""
    env = make_pg_env(pg_cluster, tmp_path / "q", durable=True)
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
