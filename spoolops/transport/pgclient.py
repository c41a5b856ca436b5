"""The PostgreSQL queue as a client sees it: the INSERT that publishes a
request, the DELETE that cancels it, the wait on the role's reply channel
and the read of the reply.

Mixed into ``pg.PgTransport``.  Trusts: the database's identity and
row-level security -- a client reads only its own rows, and only the worker
role writes a reply -- and a notification only as a hint to look.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Json

from ..errors import BadRequest, SpoolSetupError
from . import pgschema
from .base import Waiter
from .pgconn import shared_reply_listener

if TYPE_CHECKING:
    from .pg import PgTransport


class PgClientSide:
    """Mixed into ``PgTransport``."""

    def publish(self: PgTransport, request: dict[str, Any]) -> str:
        rid = request["id"]
        wanted = request.get("reply", True)
        if not isinstance(wanted, bool):
            raise BadRequest("request field 'reply' must be true or false")
        values: tuple = (rid, request.get("version"), request.get("op"),
                         Json(request.get("args")), request.get("priority", 0),
                         request.get("deadline"), request.get("submitted"),
                         Json(request.get("client")))
        # answer_wanted is named only when false: an ordinary request's INSERT
        # is the statement it always was (its default is true)
        columns = pgschema.CLIENT_COLUMNS if not wanted else tuple(
            c for c in pgschema.CLIENT_COLUMNS if c != "answer_wanted")
        if not wanted:
            values += (False,)
        insert = (f"INSERT INTO {self.s}.requests ({', '.join(columns)})"
                  f" VALUES ({', '.join(['%s'] * len(columns))})")
        tries = 0

        def work(conn: psycopg.Connection) -> None:
            nonlocal tries
            tries += 1
            try:
                conn.execute(insert, values)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise SpoolSetupError(
                    f"this role may not submit ({message_of(exc)}): it must be a member of"
                    f" {self.names.submit_role}") from None
            except psycopg.errors.UniqueViolation:
                if tries == 1:
                    raise BadRequest(f"request id {rid!r} is already in use") from None
                # the first attempt committed and lost its answer: it is queued
            except (psycopg.DataError, psycopg.IntegrityError, psycopg.ProgrammingError,
                    ValueError, TypeError) as exc:
                raise BadRequest(f"the queue refused the request: {message_of(exc)}") from None
        self.pools.run(work)
        return rid

    def withdraw(self: PgTransport, rid: str, answer: dict[str, Any] | None = None) -> bool:
        if answer is None:
            query, params = ((f"DELETE FROM {self.s}.requests WHERE id = %s AND state ="
                             " 'queued'"), (rid,))
        else:
            # an operator's cancel answers the client -- unless it wants no
            # answer: then the row just goes
            query, params = ((f"WITH answered AS (UPDATE {self.s}.requests SET state ="
                              " 'answered', reply = %s, finished = clock_timestamp() WHERE"
                              " id = %s AND state = 'queued' AND answer_wanted RETURNING 1),"
                              f" gone AS (DELETE FROM {self.s}.requests WHERE id = %s AND"
                              " state = 'queued' AND NOT answer_wanted RETURNING 1)"
                              " SELECT 1 FROM answered UNION ALL SELECT 1 FROM gone"),
                             (Json(answer), rid, rid))
        return self.pools.run(lambda c: c.execute(query, params).rowcount) > 0

    def pending_batches(self: PgTransport) -> set[str]:
        # every submitter's, through the owner's definer function: a web
        # role sees only its own rows, and learns only the names here
        rows = self.pools.run(lambda c: c.execute(
            f"SELECT b FROM {self.s}.pending_batches() b").fetchall())
        return {row[0] for row in rows}

    def queue_length(self: PgTransport) -> int:
        return int(self.pools.run(lambda c: c.execute(
            f"SELECT {self.s}.queue_length()").fetchone()[0]))

    def submitter_name(self: PgTransport) -> str:
        # the trigger records session_user; asked once per transport
        if getattr(self, "_session_user", None) is None:
            self._session_user = self.pools.run(
                lambda c: c.execute("SELECT session_user").fetchone()[0])
        return self._session_user

    def expect(self: PgTransport, rid: str) -> Waiter:
        return shared_reply_listener(self.dsn, self._reply_channel).expect(rid)

    def _reply_channel(self: PgTransport, conn: psycopg.Connection) -> str:
        role = conn.execute("SELECT session_user").fetchone()[0]
        return self.names.reply_channel(role)

    def collect(self: PgTransport, rid: str, remove: bool = True,
                submitter: str | None = None, op: str | None = None
                ) -> dict[str, Any] | None:
        # row-level security shows a role only its own rows, and the trigger
        # sets submitter = session_user: a reply read here is the caller's
        # (submitter and op are checked on the spool, where they can differ)
        if remove:
            # read and remove at once; a failed request keeps its row (and reply)
            row = self.pools.run(lambda c: c.execute(
                f"DELETE FROM {self.s}.requests WHERE id = %s AND state = 'answered'"
                " RETURNING reply", (rid,)).fetchone())
            if row is not None:
                return _checked(row[0], rid)
            query = (f"SELECT reply FROM {self.s}.requests WHERE id = %s AND state ="
                     " 'failed' AND reply IS NOT NULL")
            params: tuple = (rid,)
        else:
            query = (f"SELECT reply FROM {self.s}.requests WHERE id = %s AND state IN"
                     " ('answered', 'failed') AND reply IS NOT NULL")
            params = (rid,)
        row = self.pools.run(lambda c: c.execute(query, params).fetchone())
        return None if row is None else _checked(row[0], rid)

    def progress_of(self: PgTransport, rid: str) -> dict[str, Any] | None:
        row = self.pools.run(lambda c: c.execute(
            f"SELECT run->'progress' FROM {self.s}.requests WHERE id = %s AND state ="
            " 'running'", (rid,)).fetchone())
        return row[0] if row and isinstance(row[0], dict) else None


def _checked(reply: Any, rid: str) -> dict[str, Any] | None:
    return reply if isinstance(reply, dict) and reply.get("id") == rid else None


def message_of(exc: BaseException) -> str:
    """The first line of the server's message."""
    diag = getattr(exc, "diag", None)
    text = getattr(diag, "message_primary", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
