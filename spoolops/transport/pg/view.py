"""The PostgreSQL queue as operators see it: counts, listings, one request,
live events; and its care: requeue, the janitor's removals, workers' health.

The spool's state words map to the table's ``state``: queued, running,
failed, and ``replies`` (answered rows nobody collected yet).  Read with the
caller's own role: the worker role (and a superuser) reads ``requests``,
every row; a web role, which holds no privilege on the table, reads the
view ``my_requests``, its own rows only -- so a web user's ``spoolops ls``
lists its own requests.  ``tail`` LISTENs on the events channel the table's
trigger feeds (the worker role's: its name is private) and reads each
event's details from the table; a web role's ``tail`` follows the replies to
its own requests.  The janitor's clock is the caller's (``now``), never the
server's, so that tests can age the queue.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import psycopg

from ...errors import SpoolSetupError, TransportUnavailable
from ...formats import parse_iso, utc_iso
from ...users import worker_uid_of
from ...workhome import lock_path
from ..base import Ages, Entry, Finding, StateCount, Step
from ..worklock import signal_worker
from ..worklock import worker_alive as lock_holder
from .conn import connect, listen
from .queue import PgQueue
from .schema import REQUEST_COLUMNS, envelope

RETIRED_KEEP_S = 3600.0   # how long a removed no-reply request's id answers a repeated submit


# the state words operators use (``STATES``) -> the table's ``state``
ROW_STATES = {"queued": "queued", "running": "running", "failed": "failed",
              "replies": "answered"}
# the time each state is counted from
_SINCE = {"queued": "submitted", "running": "claimed_at", "failed": "finished",
          "answered": "finished"}




def _ts(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)  # noqa: UP017


def _duration(started: str | None, finished: str | None) -> float | None:
    try:
        return round(parse_iso(finished) - parse_iso(started), 3)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class PgView(PgQueue):
    """What operators' tools read and do (``PgTransport`` adds the worker's side)."""

    def counts(self, now: float) -> dict[str, StateCount]:
        where = f"{self.names.schema}.requests"
        try:
            rows = self.pools.run(lambda c: c.execute(
                f"SELECT state, count(*), min(CASE state WHEN 'queued' THEN submitted WHEN"
                f" 'running' THEN claimed_at ELSE finished END) FROM {self.rows_source()}"
                " GROUP BY state").fetchall())
        except psycopg.errors.InsufficientPrivilege:
            return {state: StateCount(None, where=where, problem="unreadable")
                    for state in ROW_STATES}
        found = {state: (count, oldest) for state, count, oldest in rows}
        out = {}
        for word, state in ROW_STATES.items():
            count, oldest = found.get(state, (0, None))
            age = None if oldest is None else round(max(0.0, now - oldest.timestamp()), 3)
            out[word] = StateCount(count, age, where=f"{where} ({state})")
        return out

    def entries(self, state: str) -> list[Entry]:
        column = _SINCE[ROW_STATES[state]]
        rows = self.pools.run(lambda c: c.execute(
            f"SELECT id, {column}, op, submitter, priority, args->>'filename', targets,"
            f" run->'pid', reason, reply->>'ok', reply->'error'->>'type' FROM {self.rows_source()}"
            f" WHERE state = %s ORDER BY {column}, id", (ROW_STATES[state],)).fetchall())
        out = []
        for rid, since, op, user, priority, filename, targets, pid, reason, ok, error in rows:
            fields: dict[str, Any] = {"op": op, "user": user, "priority": priority,
                                      "target": ",".join(targets or []) or filename}
            if state == "running":
                fields["pid"] = pid
            if state == "failed":
                fields["reason"] = reason
            if state == "replies":
                fields["outcome"] = "ok" if ok == "true" else error
                fields["priority"] = None
            out.append(Entry(state, rid, rid, _ts(since) or 0.0, fields))
        return out

    def find(self, prefix: str) -> list[str]:
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.pools.run(lambda c: c.execute(
            f"SELECT id FROM {self.rows_source()} WHERE id LIKE %s ORDER BY id LIMIT 100",
            (pattern,)).fetchall())
        found = [r[0] for r in rows]
        return [prefix] if prefix in found else found

    def describe(self, rid: str) -> dict[str, Any] | None:
        row = self.pools.run(lambda c: c.execute(
            f"SELECT state, submitter, submitted, claimed_at, finished, run, reply, reason,"
            f" claimed_by, attempt, targets, {REQUEST_COLUMNS} FROM {self.rows_source()}"
            " WHERE id = %s", (rid,)).fetchone())
        if row is None:
            return None
        state, submitter, submitted, claimed_at, finished, run, reply, reason = row[:8]
        since = {"queued": submitted, "running": claimed_at}.get(state, finished)
        info: dict[str, Any] = {
            "id": rid, "state": "done" if state == "answered" else state,
            "path": f"{self.names.schema}.requests id={rid}",
            "since": utc_iso(since.timestamp()) if since else None, "owner": submitter,
            "request": json.loads(envelope(row[11:])),
            "claimed_by": row[8], "attempt": row[9], "targets": row[10]}
        if state == "running":
            info["run"] = run
        if reply is not None:
            info["reply"] = reply
        if state == "failed":
            info["reason"] = reason
        return info

    def follow(self, should_stop: Callable[[], bool], poll_s: float = 0.5
               ) -> Iterator[dict[str, Any]]:
        """Events as they come: ids (and a few bounded words) on the channel,
        the rest read from the table -- under the caller's own rights: the
        worker role follows every request's events, a web role the replies
        to its own."""
        channel = self.names.events_channel if self.reads_all() else self.names.reply_channel
        conn = connect(self.dsn)
        try:
            listen(conn, channel)
            while not should_stop():
                _ready, _, _ = select.select([conn.fileno()], [], [], poll_s)
                try:
                    notes = list(conn.notifies(timeout=0))
                except psycopg.Error:
                    yield {"time": utc_iso(), "event": "overflow",
                           "note": "the connection to the database was lost; reconnecting"}
                    conn.close()
                    conn = connect(self.dsn)
                    listen(conn, channel)
                    continue
                for note in notes:
                    event = self._event_of(note.payload, channel.kind)
                    if event is not None:
                        yield {"time": utc_iso(), **{k: v for k, v in event.items()
                                                     if v is not None}}
        finally:
            conn.close()

    def _event_of(self, payload: str, kind: str) -> dict[str, Any] | None:
        """An event of the channel, with what the table says of its request."""
        if kind == "reply":
            event: Any = {"event": "finished", "id": payload}
            # (my_requests shows rows under their client's ids already)
            where = "coalesce(client_id, id) = %s" if self.reads_all() else "id = %s"
        else:
            try:
                event = json.loads(payload)
            except ValueError:
                return None
            if not isinstance(event, dict) or not isinstance(event.get("id"), str):
                return None
            where = "id = %s"
        try:
            row = self.pools.run(lambda c: c.execute(
                f"SELECT op, submitter, priority, array_to_string(targets, ','), run->'pid',"
                " run->>'host', reply->>'ok', reply->'error'->>'type',"
                " left(reply->'error'->>'message', 1000), reply->>'started_at',"
                f" reply->>'finished_at', reason, state FROM {self.rows_source()} WHERE {where}",
                (event["id"],)).fetchone())
        except (psycopg.Error, TransportUnavailable):
            row = None
        if row is None:
            return event        # gone already (collected, removed): the event as it came
        op, user, priority, target, pid, host, ok, error, message, started, finished, \
            reason, _state = row
        name = event.get("event")
        details: dict[str, Any] = {"op": op}
        if name == "queued":
            details.update(priority=priority, user=user)
        elif name == "started":
            details.update(user=user, pid=pid, host=host, target=target or None)
        elif name == "finished":
            if kind == "reply" and ok is None:
                return None     # a wake-up with no reply behind it (forged, or early)
            details.update(ok=ok == "true" if ok is not None else event.get("ok"),
                           error=error or event.get("error"), message=message,
                           duration_s=_duration(started, finished))
        elif name == "failed":
            details = {"reason": reason}
        elif name == "removed":
            details = {}
        # the payload's words first (said when it happened), the row's for the rest
        return {**details, **{k: v for k, v in event.items() if v is not None}}

    # -- care -----------------------------------------------------------------------

    def requeue(self, rid: str) -> str:
        """Back in line (its place kept: ``submitted`` is unchanged) from failed,
        or from running when its worker is gone."""
        def work(conn: psycopg.Connection) -> str | None:
            cur = conn.execute(
                f"UPDATE {self.s}.requests SET state = 'queued', reply = NULL, reason = NULL,"
                " finished = NULL, run = NULL, claimed_by = NULL, claimed_at = NULL,"
                " targets = NULL WHERE id = %s AND state = 'failed'", (rid,))
            if cur.rowcount:
                return "failed"
            dead = {r[0] for r in conn.execute(
                self.dead_workers_sql(), {"me": self.me}).fetchall()}
            if rid in dead:
                conn.execute(
                    f"UPDATE {self.s}.requests SET state = 'queued', run = NULL, claimed_by ="
                    " NULL, claimed_at = NULL, targets = NULL WHERE id = %s AND state ="
                    " 'running'", (rid,))
                return "running"
            return None
        origin = self.pools.run(work)
        if origin is None:
            raise SpoolSetupError(f"{rid} is neither failed nor the orphan of a dead worker")
        return origin

    def reap(self, now: float, ages: Ages, worker_alive: bool, dry_run: bool
             ) -> tuple[list[Step], list[Finding]]:
        removals: list[Step] = []
        findings: list[Finding] = []
        table = f"{self.names.schema}.requests"

        def work(conn: psycopg.Connection) -> None:
            for state, ttl, why in (
                    ("answered", ages.reply_ttl, "uncollected reply older than reply_ttl"),
                    ("failed", ages.failed_ttl, "failed request older than failed_ttl")):
                cutoff = _at(now - ttl)
                old = f"{self.s}.requests WHERE state = %s AND finished < %s"
                # rows a web role holds (a collect in a transaction left open)
                # are skipped, never waited for: they go next time
                rows = conn.execute(
                    f"SELECT id, finished FROM {old}" if dry_run else
                    f"DELETE FROM {self.s}.requests WHERE id IN (SELECT id FROM {old}"
                    " FOR UPDATE SKIP LOCKED) RETURNING id, finished", (state, cutoff)
                ).fetchall()
                removals.extend(Step("remove", f"{table} id={rid}", why,
                                        round(now - finished.timestamp(), 3), done=not dry_run)
                                for rid, finished in rows)
            progressed = "coalesce((run->'progress'->>'updated_at')::timestamptz, claimed_at)"
            for kind, query, what in (
                    ("stuck", (f"SELECT id, submitted FROM {self.s}.requests WHERE state ="
                               " 'queued' AND submitted < %s ORDER BY submitted LIMIT 1000"),
                     "queued longer than stuck_after"),
                    ("running_long", (f"SELECT id, {progressed} FROM {self.s}.requests WHERE"
                                      f" state = 'running' AND {progressed} < %s"),
                     "running with no progress for longer than stuck_after")):
                for rid, since in conn.execute(query, (_at(now - ages.stuck_after),)):
                    findings.append(Finding(kind, f"{table} id={rid}",
                                            f"{what} ({ages.stuck_after:g} s)",
                                            round(now - since.timestamp(), 3)))
            # a held batch stays until the worker releases it (its kept hook
            # calls succeeded or were dropped): never removed here, said when old
            # (only the worker role may read the holds)
            try:
                holds = conn.execute(
                    f"SELECT request_id, batch, since FROM {self.s}.batch_holds WHERE since <"
                    " %s ORDER BY since LIMIT 1000", (_at(now - ages.stuck_after),)).fetchall()
            except psycopg.errors.InsufficientPrivilege:
                holds = []
            for rid, batch, since in holds:
                findings.append(Finding("held", f"{self.names.schema}.batch_holds"
                                        f" request_id={rid}",
                                        f"batch {batch!r} held for longer than stuck_after"
                                        f" ({ages.stuck_after:g} s): follow-up hook calls of"
                                        " the request still to retry ('spoolops hooks' on"
                                        " its worker's host)",
                                        round(now - since.timestamp(), 3)))
            # ids of removed requests that wanted no reply (kept for a submit
            # repeated after a lost answer): housekeeping, not reported
            if not dry_run:
                try:
                    with conn.transaction():
                        conn.execute(f"DELETE FROM {self.s}.retired WHERE at < %s",
                                     (_at(now - min(ages.reply_ttl, RETIRED_KEEP_S)),))
                except psycopg.errors.InsufficientPrivilege:
                    pass
            # registrations of dead workers with nothing left running -- and
            # silent for lock_grace: one reconnecting now (a restarted server)
            # still beats, and would find itself gone, i.e. fenced, and stop
            if not dry_run:
                conn.execute(
                    f"DELETE FROM {self.s}.workers w WHERE NOT EXISTS (SELECT 1 FROM"
                    f" {self.s}.requests r WHERE r.state = 'running' AND r.claimed_by = w.id)"
                    f" AND NOT {self.names.lock_held('w.id')} AND w.heartbeat <"
                    f" clock_timestamp() - interval '{self.config.lock_grace:.3f} seconds'")
        self.pools.run(work, retry=False)
        return removals, findings

    def _live_workers(self) -> list[tuple]:
        """(id, pid, host, stats, work_dir) of each live worker, the latest
        counters first."""
        return self.pools.run(lambda c: c.execute(
            f"SELECT w.id, w.pid, w.host, w.stats, w.work_dir FROM {self.s}.workers w WHERE"
            f" {self.names.lock_held('w.id')} ORDER BY w.stats_at DESC NULLS LAST").fetchall())

    def worker_alive(self) -> tuple[bool | None, int | None]:
        try:
            live = self._live_workers()
        except (psycopg.errors.InsufficientPrivilege, TransportUnavailable):
            return None, None
        return (True, live[0][1]) if live else (False, None)

    def load_stats(self, fresh: bool = False) -> dict[str, Any] | None:
        """The latest counters a live worker saved.  ``fresh``: this host's
        worker, if it runs, is asked with SIGUSR1 to save them now -- and to
        look at its kept hook calls again (``spoolops hooks retry``) -- and
        its save is awaited up to a second."""
        try:
            live = self._live_workers()
            if fresh and self._nudge_local_worker(live):
                before = [row[3] for row in live]
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    time.sleep(0.01)   # the save is one UPDATE; nothing to block on
                    live = self._live_workers()
                    if [row[3] for row in live] != before:
                        break
        except (psycopg.errors.InsufficientPrivilege, TransportUnavailable):
            return None
        for _wid, _pid, _host, stats, _work in live:
            if isinstance(stats, dict):
                return stats
        return None

    def _nudge_local_worker(self, live: list[tuple]) -> bool:
        """SIGUSR1 to this host's worker: only to the process that holds this
        host's ``work/worker.lock``, is registered live from this host and
        folder under that pid, and runs as the worker user (``signal_worker``:
        root must not signal whatever pid a file or a row names)."""
        alive, pid = lock_holder(lock_path(self.work_dir))
        if not alive or pid is None or not any(
                row[1] == pid and row[2] == self.host and row[4] == str(self.work_dir)
                for row in live):
            return False
        try:
            uid = worker_uid_of(self.config.worker_user) if self.config.worker_user \
                else os.getuid()
        except SpoolSetupError:
            return False
        return signal_worker(pid, uid, signal.SIGUSR1)
