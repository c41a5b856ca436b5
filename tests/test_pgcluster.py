"""``spoolops.pgcluster``, the throwaway clusters of the demo, the tests and
the bench, as a hostile local account meets them (issue 20, finding 6).

Real processes, no mocks: clusters started by root from the machine's server
binaries; two throwaway unix accounts, ``spt_pgx`` (nothing to do with the
cluster) and ``spt_pgc`` (admitted: may reach the socket), both running
``psql`` under ``runuser``.  What must hold: the server runs as an account
made for it (never ``postgres``, never root) and that account goes with the
cluster; ``pg_hba.conf`` never says ``trust`` and there is no TCP; the
socket folder is closed to other accounts; an unrelated account can neither
connect nor make the server run a program; an admitted one is only its own
role; the invoking account (root here) still does everything it needs to.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import stat
import subprocess
from pathlib import Path

import pytest
from support.accounts import account_name
from support.requires import unavailable

STRANGER = account_name("pgx")      # an unrelated local account
CLIENT = account_name("pgc")        # an account admitted to the cluster


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)


@pytest.fixture(scope="module")
def pgcluster_module():
    if os.geteuid() != 0:
        unavailable("pgcluster's accounts need root (CI runs the tests as root)")
    from spoolops import pgcluster
    try:
        pgcluster.find_bindir()
    except pgcluster.PgUnavailable as exc:
        unavailable(f"no PostgreSQL to test with: {exc}")
    return pgcluster


@pytest.fixture(scope="module")
def local_accounts(pgcluster_module):
    for name in (STRANGER, CLIENT):
        _run("userdel", "-f", name)                  # leftovers of an aborted run
        _run("groupdel", name)
        done = _run("useradd", "-M", "-U", "-d", "/nonexistent", "-s", "/usr/sbin/nologin",
                    name)
        assert done.returncode == 0, done.stderr
    yield
    for name in (STRANGER, CLIENT):
        _run("userdel", "-f", name)
        _run("groupdel", name)


@pytest.fixture(scope="module")
def cluster(pgcluster_module, local_accounts):
    """A cluster as the suite's ``pg_cluster`` starts it (root, no ``peer``)."""
    made = pgcluster_module.start_cluster()
    made.psql("CREATE ROLE web1 LOGIN")
    made.dsn("postgres", "web1")                   # the invoking side names its role
    yield made
    made.destroy()


def server_pid(cluster) -> int:
    return int((Path(cluster.data) / "postmaster.pid").read_text().splitlines()[0])


def server_uid(cluster) -> int:
    return os.stat(f"/proc/{server_pid(cluster)}").st_uid


