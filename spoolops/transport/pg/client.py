"""The PostgreSQL queue as a client sees it: submitting, cancelling, the
wait on the role's reply channel and the read of the reply -- each through
one of the schema's definer functions (a web role holds no privilege on any
table: ``pg.schema``).

Built on ``queue.PgQueue``, as ``view`` and ``worker`` are.  Trusts: the database's identity (the
functions take the caller from ``session_user``; only the worker role
writes a reply) and a notification only as a hint to look.

Outcomes survive a lost answer.  A submit whose connection broke after it
was sent is repeated (the function is idempotent for the caller's id and
request: "already") until the database answers, so that
``TransportUnavailable`` is raised only when nothing was queued -- or, when
the request's deadline passed first, when nothing will run.  A reply is
removed in a transaction that commits only once the client holds it: a
collect whose answer was lost removed nothing and is asked again.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from psycopg.types.json import Json

from ...errors import BadRequest, SpoolSetupError, Timeout, TransportUnavailable
from ...formats import parse_iso
from ..base import Waiter
from .conn import RECONNECT_S, existing_reply_listener, shared_reply_listener
from .queue import PgQueue

RESOLVE_MAX_S = 30.0      # how long a submit with no deadline rides out a lost answer
LOCK_WAIT_MAX_S = 5.0     # how long a submit waits for a lock on the table, at most


# (dsn, schema) -> ids of replies read whose removal did not commit
_unremoved: dict[tuple[str, str], set[str]] = {}
_unremoved_lock = threading.Lock()


class _Unknown(Exception):
    """The connection broke after the submit was sent: it may have committed."""


class PgClientSide(PgQueue):
    """What a client does (``PgTransport`` adds the worker's side)."""

    def publish(self, request: dict[str, Any]) -> str:
        rid = request["id"]
        wanted = request.get("reply", True)
        if not isinstance(wanted, bool):
            raise BadRequest("request field 'reply' must be true or false")
        for field in ("deadline", "submitted"):
            # (the columns' types would refuse another type less clearly)
            if request.get(field) is not None and not isinstance(request.get(field), str):
                raise BadRequest(f"request field {field!r} must be a time as text"
                                 " (ISO 8601)")
        deadline = _wall_deadline(request.get("deadline"))
        left = None if deadline is None else deadline - time.time()
        wait_ms = int(1000 * max(0.1, min(LOCK_WAIT_MAX_S, (left or LOCK_WAIT_MAX_S) / 2)))
        # a waiter of this process's (Client.call): its reply wakes this
        # process alone, on a channel of its own
        listener = existing_reply_listener(self.dsn, self._reply_channel)
        reply_to = None if listener is None else listener.reply_to(rid)
        values = (rid, request.get("version"), request.get("op"), Json(request.get("args")),
                  request.get("priority", 0), request.get("deadline"),
                  request.get("submitted"), Json(request.get("client")), wanted, wait_ms)
        query = (f"SELECT {self.s}.submit(%s, %s::int, %s, %s::json, %s::int,"
                 " %s::timestamptz, %s, %s::json, %s::boolean, %s::int, %s::boolean,"
                 " %s::text)")
        try:
            with self.pools.connection() as conn:    # NotSent: nothing was queued
                self._submit(conn, query, (*values, False, reply_to), rid)
            return rid
        except _Unknown as exc:
            first = str(exc)
        # it may be queued: ask again (idempotent: 'already') until the database
        # answers -- within the request's deadline, after which it would not run
        end = time.monotonic() + (RESOLVE_MAX_S if left is None else max(0.0, left))
        attempt = 0
        while True:
            try:
                with self.pools.connection() as conn:
                    self._submit(conn, query, (*values, True, reply_to), rid)
                return rid
            except (_Unknown, TransportUnavailable) as exc:
                last = str(exc)
            if time.monotonic() >= end:
                break
            time.sleep(min(RECONNECT_S[min(attempt, len(RECONNECT_S) - 1)],
                           max(0.0, end - time.monotonic())))
            attempt += 1
        if left is not None:
            raise TransportUnavailable(
                f"the queue database went away while {rid} was being submitted ({first};"
                f" then {last}) and did not answer again before its deadline: if it was"
                " queued, it will not run")
        raise Timeout(f"the queue database went away while {rid} was being submitted"
                      f" ({first}) and did not answer again within {RESOLVE_MAX_S:g} s:"
                      f" it may be queued (wait for it, or cancel it)")

    def _submit(self, conn: psycopg.Connection, query: str, params: tuple,
                rid: str) -> str:
        try:
            return conn.execute(query, params).fetchone()[0]
        except (ValueError, TypeError) as exc:     # a value psycopg cannot send
            raise BadRequest(f"the queue refused the request: {exc}") from None
        except psycopg.Error as exc:
            state = getattr(exc, "sqlstate", None) or ""
            if state == "23505":
                raise BadRequest(f"request id {rid!r} is already in use") from None
            if state == "42501" or state == "42883" or state == "3F000":
                raise SpoolSetupError(
                    f"this role may not submit ({message_of(exc)}): it must be a member of"
                    f" {self.names.submit_role} (and the queue must be set up by 'spoolops"
                    " init')") from None
            if state in ("55P03", "57014"):    # lock_timeout, statement_timeout
                raise TransportUnavailable(f"the queue is locked ({message_of(exc)}):"
                                           " nothing was queued") from None
            if state[:2] in ("22", "23", "54") or isinstance(exc, (psycopg.DataError,
                                                                   psycopg.IntegrityError)):
                raise BadRequest(f"the queue refused the request: {message_of(exc)}") \
                    from None
            if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
                raise _Unknown(message_of(exc)) from None
            raise

    def withdraw(self, rid: str, answer: dict[str, Any] | None = None) -> bool:
        if answer is None and not self.reads_all():
            # the caller's own request, while queued (a definer function)
            return bool(self.pools.run(lambda c: c.execute(
                f"SELECT {self.s}.cancel(%s)", (rid,)).fetchone()[0]))
        if answer is None:       # the worker role: any request, no answer
            return self.pools.run(lambda c: c.execute(
                f"DELETE FROM {self.s}.requests WHERE id = %s AND state = 'queued'",
                (rid,)).rowcount) > 0
        # an operator's cancel (the worker role) answers the client -- unless it
        # wants no answer: then the row just goes
        query = (f"WITH answered AS (UPDATE {self.s}.requests SET state = 'answered', reply ="
                 " %s, finished = clock_timestamp() WHERE id = %s AND state = 'queued' AND"
                 f" answer_wanted RETURNING 1), gone AS (DELETE FROM {self.s}.requests WHERE"
                 " id = %s AND state = 'queued' AND NOT answer_wanted RETURNING 1)"
                 " SELECT 1 FROM answered UNION ALL SELECT 1 FROM gone")
        params = (Json(answer), rid, rid)
        return self.pools.run(lambda c: c.execute(query, params).rowcount) > 0

    def pending_batches(self) -> set[str]:
        # every submitter's, through the owner's definer function: a web
        # role sees only its own rows, and learns only the names here
        rows = self.pools.run(lambda c: c.execute(
            f"SELECT b FROM {self.s}.pending_batches() b").fetchall())
        return {row[0] for row in rows}

    def queue_length(self) -> int:
        return int(self.pools.run(lambda c: c.execute(
            f"SELECT {self.s}.queue_length()").fetchone()[0]))

    def submitter_name(self) -> str:
        # the trigger records session_user; asked once per transport
        if getattr(self, "_session_user", None) is None:
            self._session_user = self.pools.run(
                lambda c: c.execute("SELECT session_user").fetchone()[0])
        return self._session_user

    def expect(self, rid: str) -> Waiter:
        return shared_reply_listener(self.dsn, self._reply_channel).expect(rid)

    def _reply_channel(self, conn: psycopg.Connection) -> str:
        return self.names.reply_channel     # its name: the database's (pg.conn.listen)

    def collect(self, rid: str, remove: bool = True,
                submitter: str | None = None, op: str | None = None
                ) -> dict[str, Any] | None:
        # the definer function reads the caller's own row only (submitter and
        # op are checked on the spool, where they can differ); the worker
        # role (recovery, an operator) reads any
        if self.reads_all():
            return self._collect_any(rid, remove)
        if not remove:
            row = self.pools.run(lambda c: c.execute(
                f"SELECT {self.s}.collect(%s, false)", (rid,)).fetchone())
            return None if row is None else _checked(row[0], rid)
        # read and removed in a transaction that commits only once the reply
        # is here: a collect whose answer is lost removed nothing, and is asked
        # again.  BEGIN and the call go as one message (one round trip), the
        # COMMIT as a second -- not waited for on disk: a removal lost with
        # the server brings back a reply its client holds already, and the
        # janitor reaps it after reply_ttl
        take = (f"BEGIN; SET LOCAL synchronous_commit = off;"
                f" SELECT {self.s}.collect(%s, true)")
        committed = []

        def work(conn: psycopg.Connection) -> tuple | None:
            cur = psycopg.ClientCursor(conn)
            try:
                cur.execute(take, (rid,))
                while cur.description is None and cur.nextset():
                    pass
                found = cur.fetchone()
            except BaseException:
                if not conn.broken:
                    conn.rollback()
                raise
            try:
                conn.execute("COMMIT")
                committed.append(True)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                pass   # the reply is here: its removal is done again, below
            return found
        row = self.pools.run(work)
        reply = None if row is None else _checked(row[0], rid)
        if reply is not None and not committed:
            self._remove_again(rid)
        elif _unremoved:
            self._remove_again(None)
        return reply

    def _remove_again(self, rid: str | None) -> None:
        """A reply this process read whose removal may not have committed:
        removed now (autocommit; finding nothing is fine), or with a later
        collect of this process (and by the janitor after reply_ttl)."""
        with _unremoved_lock:
            ids = _unremoved.pop((self.dsn, self.s), set()) | ({rid} if rid else set())
        left = set()
        for one in sorted(ids):
            try:
                self.pools.run(lambda c, one=one: c.execute(
                    f"SELECT {self.s}.collect(%s, true)", (one,)))
            except (TransportUnavailable, psycopg.Error):
                left.add(one)
        if left:
            with _unremoved_lock:
                _unremoved.setdefault((self.dsn, self.s), set()).update(left)

    def _collect_any(self, rid: str, remove: bool) -> dict[str, Any] | None:
        states = "('answered', 'failed')"
        if remove:
            # read and removed at once (the worker role's own table); a failed
            # request keeps its row (and reply)
            row = self.pools.run(lambda c: c.execute(
                f"DELETE FROM {self.s}.requests WHERE id = %s AND state = 'answered'"
                " RETURNING reply", (rid,)).fetchone())
            if row is not None:
                return _checked(row[0], rid)
            states = "('failed')"
        row = self.pools.run(lambda c: c.execute(
            f"SELECT reply FROM {self.s}.requests WHERE id = %s AND state IN {states} AND"
            " reply IS NOT NULL", (rid,)).fetchone())
        return None if row is None else _checked(row[0], rid)

    def progress_of(self, rid: str) -> dict[str, Any] | None:
        if self.reads_all():
            query = (f"SELECT run->'progress' FROM {self.s}.requests WHERE id = %s AND"
                     " state = 'running'")
        else:
            query = f"SELECT {self.s}.progress_of(%s)"
        row = self.pools.run(lambda c: c.execute(query, (rid,)).fetchone())
        return row[0] if row and isinstance(row[0], dict) else None


def _wall_deadline(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return parse_iso(text)
    except ValueError:
        return None


def _checked(reply: Any, rid: str) -> dict[str, Any] | None:
    return reply if isinstance(reply, dict) and reply.get("id") == rid else None


def message_of(exc: BaseException) -> str:
    """The first line of the server's message."""
    diag = getattr(exc, "diag", None)
    text = getattr(diag, "message_primary", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


__all__ = ["PgClientSide", "message_of"]
