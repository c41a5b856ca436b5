"""The PostgreSQL transport: the queue as one table, for hosts that part.

A request is a row of ``<schema>.requests``.  The client INSERTs it (the
server stamps the submitter, ``session_user``, and the time) and LISTENs on
its role's reply channel before it does; the worker LISTENs for new ids,
claims rows with one ``UPDATE ... WHERE state = 'queued'`` over ``FOR
UPDATE`` in id order (waiting for a claim another worker is committing, so
that what it did not get is seen running), leases its targets in ``leases``
(a primary key per target: two workers never run one target at once; and
no lease while an earlier request on one of them is still queued or
running, whichever worker holds it: ``lease``), and answers with one
``UPDATE`` that stores the reply, changes the state and -- through the
table's trigger -- releases the leases and NOTIFYs the client, all in one
transaction.  Every answer is fenced by ``claimed_by`` and ``attempt``: a
worker whose claim was taken over cannot answer twice.  A request that wants
no reply is answered by a ``DELETE`` fenced the same way (its leases go by
cascade; it sends the 'finished' event itself); a batch kept pending after
the answer (hooks to retry) is a row of ``batch_holds``, inserted by the
same statement.

Workers register in ``workers`` with the pid of their listening backend
and a random advisory key it holds (``pg.conn.IntakeListener``; the test is
``schema.Names.lock_held``), and their main loop writes ``heartbeat``
every ``lock_grace / 4``.  A running row whose worker is not alive, or
whose heartbeat is stale (a worker frozen or hung: its lock stays held), is
an orphan -- at once for this host's own dead worker (this worker holds the
host's ``work/worker.lock``), after ``lock_grace`` of being seen so for
another host's, which is then fenced (``fenced_at``; its session
terminated when this role may) before its requests are recovered.  Rows a
worker holds without knowing it (a claim whose answer was lost, a failed
``put_back``) are its ``strays``, recovered by itself.

Trusts: the database's identity (``session_user``) and its row-level
security (``pg.schema``); a notification only as a hint; other workers (the
worker role) to report their own liveness honestly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Json, Jsonb

from ...config import Config
from ...errors import TransportUnavailable
from ...formats import valid_id
from ...workhome import lock_path
from ..base import (
    AnswersInPlace,
    Batch,
    Claimed,
    Quarantined,
    Refused,
    SharedQueue,
    Transport,
    WorkerLock,
)
from ..worklock import FlockWorkerLock
from . import schema
from .care import PgCare
from .client import PgClientSide, message_of
from .conn import IntakeListener, WorkerFenced
from .queue import PgQueue
from .schema import REQUEST_COLUMNS, envelope, row_of_hint, time_ns
from .view import ROW_STATES, PgView

log = logging.getLogger("spoolops.transport")

SCAN_LIMIT = 2000
# how long an in-place answer whose reply was lost waits for the server, to
# learn which rows it answered (counted and logged as served)
LOST_ANSWER_WAIT_S = 2.0
# the rows notices carried that are kept at once (each under 8000 bytes): a
# flood of arrivals is read again from the table, one at a time
HINTS_KEPT = 256
# SQL: request e comes before request r in the queue's order (the claim's)
_EARLIER = ("(e.priority > r.priority OR (e.priority = r.priority AND (e.submitted, e.id) <"
            " (r.submitted, r.id)))")


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


class PgTransport(PgClientSide, PgView, PgCare, PgQueue, Transport, SharedQueue,
                  AnswersInPlace):
    """One queue in one PostgreSQL schema."""

    scan_limit = SCAN_LIMIT

    def __init__(self, config: Config) -> None:
        PgQueue.__init__(self, config)
        self.listener: IntakeListener | None = None
        self._claims: dict[str, tuple[int, int]] = {}   # rid -> (worker, attempt) held
        # queued rows (of REQUEST_COLUMNS) as last read: by the scan, or
        # carried by their notices (at most HINTS_KEPT of those)
        self._seen: dict[str, _Read] = {}

    create_options = frozenset({"admin_dsn", "web_logins", "worker_logins", "database_only"})
    place_heading = "row state"

    @classmethod
    def from_config(cls, config: Config) -> PgTransport:
        return cls(config)

    @classmethod
    def ready_line(cls, config: Config, worker_user: str, group: str) -> str:
        return (f"queue ready in schema {config.schema} (worker folder {config.root}/work,"
                f" worker {worker_user})")

    def title(self) -> str:
        return f"queue {self.names.schema} (PostgreSQL)"

    def place_of(self, state: str) -> str:
        return ROW_STATES[state]

    def __repr__(self) -> str:
        return f"PgTransport(schema={self.names.schema!r})"

    # -- the worker: intake ---------------------------------------------------------

    def lock_worker(self, wait: bool, should_stop: Callable[[], bool]) -> WorkerLock:
        # one worker per host folder (its journals and target locks are here)
        host_lock = FlockWorkerLock(lock_path(self.work_dir))
        host_lock.acquire(wait, should_stop)
        try:
            self.me = self.pools.run(self._register, retry=False)
            self.listener = IntakeListener(self.dsn, self.names.new_channel,
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

    def _locked(self, conn: psycopg.Connection, key: int) -> None:
        """This worker holds ``key`` on ``conn`` (again): register the pair
        (the liveness test), on that connection, so that it is this very
        session.  A loss another worker noted in the meantime is over (its
        grace must start afresh next time) -- unless the heartbeat is stale
        too.  ``WorkerFenced`` when another worker took this one's requests
        over meanwhile, or its registration is gone."""
        row = conn.execute(
            f"UPDATE {self.s}.workers SET backend_pid = pg_catalog.pg_backend_pid(), lock_key"
            f" = %s, lost_at = CASE WHEN heartbeat >= {self.stale_sql()} THEN NULL ELSE"
            " lost_at END WHERE id = %s RETURNING fenced_at IS NOT NULL",
            (key, self.me)).fetchone()
        if row is None or row[0]:
            raise WorkerFenced(f"worker {self.me}: " + ("its registration is gone" if row is
                               None else "another worker took its requests over"))

    def watch(self) -> int:
        assert self.listener is not None, "lock_worker first"
        return self.listener.fileno()

    def arrivals(self) -> list[str] | None:
        assert self.listener is not None
        notices = self.listener.take()
        if notices is None:
            return None
        names = []
        for payload in notices:
            row = row_of_hint(payload)
            if row is None:
                if valid_id(payload):
                    names.append(payload)         # an id
                else:                             # no notice the trigger sends
                    log.debug("event=notice_ignored payload=%r", payload[:64])
                continue
            if len(self._seen) < HINTS_KEPT:
                self._seen[row[0]] = _Read(row)
            names.append(row[0])
        return names

    def scan(self) -> list[str]:
        # bodies up to schema.SCAN_BYTES in all: the rest are read by peek,
        # one at a time (a backlog of large requests never sits here at once)
        rows = self.pools.run(lambda c: c.execute(
            schema.scan_sql(self.s), (schema.SCAN_BYTES, SCAN_LIMIT)).fetchall())
        self._seen = {row[0]: _Read(row[2:]) for row in rows if row[1]}
        return [row[0] for row in rows]

    def _claimed(self, row: tuple) -> Claimed:
        rid, submitter = row[0], row[1]   # a row of REQUEST_COLUMNS
        return Claimed(rid, rid, envelope(row), submitter, min(time_ns(row[9]), time.time_ns()))

    def peek(self, entry: str) -> Claimed | None:
        seen = self.read_ahead(entry)
        if seen is not None:
            return seen
        row = self.pools.run(lambda c: c.execute(
            f"SELECT {REQUEST_COLUMNS} FROM {self.s}.requests WHERE id = %s AND state ="
            " 'queued'", (entry,)).fetchone())
        return None if row is None else self._claimed(row)

    def read_ahead(self, entry: str) -> Claimed | None:
        read = self._seen.get(entry)
        if read is None:
            return None
        if read.claimed is None:        # made once: the intake reads ahead more than once
            read.claimed = self._claimed(read.row)
        seen = read.claimed
        # too large for the worker: the claim refuses it (see _took)
        return None if len(seen.data) > self.max_request_bytes else seen

    def answer_queued(self, answers: Sequence[tuple[Claimed, dict[str, Any]]]) -> set[str]:
        """One UPDATE: each row answered (and claimed by this worker, its
        first attempt) only if it is still queued with every column as read,
        and this worker is not fenced.  Durable like any reply, one commit
        for the lot; the trigger NOTIFYs each client as for any reply."""
        rows, replies = [], []
        for seen, reply in answers:
            held = self._seen.pop(seen.entry, None)
            if held is not None and (held.claimed is seen or self._claimed(held.row) == seen):
                rows.append(held.row)
                replies.append(reply)
        if not rows:
            return set()
        if len(rows) == 1:
            query = schema.answer_one_sql(self.s)
            params: tuple = (Json(replies[0]), self.me, rows[0][0], *rows[0], self.me)
        else:
            reads = [{**{name: value.isoformat() if isinstance(value, datetime) else value
                         for (name, _), value in zip(schema.REQUEST_FIELDS, row)},
                      "reply": reply} for row, reply in zip(rows, replies)]
            query, params = schema.answer_queued_sql(self.s), (self.me, json.dumps(reads),
                                                                self.me)
        try:
            answered = self.pools.run(lambda c: c.execute(query, params).fetchall(),
                                      retry=False)
        except TransportUnavailable:
            # the answer is lost, committed or not: which rows did it answer?
            # Asked if the server answers again soon (a connection cut, a
            # backend ended); else this raises, and each is claimed the usual
            # way, which finds out -- without counting or logging them
            end = time.monotonic() + LOST_ANSWER_WAIT_S
            while not self.pools.reachable():
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
            answered = self.pools.run(lambda c: c.execute(
                f"SELECT id FROM {self.s}.requests WHERE id = ANY(%s) AND state = 'answered'"
                " AND claimed_by = %s AND attempt = 1",
                ([row[0] for row in rows], self.me)).fetchall())
        except (psycopg.DataError, ValueError, TypeError) as exc:
            # a reply the database cannot hold: the usual path answers each
            for row in rows:
                log.info("event=answer_in_place_refused id=%s error=%r", row[0],
                         message_of(exc))
            return set()
        return {rid for (rid,) in answered}

    def claim(self, entry: str) -> Claimed | Refused | Quarantined | None:
        return self.claim_all([entry])[0]

    def claim_all(self, entries: list[str]) -> list[Claimed | Refused | Quarantined | None]:
        """One statement for the lot (requests that arrive together), in
        ``claim_batch``: workers take turns, so another worker's claim is
        waited for, never skipped -- once this returns, what it did not get
        is visibly running elsewhere (the order rule of ``lease`` relies on
        it) -- while a row some web role holds locked (its own cancel or
        collect, in a transaction left open) is skipped: it stays queued for
        a later round and holds up no one else."""
        for entry in entries:
            self._seen.pop(entry, None)
        rows = self.pools.run(lambda c: c.execute(
            f"SELECT attempt, {REQUEST_COLUMNS} FROM {self.s}.claim_batch(%s, %s)",
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
        """Hold ``targets`` for ``rid`` -- unless one is leased, or an earlier
        request (priority, submitted, id) is still in the way: queued or
        running with a target of these (its targets stored by a ``lease``,
        ``start`` or ``put_back``), or running elsewhere with targets nobody
        has stored yet (claimed, not yet leased: it may need one of these).
        A worker's own claims are in its memory, its order its own.  With
        ``claim_all`` waiting for claims being committed, a later request
        never starts on a target before an earlier one, whichever worker
        holds which (the spool's promise, across workers)."""
        if not targets:
            return True
        wanted = sorted(set(targets))
        mine = [r for r, (worker, _) in self._claims.items() if worker == self.me]
        worker, attempt = self._claim_of(rid)
        params = {"rid": rid, "wanted": wanted, "me": self.me, "mine": mine,
                  "worker": worker, "attempt": attempt}

        def work(conn: psycopg.Connection) -> bool:
            with conn.transaction() as tx:
                got, ahead = conn.execute(
                    f"WITH r AS (SELECT priority, submitted, id FROM {self.s}.requests WHERE id ="
                    " %(rid)s), ahead AS ((SELECT e.id FROM"
                    f" {self.s}.requests e, r WHERE e.state IN ('queued', 'running') AND"
                    " e.targets IS NOT NULL AND cardinality(e.targets) > 0 AND e.targets &&"
                    f" %(wanted)s::text[] AND e.id <> r.id AND {_EARLIER} LIMIT 1) UNION ALL"
                    f" (SELECT e.id FROM {self.s}.requests e, r WHERE e.state = 'running' AND"
                    " e.targets IS NULL AND NOT (e.claimed_by IS NOT DISTINCT FROM %(me)s AND"
                    f" e.id = ANY(%(mine)s::text[])) AND e.id <> r.id AND {_EARLIER} LIMIT 1)),"
                    f" got AS (INSERT INTO {self.s}.leases (target, request_id) SELECT t, %(rid)s"
                    " FROM unnest(%(wanted)s::text[]) t WHERE NOT EXISTS (SELECT 1 FROM ahead)"
                    # only for a claim that is still this worker's (one lost
                    # with the server, or taken over, leases nothing)
                    f" AND EXISTS (SELECT 1 FROM {self.s}.requests c WHERE c.id = %(rid)s AND"
                    " c.state = 'running' AND c.claimed_by = %(worker)s AND c.attempt ="
                    " %(attempt)s)"
                    " ON CONFLICT DO NOTHING RETURNING 1)"
                    " SELECT (SELECT count(*) FROM got), (SELECT min(id) FROM ahead)",
                    params).fetchone()
                if ahead is not None or got != len(wanted):
                    if ahead is not None:
                        log.debug("event=lease_waits id=%s behind=%s", rid, ahead)
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
        if count == 0 and what == "start":
            # the claim is not ours (any more): lost with the server (its commit
            # is not waited for), or taken over while this worker was frozen --
            # the op must not run (ConnectionError: the not-started path)
            self._claims.pop(rid, None)
            log.warning("event=claim_lost id=%s action=start note=%r", rid, "not run: its"
                        " claim did not survive (a server restart, or a takeover)")
            raise TransportUnavailable(f"{rid} is no longer claimed by this worker")
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

    def put_back(self, rid: str, targets: tuple[str, ...] | None = None) -> None:
        # its targets stay (those learnt now, or those stored before): while
        # it waits, a later request on one of them may not start (lease)
        known = None if targets is None else list(targets)
        try:
            self._fenced(rid, "put_back",
                         f"UPDATE {self.s}.requests SET state = 'queued', claimed_by = NULL,"
                         " claimed_at = NULL, run = NULL, targets = coalesce(%s, targets)"
                         " WHERE id = %s", (known, rid))
        finally:
            # failed, it may still be held: a stray (strays() takes it up
            # again), no longer one of this worker's own for lease's order
            self._claims.pop(rid, None)

    # -- the worker: running and answering -------------------------------------------

    def start(self, rid: str, record: dict[str, Any], durable: bool) -> None:
        # the targets too ('{}' for none): a running request whose targets are
        # unknown holds back every later lease (see lease)
        self._fenced(rid, "start", f"UPDATE {self.s}.requests SET run = %s, targets = %s"
                     " WHERE id = %s", (Json(record), list(record.get("targets") or ()), rid))

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

    def where(self, rid: str) -> str | None:
        row = self.pools.run(lambda c: c.execute(
            f"SELECT state FROM {self.s}.requests WHERE id = %s", (rid,)).fetchone())
        return row[0] if row and row[0] in ("queued", "running", "failed") else None


    def read_claimed(self, entry: str) -> Claimed | None:
        row = self.pools.run(lambda c: c.execute(
            f"SELECT {REQUEST_COLUMNS} FROM {self.s}.requests WHERE id = %s", (entry,)
        ).fetchone())
        return None if row is None else self._claimed(row)


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


class _Read:
    """A queued row (of ``REQUEST_COLUMNS``) as last read, and its request
    document once made."""

    __slots__ = ("claimed", "row")

    def __init__(self, row: tuple) -> None:
        self.row = row
        self.claimed: Claimed | None = None


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