def psql_as(account: str, cluster, sql: str, user: str = "postgres") -> subprocess.CompletedProcess:
    """``psql`` in a process of ``account`` (its groups from /etc/group)."""
    return subprocess.run(
        ["runuser", "-u", account, "--", str(Path(cluster.bindir) / "psql"), "-X", "-At",
         "-v", "ON_ERROR_STOP=1", "-h", cluster.host, "-p", str(cluster.port), "-U", user,
         "-d", "postgres", "-c", sql],
        capture_output=True, text=True, check=False, timeout=60, cwd="/",
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/", "LANG": "C.UTF-8"})


REFUSED = ("Permission denied", "authentication failed", "does not exist")


def test_the_server_runs_as_an_account_of_its_own(cluster) -> None:
    uid = server_uid(cluster)
    assert uid != 0
    try:
        assert uid != pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pass
    account = pwd.getpwuid(uid)
    assert account.pw_name.startswith("spoolops-pg-"), account
    assert account.pw_shell.endswith(("nologin", "false"))
    # a superuser's program runs as that account, not as postgres or root
    marker = Path(f"/tmp/spoolops-pgc-{secrets.token_hex(4)}")
    try:
        cluster.psql(f"COPY (SELECT 1) TO PROGRAM 'id -u > {marker}'")
        assert int(marker.read_text()) == uid
    finally:
        marker.unlink(missing_ok=True)


def test_pg_hba_never_trusts_and_there_is_no_tcp(cluster) -> None:
    hba = (Path(cluster.data) / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert rules, hba
    for rule in rules:
        assert "trust" not in rule, hba
        assert rule[0] == "local" and rule[3] == "peer", hba
    assert cluster.psql("SHOW listen_addresses").strip() == ""
    assert cluster.psql("SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'trust'"
                        " OR type <> 'local'").strip() == "0"


def test_the_socket_folder_is_closed_to_other_accounts(cluster) -> None:
    uid = server_uid(cluster)
    gid = pwd.getpwuid(uid).pw_gid
    for folder in (Path(cluster.base), Path(cluster.host)):
        st = os.stat(folder)
        assert (st.st_uid, st.st_gid) == (uid, gid), folder
        assert stat.S_IMODE(st.st_mode) == 0o710, (folder, oct(st.st_mode))
    socket = os.stat(Path(cluster.host) / f".s.PGSQL.{cluster.port}")
    assert stat.S_IMODE(socket.st_mode) == 0o770 and socket.st_gid == gid
    # the server's group: nobody in it but the server's account itself
    group = grp.getgrgid(gid)
    assert group.gr_mem == [] and group.gr_name == pwd.getpwuid(uid).pw_name


def test_an_unrelated_account_cannot_connect_nor_run_a_program(cluster) -> None:
    marker = Path(f"/tmp/spoolops-pgx-{secrets.token_hex(4)}")
    try:
        for user in ("postgres", "web1", STRANGER):
            for sql in ("SELECT 1", f"COPY (SELECT 1) TO PROGRAM 'id > {marker}'"):
                done = psql_as(STRANGER, cluster, sql, user=user)
                assert done.returncode != 0, (user, sql, done.stdout)
                assert any(word in done.stderr for word in REFUSED), done.stderr
        done = psql_as("nobody", cluster, f"COPY (SELECT 1) TO PROGRAM 'id > {marker}'")
        assert done.returncode != 0 and any(w in done.stderr for w in REFUSED), done.stderr
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def test_the_invoking_side_is_the_roles_it_names_and_nothing_else(cluster) -> None:
    import psycopg
    assert cluster.psql("SELECT current_user").strip() == "postgres"
    with psycopg.connect(cluster.dsn("postgres", "web1")) as conn:
        assert conn.execute("SELECT session_user").fetchone() == ("web1",)
    # a role it never named: refused by pg_ident, until it names it
    cluster.psql("CREATE ROLE unnamed LOGIN")
    unnamed = f"host={cluster.host} port={cluster.port} dbname=postgres user=unnamed"
    with pytest.raises(psycopg.OperationalError, match="Peer authentication failed"):
        psycopg.connect(unnamed).close()
    cluster.allow("unnamed")
    with psycopg.connect(unnamed) as conn:
        assert conn.execute("SELECT session_user").fetchone() == ("unnamed",)


def test_an_admitted_account_is_its_own_role_only(pgcluster_module, local_accounts) -> None:
    """``peer``: what the real-account tests use -- the account reaches the
    socket and logs in as the role of its name; not as the superuser, not as
    another role, and no program runs for it."""
    made = pgcluster_module.start_cluster(peer=True, clients=[CLIENT])
    marker = Path(f"/tmp/spoolops-pgc-{secrets.token_hex(4)}")
    try:
        made.psql(f"CREATE ROLE {CLIENT} LOGIN; CREATE ROLE web1 LOGIN")
        assert CLIENT in grp.getgrnam(made.run_as).gr_mem
        done = psql_as(CLIENT, made, "SELECT session_user", user=CLIENT)
        assert done.returncode == 0 and done.stdout.strip() == CLIENT, done.stderr
        for user in ("postgres", "web1"):
            done = psql_as(CLIENT, made, "SELECT 1", user=user)
            assert done.returncode != 0 and "Peer authentication failed" in done.stderr, \
                done.stderr
        done = psql_as(CLIENT, made, f"COPY (SELECT 1) TO PROGRAM 'id > {marker}'",
                       user=CLIENT)
        assert done.returncode != 0 and "pg_execute_server_program" in done.stderr, \
            done.stderr
        done = psql_as(STRANGER, made, "SELECT 1", user=STRANGER)
        assert done.returncode != 0 and "Permission denied" in done.stderr, done.stderr
        # peer: the invoking account is postgres or itself, not the roles it names
        import psycopg
        with pytest.raises(psycopg.OperationalError, match="Peer authentication failed"):
            psycopg.connect(made.dsn("postgres", "web1")).close()
        assert not marker.exists()
    finally:
        marker.unlink(missing_ok=True)
        made.destroy()
    assert [g.gr_name for g in grp.getgrall() if CLIENT in g.gr_mem] == []


def test_a_stand_in_is_the_named_roles_never_the_superuser(pgcluster_module,
                                                           local_accounts) -> None:
    """``admit(..., named_roles=True)``: how the suite's worker account logs in
    as an archive role a test made (test_fitsstorage_pg)."""
    made = pgcluster_module.start_cluster()
    try:
        made.psql("CREATE ROLE archive_wrk LOGIN; CREATE ROLE unnamed LOGIN")
        made.admit(CLIENT, named_roles=True)
        made.dsn("postgres", "archive_wrk")
        done = psql_as(CLIENT, made, "SELECT session_user", user="archive_wrk")
        assert done.returncode == 0 and done.stdout.strip() == "archive_wrk", done.stderr
        for user in ("postgres", "unnamed"):
            done = psql_as(CLIENT, made, "SELECT 1", user=user)
            assert done.returncode != 0 and "Peer authentication failed" in done.stderr, \
                done.stderr
        done = psql_as(STRANGER, made, "SELECT 1", user="archive_wrk")
        assert done.returncode != 0 and "Permission denied" in done.stderr, done.stderr
    finally:
        made.destroy()


def test_destroy_removes_the_account_its_group_and_its_folder(pgcluster_module) -> None:
    made = pgcluster_module.start_cluster()
    uid = server_uid(made)
    name = pwd.getpwuid(uid).pw_name
    gid = pwd.getpwuid(uid).pw_gid
    made.destroy()
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    with pytest.raises(KeyError):
        grp.getgrgid(gid)
    assert not Path(made.base).exists()
    assert [pid for pid in os.listdir("/proc") if pid.isdigit() and _owner(pid) == uid] == []


def _owner(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
