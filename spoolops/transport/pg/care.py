"""The PostgreSQL transport's set-up and checks: what ``spoolops init``,
``doctor`` and a starting worker ask of the queue.

``create`` makes this host's worker folder and, through an administrator's
connection, the schema (``pg.install``: idempotent, migrating, fencing the
workers of an older version); ``check_exists`` and ``check_worker`` are a
worker's checks before it serves; ``diagnose`` is ``doctor``'s -- the
server, the schema and its grants as ``init`` left them, and one line per
registered worker (alive, fenced or gone, what it holds).

Trusts: the database's identity (``session_user``) and what ``install``
made; the registrations only as the worker role wrote them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg

from ...errors import SpoolSetupError, TransportUnavailable
from ...files import ensure_tree
from ...users import worker_uid_of
from . import install, schema
from .conn import connect
from .takeover import PgTakeover

# the worker's folder on each host: its lock, memos, journals
WORK_MODE = 0o700


class PgCare(PgTakeover):
    """Set-up and checks (the workers' lines of ``doctor`` read the
    registrations, as the takeover does)."""

    def check_exists(self) -> None:
        try:
            version = self.pools.run(lambda c: install.installed_version(c, self.names))
        except psycopg.errors.InsufficientPrivilege:
            raise SpoolSetupError(f"this role may not use schema {self.names.schema}: it"
                                  f" must be a member of {self.names.submit_role} or"
                                  f" {self.names.worker_role}") from None
        if version != schema.SCHEMA_VERSION:
            raise SpoolSetupError(
                f"no queue (schema {self.names.schema}, version {schema.SCHEMA_VERSION})"
                f" in this database (found {version}): run 'spoolops init --transport"
                " postgresql' as the database administrator")

    def worker_uid(self) -> int:
        if self.config.worker_user:
            return worker_uid_of(self.config.worker_user)
        return os.getuid()

    def submit_gid(self) -> int:
        return os.getgid()   # the database's submit role decides, not a unix group

    def _role_check(self, conn: psycopg.Connection) -> tuple[str, bool, bool]:
        row = conn.execute("SELECT session_user, pg_has_role(session_user, %s, 'USAGE'),"
                           " r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname ="
                           " session_user", (self.names.worker_role,)).fetchone()
        return row if row is not None else ("?", False, False)

    def check_worker(self) -> list[str]:
        role, member, bypass = self.pools.run(self._role_check)
        if not member:
            raise SpoolSetupError(f"database role {role!r} is not a member of"
                                  f" {self.names.worker_role}: it could not claim or answer"
                                  f" (GRANT {self.names.worker_role} TO {role})")
        return [(f"connected as {role!r}, a superuser or BYPASSRLS role: give the worker a"
                " plain login role")] if bypass else []

    def diagnose(self) -> list[tuple[str, bool, str, str]]:
        try:
            conn = connect(self.dsn)
        except TransportUnavailable as exc:
            return [("database", False, str(exc), ("check [postgresql] dsn, pg_hba.conf and"
                     " that the server runs"))]
        try:
            server = conn.execute("SHOW server_version").fetchone()[0]
            out = [("database", True, (f"connected (PostgreSQL {server}, database"
                    f" {conn.info.dbname})"), "")]
            out += install.check(conn, self.names)
        finally:
            conn.close()
        # (the registrations' columns are this version's)
        if [ok for check, ok, _m, _f in out if check == "schema version"] == [True]:
            out += self._diagnose_workers()
        return out

    def may_answer(self) -> bool:
        try:
            return bool(self.pools.run(self._role_check)[1])
        except TransportUnavailable:
            return False

    def layout(self) -> list[tuple[str, Path, tuple[int, ...]]]:
        return [("worker folder", self.work_dir, (WORK_MODE, 0o2700))]

    def create(self, uid: int, gid: int, **options: Any) -> list[str]:
        """The worker's folder on this host and, unless ``local_only``, the
        schema (through ``admin_dsn``, an administrator's connection);
        ``web_logins``/``worker_logins`` join the group roles."""
        changes: list[str] = []
        if not options.get("database_only"):
            # one walk through folder descriptors: work/ is the worker's to swap
            ensure_tree(self.config.root, 0o755, [("work", WORK_MODE),
                                                  ("work/locks", WORK_MODE)],
                        uid, gid, changes)
        if options.get("local_only"):
            return changes
        admin = connect(options.get("admin_dsn") or self.dsn)
        try:
            changes += install.install(admin, self.names,
                                        tuple(options.get("web_logins") or ()),
                                        tuple(options.get("worker_logins") or ()),
                                        max_request_bytes=self.max_request_bytes)
        except psycopg.Error as exc:
            raise SpoolSetupError(f"cannot set up schema {self.names.schema}: {exc}"
                                  " (connect as the database administrator, e.g."
                                  " --admin-dsn 'dbname=... user=postgres')") from None
        finally:
            admin.close()
        return changes

    def _diagnose_workers(self) -> list[tuple[str, bool, str, str]]:
        """One line per registered worker: which holds what, and whether it
        is alive (a web role may not read the registrations: nothing)."""
        try:
            found = self.workers()
        except (TransportUnavailable, psycopg.Error):
            return []
        if found is None:
            return []
        if not found:
            return [("workers", True, "no worker registered", "")]
        stale = self.config.lock_grace / 2
        out = []
        for w in found:
            held = "running nothing"
            if w["running"]:
                more = " ..." if len(w["running"]) > 5 else ""
                held = f"running {len(w['running'])}: {', '.join(w['running'][:5])}{more}"
            if w["leases"]:
                held += f"; leases {', '.join(w['leases'])}"
            where = f"worker {w['id']} on {w['host']} (pid {w['pid']}, role {w['role']})"
            if w["fenced"]:
                ok, state = not w["running"], "FENCED (another worker took its requests over)"
                fix = "it stops when it sees it; restart it"
            elif not w["alive"]:
                ok, state = not w["running"], "gone (no session holds its key)"
                fix = ("its requests are recovered by another worker after lock_grace, or by"
                       " the next worker on its host")
            else:
                ok = w["heartbeat_age_s"] < stale
                state = (f"alive (backend {w['backend_pid']} holds its key), heartbeat"
                         f" {w['heartbeat_age_s']:g} s ago")
                fix = "" if ok else ("its main loop is stuck: another worker fences it after"
                                     " lock_grace (or restart it)")
            out.append((f"worker {w['id']}", ok, f"{where}: {state}; {held}", fix))
        return out
