"""The PostgreSQL queue's workers as one another see them: who is alive,
who is gone, and who takes over.

A worker is alive while the backend it registered holds the random advisory
key it registered (``schema.Names.lock_held``), and its main loop beats a
``heartbeat`` every ``lock_grace / 4``.  One that is gone -- or frozen:
alive by its lock, its heartbeat older than half of ``lock_grace`` -- is
noted (``lost_at``) when first seen so; another host's becomes takeable
after ``lock_grace`` of that, this host's at once (its ``work/worker.lock``
is the taker's).  ``settle`` fences a takeable worker (``fenced_at``; its
session ended when this role may) and only then do its running rows come
out of ``orphans`` as ``settled``, for recovery's policy; rows a worker
holds without knowing it are its ``strays``.  ``workers`` says who
serves and holds what (``care`` turns it into ``doctor``'s lines).

Part of ``worker.PgTransport``, on the shared value ``queue.PgQueue``; the
claims this process holds (``_claims``) and its registration (``me``,
``host``, ``work_dir``) are the transport's.  Trusts: the database's
identity, and other workers (the worker role) to report their own liveness
honestly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from ...errors import TransportUnavailable
from ...workhome import leftovers_pending
from ..base import Orphan, Step
from .queue import PgQueue

log = logging.getLogger("spoolops.transport")


class PgTakeover(PgQueue):
    """Heartbeats, the dead workers' takeover, strays, who serves."""

    _claims: dict[str, tuple[int, int]]    # rid -> (worker, attempt) held
    work_dir: Path

    @property
    def heartbeat_interval(self) -> float | None:
        return self.config.lock_grace / 4 if self.me is not None else None

    def heartbeat(self) -> bool:
        """The main loop is alive: say so (and end a loss others noted, if
        the lock is held); False when this worker was fenced -- another
        worker took its requests over -- and must stop."""
        if self.me is None:
            return True
        try:
            row = self.pools.run(lambda c: c.execute(
                f"UPDATE {self.s}.workers w SET heartbeat = clock_timestamp(), lost_at ="
                f" CASE WHEN {self.names.lock_held('w.id')} THEN NULL ELSE lost_at END WHERE"
                " id = %s RETURNING fenced_at IS NULL", (self.me,)).fetchone())
        except TransportUnavailable:
            return True     # the database is away: the listener's grace decides
        return bool(row and row[0])

    def settle(self, interrupted: Callable[[str], dict[str, Any]], dry_run: bool = False
               ) -> list[Step]:
        """Every step of an answer is one transaction, so a dead worker leaves
        no half-done answer; what it leaves is its registration, with the
        claims it held.  A worker that is gone -- or frozen: alive by its
        lock, with a heartbeat older than half of ``lock_grace`` -- is noted
        (``lost_at``, once) when first seen so; another host's becomes
        takeable only once it has been so for ``lock_grace`` (the worker
        itself stops after ``lock_grace / 2`` without its lock), this host's
        at once (its host lock is ours now).  A takeable one is fenced (see
        ``_fence``): only then does ``orphans`` hand its requests to recovery
        (a worker whose grace ran out between the two is taken next time)."""
        if dry_run:
            return [Step("fence", where, why) for where, why, fence in self._takeable(note=False)
                    if fence is not None]
        steps = []
        for where, why, fence in self._takeable(note=True):
            if fence is not None and self._fence(*fence):
                steps.append(Step("fence", where, why, done=True))
        return steps

    def _dead_claims(self, note: bool) -> list[tuple]:
        """The running rows of dead workers (``dead_workers_sql``), noting
        each newly lost worker when ``note``."""
        params = {"me": self.me}

        def work(conn: psycopg.Connection) -> list[tuple]:
            rows = conn.execute(self.dead_workers_sql(), params).fetchall()
            lost = sorted({r[1] for r in rows if r[7] is None and r[4] is not None})
            if lost and note:
                conn.execute(f"UPDATE {self.s}.workers SET lost_at = clock_timestamp() WHERE"
                             " id = ANY(%s) AND lost_at IS NULL", (lost,))
            return rows
        out = []
        for row in self.pools.run(work):
            host, work_dir, lost_at, now, fenced = row[4], row[5], row[7], row[8], row[11]
            local = host == self.host and work_dir == str(self.work_dir)
            if host is not None and not local and not fenced and (
                    lost_at is None or (now - lost_at).total_seconds() < self.config.lock_grace):
                continue              # another host's, not lost for long enough yet
            out.append(row)
        return out

    def _takeable(self, note: bool) -> list[tuple[str, str, tuple | None]]:
        """(where, why, fence arguments) of each dead worker whose claims
        recovery may take; no fence arguments for a registration that is gone."""
        seen: dict[int, tuple[str, str, tuple | None]] = {}
        for _rid, worker, _attempt, _started, host, _wd, pid, _lost, _now, alive, \
                backend, fenced in self._dead_claims(note):
            if worker in seen or fenced:
                continue
            why = ("its heartbeat is stale" if alive else "it is gone") if host is not None \
                else "its registration is gone"
            where = f"{self.names.schema}.workers id={worker} (on {host or '?'}, pid {pid})"
            seen[worker] = (where, f"a worker that is gone: {why}",
                            None if host is None else (worker, alive, backend, host))
        return list(seen.values())

    def orphans(self) -> list[Orphan]:
        """Requests of dead workers whose claims may be taken over; those of
        a worker ``settle`` has not fenced yet (its grace ran out since) are
        not ``settled``: recovery takes them after the next ``settle``."""
        out = []
        for rid, worker, attempt, started, host, work_dir, pid, _lost, _now, _alive, \
                _backend, fenced in self._dead_claims(note=False):
            local = host == self.host and work_dir == str(self.work_dir)
            self._claims[rid] = (worker, attempt)
            out.append(Orphan(rid, rid, started, f"{self.names.schema}.requests id={rid}"
                              f" (worker {worker} on {host or '?'}, pid {pid})", local=local,
                              settled=host is None or fenced))
        return out

    def _fence(self, worker: int, alive: bool, backend: int | None, host: str | None
               ) -> bool:
        """Before its requests are recovered: mark the worker fenced (if it
        comes back, or thaws, it sees so and stops at once; its late answers
        are refused anyway: they are fenced by claimed_by and attempt) and end
        its session when it is still alive by its lock (a frozen worker keeps
        it) and this role may (the same login role, or pg_signal_backend):
        its lock then goes, and ``doctor`` says so.  False if it was fenced
        already."""
        fenced = self.pools.run(lambda c: c.execute(
            f"UPDATE {self.s}.workers SET fenced_at = clock_timestamp() WHERE id = %s AND"
            " fenced_at IS NULL RETURNING id", (worker,)).fetchone())
        if fenced is None:
            return False
        ended = False
        if alive and backend is not None:
            try:
                ended = bool(self.pools.run(lambda c: c.execute(
                    "SELECT pg_catalog.pg_terminate_backend(%s)", (backend,)).fetchone()[0]))
            except psycopg.errors.InsufficientPrivilege:
                pass     # fenced by claimed_by/attempt alone
        log.warning("event=worker_fenced worker=%d host=%s why=%s session_ended=%s",
                    worker, host, "heartbeat_stale" if alive else "gone",
                    "yes" if ended else "no")
        return True

    def strays(self, known: set[str], unstarted: set[str] | frozenset[str] = frozenset()
               ) -> list[Orphan]:
        """Rows this worker holds (claimed_by it, running) that it does not
        know of: a claim whose answer was lost, a ``put_back`` that failed,
        a job that crashed.  Returned as this host's orphans, for recovery
        to put back in line (their place kept) or answer; one in
        ``unstarted`` (its ``start`` failed: the run record it may carry was
        never acted on) as not started."""
        if self.me is None:
            return []
        rows = self.pools.run(lambda c: c.execute(
            f"SELECT id, attempt, run IS NOT NULL FROM {self.s}.requests WHERE state ="
            " 'running' AND claimed_by = %s", (self.me,)).fetchall())
        out = []
        for rid, attempt, started in rows:
            if rid in known:
                continue
            started = started and rid not in unstarted
            log.warning("event=stray_claim id=%s attempt=%d started=%s note=%r", rid, attempt,
                        started, "held by this worker, which did not know it (a lost answer"
                        " or a failed put_back): recovered now")
            self._claims[rid] = (self.me, attempt)
            out.append(Orphan(rid, rid, started, f"{self.names.schema}.requests id={rid}"
                              f" (this worker, {self.me})", local=True))
        return out

    def recovery_pending(self) -> bool:
        # this host's home too: a dead worker's journals and temporary files;
        # and any dead worker's claims (``settle`` notes the newly lost)
        return leftovers_pending(self.work_dir) or bool(self.pools.run(lambda c: c.execute(
            self.dead_workers_sql(), {"me": self.me}).fetchone()))

    def workers(self) -> list[dict[str, Any]] | None:
        """Who holds what, for ``doctor`` and ``status``: each registered
        worker, whether it is alive (its backend holds its key), its
        heartbeat's age, and the requests and targets it holds.  None when
        this role may not read the registrations (a web role)."""
        try:
            rows = self.pools.run(lambda c: c.execute(
                f"SELECT w.id, w.host, w.pid, w.backend_pid, w.role,"
                f" {self.names.lock_held('w.id')}, extract(epoch FROM clock_timestamp() -"
                " w.heartbeat)::float8, w.fenced_at IS NOT NULL, w.lost_at IS NOT NULL,"
                f" ARRAY(SELECT r.id FROM {self.s}.requests r WHERE r.state = 'running' AND"
                " r.claimed_by = w.id ORDER BY r.claimed_at), ARRAY(SELECT l.target FROM"
                f" {self.s}.leases l JOIN {self.s}.requests r ON r.id = l.request_id WHERE"
                " r.state = 'running' AND r.claimed_by = w.id ORDER BY l.target)"
                f" FROM {self.s}.workers w ORDER BY w.id").fetchall())
        except psycopg.errors.InsufficientPrivilege:
            return None
        return [{"id": wid, "host": host, "pid": pid, "backend_pid": backend, "role": role,
                 "alive": bool(alive), "heartbeat_age_s": round(age, 1), "fenced": fenced,
                 "noted_lost": lost, "running": list(running), "leases": list(leases)}
                for wid, host, pid, backend, role, alive, age, fenced, lost, running, leases
                in rows]
