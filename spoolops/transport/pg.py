"""The PostgreSQL transport: the queue as one table, for hosts that part.

A request is a row of ``<schema>.requests``.  The client INSERTs it (the
server stamps the submitter, ``session_user``, and the time) and LISTENs on
its role's reply channel before it does; the worker LISTENs for new ids,
claims a row with one ``UPDATE ... WHERE state = 'queued'`` over ``FOR
UPDATE SKIP LOCKED`` (never waiting on a row another worker is taking),
leases its targets in ``leases`` (a primary key per target: two workers never
run one target at once), and answers with one ``UPDATE`` that stores the
reply, changes the state and -- through the table's trigger -- releases the
leases and NOTIFYs the client, all in one transaction.  Every answer is
fenced by ``claimed_by`` and ``attempt``: a worker whose claim was taken
over cannot answer twice.  A request that wants no reply is answered by a
``DELETE`` fenced the same way (its leases go by cascade; it sends the
'finished' event itself); a batch kept pending after the answer (hooks to
retry) is a row of ``batch_holds``, inserted by the same statement.

Workers register in ``workers`` and hold a session advisory lock for their
life (``pgconn.IntakeListener``); a running row whose worker's lock is gone
is an orphan -- at once for this host's own dead worker (this worker holds
the host's ``work/worker.lock``), after ``lock_grace`` for another host's.

Trusts: the database's identity (``session_user``) and its row-level
security (``pgschema``); a notification only as a hint.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Json, Jsonb

from ..config import Config
from ..errors import SpoolSetupError, TransportUnavailable
from ..fsutil import ensure_tree
from . import pgschema
from .base import Batch, Claimed, Orphan, Quarantined, Refused, Transport, WorkerLock
from .pgclient import PgClientSide, message_of
from .pgconn import IntakeListener, connect, shared_pools
from .pgschema import REQUEST_COLUMNS, Names, envelope, sql_name, time_ns
from .pgview import PgView
from .spoollock import FlockWorkerLock
from .spoolnames import LOCK_NAME

log = logging.getLogger("spoolops.transport")

SCAN_LIMIT = 2000
WORK_MODE = 0o700


class _PgWorkerLock(WorkerLock):
    def __init__(self, transport: PgTransport, host_lock: FlockWorkerLock,
                 listener: IntakeListener) -> None:
        self.transport, self.host_lock, self.listener = transport, host_lock, listener

    def release(self) -> None:
        transport = self.transport
        try:
            self.listener.close()
            transport.pools.run(lambda c: c.execute(
                f"DELETE FROM {transport.s}.workers w WHERE id = %s AND NOT EXISTS (SELECT 1"
                f" FROM {transport.s}.requests r WHERE r.state = 'running' AND"
                " r.claimed_by = w.id)", (transport.me,)))
        except TransportUnavailable:
            pass   # its lock went with its session; the row is the janitor's
        finally:
            transport.me = None
            transport.listener = None
            self.host_lock.release()


class PgTransport(PgClientSide, PgView, Transport):
    """One queue in one PostgreSQL schema."""

    shared = True
    scan_limit = SCAN_LIMIT

    def __init__(self, config: Config) -> None:
        if not config.dsn and not os.environ.get("PGHOST") and \
                not os.environ.get("PGSERVICE") and not os.environ.get("PGDATABASE"):
            raise SpoolSetupError("[postgresql] dsn is empty: name the queue's database")
        self.config = config
        self.dsn = config.dsn
        self.names = Names(config.schema, config.channel or config.schema,
                           config.submit_role, config.worker_role)
        self.s = sql_name(config.schema)
        self.durable = config.durable
        self.max_request_bytes = config.max_request_bytes
        self.work_dir = Path(config.root) / "work"
        self.host = socket.gethostname()
        # durable = no: commits need not wait for the server's WAL flush
        options = "" if self.durable else "-c synchronous_commit=off"
        self.pools = shared_pools(self.dsn, max(8, config.concurrency + 4), options)
        self.me: int | None = None            # this worker's id, while it serves
        self.listener: IntakeListener | None = None
        self._claims: dict[str, tuple[int, int]] = {}   # rid -> (worker, attempt) held
        self._seen: dict[str, Claimed] = {}   # queued rows read by the last scan

    def __repr__(self) -> str:
        return f"PgTransport(schema={self.names.schema!r})"

    # -- set-up -------------------------------------------------------------------

    def check_exists(self) -> None:
        try:
            version = self.pools.run(lambda c: pgschema.installed_version(c, self.names))
        except psycopg.errors.InsufficientPrivilege:
            raise SpoolSetupError(f"this role may not use schema {self.names.schema}: it"
                                  f" must be a member of {self.names.submit_role} or"
                                  f" {self.names.worker_role}") from None
        if version != pgschema.SCHEMA_VERSION:
            raise SpoolSetupError(
                f"no queue (schema {self.names.schema}, version {pgschema.SCHEMA_VERSION})"
                f" in this database (found {version}): run 'spoolops init --transport"
                " postgresql' as the database administrator")

    def worker_uid(self) -> int:
        if self.config.worker_user:
            try:
                return pwd.getpwnam(self.config.worker_user).pw_uid
            except KeyError:
                raise SpoolSetupError(f"worker user {self.config.worker_user!r} does not"
                                      " exist on this host") from None
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
            return out + pgschema.check(conn, self.names)
        finally:
            conn.close()

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
            changes += pgschema.install(admin, self.names,
                                        tuple(options.get("web_logins") or ()),
                                        tuple(options.get("worker_logins") or ()))
        except psycopg.Error as exc:
            raise SpoolSetupError(f"cannot set up schema {self.names.schema}: {exc}"
                                  " (connect as the database administrator, e.g."
                                  " --admin-dsn 'dbname=... user=postgres')") from None
        finally:
            admin.close()
        return changes

    # -- the worker: intake ---------------------------------------------------------

    def lock_worker(self, wait: bool, should_stop: Callable[[], bool]) -> WorkerLock:
        # one worker per host folder (its journals and target locks are here)
        host_lock = FlockWorkerLock(self.work_dir / LOCK_NAME)
        host_lock.acquire(wait, should_stop)
        try:
            self.me = self.pools.run(self._register, retry=False)
            self.listener = IntakeListener(self.dsn, self.names.new_channel,
                                           (self.names.lock_space, self.me),
                                           self.config.lock_grace, self._locked)
        except BaseException:
            self.me = None
            host_lock.release()
            raise
        log.info("event=worker_registered worker=%d host=%s", self.me, self.host)
        return _PgWorkerLock(self, host_lock, self.listener)

    def _register(self, conn: psycopg.Connection) -> int:
        with conn.transaction():
            # this host's earlier workers are dead (we hold its lock): their
            # rows go, unless they left requests for recovery
            conn.execute(f"DELETE FROM {self.s}.workers w WHERE host = %s AND work_dir = %s"
                         f" AND NOT EXISTS (SELECT 1 FROM {self.s}.requests r WHERE r.state ="
                         " 'running' AND r.claimed_by = w.id)", (self.host, str(self.work_dir)))
            return conn.execute(f"INSERT INTO {self.s}.workers (host, work_dir, pid) VALUES"
                                " (%s, %s, %s) RETURNING id",
                                (self.host, str(self.work_dir), os.getpid())).fetchone()[0]

    def _locked(self, conn: psycopg.Connection) -> None:
        """This worker holds its lock (again): a loss another worker noted in
        the meantime is over, and its grace must start afresh next time."""
        conn.execute(f"UPDATE {self.s}.workers SET lost_at = NULL WHERE id = %s AND"
                     " lost_at IS NOT NULL", (self.me,))

    def watch(self) -> int:
        assert self.listener is not None, "lock_worker first"
        return self.listener.fileno()

    def unwatch(self) -> None:
        pass   # the listener is the lock's: released with it

    def arrivals(self) -> list[str] | None:
        assert self.listener is not None
        return self.listener.take()

    def scan(self) -> list[str]:
        rows = self.pools.run(lambda c: c.execute(
            f"SELECT {REQUEST_COLUMNS} FROM {self.s}.requests WHERE state = 'queued'"
            " ORDER BY priority DESC, submitted, id LIMIT %s", (SCAN_LIMIT,)).fetchall())
        self._seen = {row[0]: self._claimed(row) for row in rows}
        return list(self._seen)

    def _claimed(self, row: tuple) -> Claimed:
        rid, submitter = row[0], row[1]   # a row of REQUEST_COLUMNS
        return Claimed(rid, rid, envelope(row), submitter, min(time_ns(row[9]), time.time_ns()))

    def peek(self, entry: str) -> Claimed | None:
        seen = self._seen.get(entry)
        if seen is not None:
            return seen
        row = self.pools.run(lambda c: c.execute(
            f"SELECT {REQUEST_COLUMNS} FROM {self.s}.requests WHERE id = %s AND state ="
            " 'queued'", (entry,)).fetchone())
        return None if row is None else self._claimed(row)

    def claim(self, entry: str) -> Claimed | Refused | Quarantined | None:
        return self.claim_all([entry])[0]

    def claim_all(self, entries: list[str]) -> list[Claimed | Refused | Quarantined | None]:
        """One statement for the lot (requests that arrive together)."""
        for entry in entries:
            self._seen.pop(entry, None)
        rows = self.pools.run(lambda c: c.execute(
            f"UPDATE {self.s}.requests r SET state = 'running', claimed_by = %s, claimed_at ="
            f" clock_timestamp(), attempt = r.attempt + 1 FROM (SELECT id FROM {self.s}.requests"
            " WHERE id = ANY(%s) AND state = 'queued' FOR UPDATE SKIP LOCKED) c WHERE"
            " r.id = c.id RETURNING r.attempt,"
            f" {', '.join('r.' + c for c in REQUEST_COLUMNS.split(', '))}",
            (self.me, entries)).fetchall(), retry=False)
        # what is missing was withdrawn, or taken by another worker
        found = {row[1]: row for row in rows}
        return [self._took(entry, found[entry]) if entry in found else None
                for entry in entries]

    def _took(self, entry: str, row: tuple) -> Claimed | Refused:
        self._claims[entry] = (self.me, row[0])
        claimed = self._claimed(row[1:])
        if len(claimed.data) > self.max_request_bytes:
            return Refused(entry, entry, claimed.user, claimed.queued_ns,
                           f"request is {len(claimed.data)} bytes, more than"
                           f" max_request_bytes ({self.max_request_bytes})")
        return claimed

    def lease(self, rid: str, targets: tuple[str, ...]) -> bool:
        if not targets:
            return True
        wanted = sorted(set(targets))

        def work(conn: psycopg.Connection) -> bool:
            with conn.transaction() as tx:
                got = conn.execute(
                    f"WITH got AS (INSERT INTO {self.s}.leases (target, request_id) SELECT t,"
                    " %s FROM unnest(%s::text[]) t ON CONFLICT DO NOTHING RETURNING 1)"
                    " SELECT count(*) FROM got", (rid, wanted)).fetchone()[0]
                if got != len(wanted):
                    raise psycopg.Rollback(tx)
                conn.execute(f"UPDATE {self.s}.requests SET targets = %s WHERE id = %s",
                             (list(targets), rid))
                return True
            return False
        return bool(self.pools.run(work, retry=False))

    def _claim_of(self, rid: str) -> tuple[int, int]:
        claim = self._claims.get(rid)
        if claim is None:
            raise TransportUnavailable(f"{rid} is not claimed by this process")
        return claim

    def _fenced(self, rid: str, what: str, query: str, params: tuple, tail: str = "",
                tail_params: tuple = ()) -> None:
        """Run an update of a claimed row, fenced by (worker, attempt); the
        fence goes between ``query`` and ``tail`` (the rest of a statement
        whose first part is the update, e.g. a CTE's)."""
        worker, attempt = self._claim_of(rid)
        count = self.pools.run(lambda c: c.execute(
            query + " AND state = 'running' AND claimed_by = %s AND attempt = %s" + tail,
            (*params, worker, attempt, *tail_params)).rowcount)
        if count == 0 and what in ("reply", "fail", "put_back"):
            row = self.pools.run(lambda c: c.execute(
                f"SELECT state, claimed_by, attempt FROM {self.s}.requests WHERE id = %s",
                (rid,)).fetchone())
            if row is None or row[1:] != (worker, attempt) or row[0] == "running":
                log.warning("event=claim_lost id=%s action=%s state=%s note=%r", rid, what,
                            row[0] if row else None, "another worker took it over (this"
                            " one was cut off from the database): its answer stands")
        if what != "progress" and what != "start":
            self._claims.pop(rid, None)

    def put_back(self, rid: str) -> None:
        self._fenced(rid, "put_back",
                     f"UPDATE {self.s}.requests SET state = 'queued', claimed_by = NULL,"
                     " claimed_at = NULL, run = NULL, targets = NULL WHERE id = %s", (rid,))

    # -- the worker: running and answering -------------------------------------------

    def start(self, rid: str, record: dict[str, Any], durable: bool) -> None:
        self._fenced(rid, "start", f"UPDATE {self.s}.requests SET run = %s WHERE id = %s",
                     (Json(record), rid))

    def progress(self, rid: str, record: dict[str, Any]) -> None:
        self._fenced(rid, "progress", f"UPDATE {self.s}.requests SET run = %s WHERE id = %s",
                     (Json(record), rid))

    def reply(self, rid: str, reply: dict[str, Any], started: bool = True, *,
              deliver: bool = True, batch: Batch | None = None) -> None:
        """One statement, whatever is asked: the UPDATE that stores the reply
        (the trigger frees the leases and NOTIFYs), or, ``deliver=False``, a
        DELETE of the row (its leases go by cascade) that sends the 'finished'
        event itself; with a held batch, a CTE that also inserts the hold."""
        hold = batch is not None and batch.held and batch.name is not None
        # the hold names the batch as the row does (args->>'batch': a batch
        # that is no string is kept as the client wrote it), so that it is
        # spelt alike while queued, running and held
        held = (f", held AS (INSERT INTO {self.s}.batch_holds (request_id, batch) SELECT id,"
                " coalesce(batch, %s) FROM done ON CONFLICT (request_id) DO NOTHING)"
                ) if hold else ""
        if deliver and not hold:     # the hot path: the statement it always was
            query = (f"UPDATE {self.s}.requests SET state = 'answered', reply = %s, finished ="
                     " clock_timestamp(), run = NULL WHERE id = %s")
            tail = ""
        elif deliver:
            query = (f"WITH done AS (UPDATE {self.s}.requests SET state = 'answered', reply ="
                     " %s, finished = clock_timestamp(), run = NULL WHERE id = %s")
            tail = " RETURNING id, batch)" + held + " SELECT id FROM done"
        else:
            query = f"WITH done AS (DELETE FROM {self.s}.requests WHERE id = %s"
            tail = (" RETURNING id, op, batch)" + held + f" SELECT pg_notify(%s, {self.s}."
                    "finished_event(id, op, %s, 'no reply wanted: removed')) FROM done")

        def run(answer: dict[str, Any]) -> None:
            params = (Json(answer), rid) if deliver else (rid,)
            tail_params: tuple = (batch.name,) if hold else ()
            if not deliver:
                tail_params += (self.names.events_channel, Json(_outcome(answer)))
            self._fenced(rid, "reply", query, params, tail, tail_params)
        try:
            run(reply)
        except (psycopg.DataError, ValueError) as exc:
            # a result the database cannot hold (a NUL in a string): the
            # request must still be answered, and the reason said
            log.error("event=reply_refused id=%s error=%r", rid, message_of(exc))
            run(_unstorable(reply, exc))

    def release_batch(self, rid: str, batch: Batch) -> None:
        self.pools.run(lambda c: c.execute(
            f"DELETE FROM {self.s}.batch_holds WHERE request_id = %s", (rid,)))

    def quarantine(self, entry: str, reason: str, claimed: bool) -> Quarantined:
        if claimed and entry in self._claims:
            self._fenced(entry, "fail", f"UPDATE {self.s}.requests SET state = 'failed',"
                         " reason = %s, finished = clock_timestamp(), run = NULL WHERE id = %s",
                         (reason, entry))
        else:
            self.pools.run(lambda c: c.execute(
                f"UPDATE {self.s}.requests SET state = 'failed', reason = %s, finished ="
                " clock_timestamp() WHERE id = %s AND state = 'queued'", (reason, entry)))
        return Quarantined(entry, reason)

    def fail(self, rid: str, reply: dict[str, Any], reason: str) -> None:
        self._fenced(rid, "fail", f"UPDATE {self.s}.requests SET state = 'failed', reply = %s,"
                     " reason = %s, finished = clock_timestamp(), run = NULL WHERE id = %s",
                     (Json(reply), reason, rid))

    # -- recovery --------------------------------------------------------------------

    def unpublished(self) -> list[tuple[str, dict[str, Any] | None]]:
        return []   # a reply and its state change commit together

    def where(self, rid: str) -> str | None:
        row = self.pools.run(lambda c: c.execute(
            f"SELECT state FROM {self.s}.requests WHERE id = %s", (rid,)).fetchone())
        return row[0] if row and row[0] in ("queued", "running", "failed") else None

    def publish_recorded(self, rid: str) -> None:
        pass

    def discard_recorded(self, rid: str) -> None:
        pass

    def _dead_workers_sql(self) -> str:
        """Running rows whose worker holds no lock; ``lost_at`` stamped once."""
        return (f"SELECT r.id, r.claimed_by, r.attempt, r.run IS NOT NULL, w.host, w.work_dir,"
                f" w.pid, w.lost_at, clock_timestamp() FROM {self.s}.requests r LEFT JOIN"
                f" {self.s}.workers w ON w.id = r.claimed_by WHERE r.state = 'running' AND"
                f" r.claimed_by IS DISTINCT FROM %(me)s AND NOT"
                f" {self.names.lock_held('r.claimed_by')} ORDER BY r.claimed_at")

    def orphans(self) -> list[Orphan]:
        params = {"me": self.me}

        def work(conn: psycopg.Connection) -> list[tuple]:
            rows = conn.execute(self._dead_workers_sql(), params).fetchall()
            lost = sorted({r[1] for r in rows if r[7] is None and r[1] is not None})
            if lost:
                conn.execute(f"UPDATE {self.s}.workers SET lost_at = clock_timestamp() WHERE"
                             " id = ANY(%s) AND lost_at IS NULL", (lost,))
            return rows
        out = []
        for rid, worker, attempt, started, host, work_dir, pid, lost_at, now in \
                self.pools.run(work):
            local = host == self.host and work_dir == str(self.work_dir)
            # this host's own dead worker is surely dead: its host lock is ours now
            if not local and (lost_at is None or
                              (now - lost_at).total_seconds() < self.config.lock_grace):
                continue
            self._claims[rid] = (worker, attempt)
            out.append(Orphan(rid, rid, started, f"{self.names.schema}.requests id={rid}"
                              f" (worker {worker} on {host or '?'}, pid {pid})", local=local))
        return out

    def read_claimed(self, entry: str) -> Claimed | None:
        row = self.pools.run(lambda c: c.execute(
            f"SELECT {REQUEST_COLUMNS} FROM {self.s}.requests WHERE id = %s", (entry,)
        ).fetchone())
        return None if row is None else self._claimed(row)

    def clear(self, rid: str) -> None:
        pass   # an answered request is never running: nothing to clear

    def drop_leftovers(self, dry_run: bool = False) -> list[str]:
        return []

    def recovery_pending(self) -> bool:
        return bool(self.orphans())

    # -- the worker's counters -------------------------------------------------------

    def save_stats(self, snapshot: dict[str, Any]) -> bool:
        if self.me is None:
            return False
        try:
            self.pools.run(lambda c: c.execute(
                f"UPDATE {self.s}.workers SET stats = %s, stats_at = clock_timestamp() WHERE"
                " id = %s", (Jsonb(snapshot), self.me)))
        except TransportUnavailable:
            return False
        return True


def _outcome(reply: dict[str, Any]) -> dict[str, Any]:
    """What the 'finished' event says of a reply that is not kept (its
    result can be large, and is nobody's)."""
    error = reply.get("error")
    return {"ok": reply.get("ok"), "started_at": reply.get("started_at"),
            "finished_at": reply.get("finished_at"),
            "error": {"type": error.get("type"), "message": error.get("message")}
            if isinstance(error, dict) else None}


def _unstorable(reply: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    return dict(reply, ok=False, result=None, error={
        "type": "OpFailed", "message": "the operation's reply could not be stored in the"
        f" queue: {message_of(exc)}"})


__all__ = ["PgTransport"]
