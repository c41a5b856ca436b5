"""The PostgreSQL queue's schema, roles and privileges, versioned; and the
row format (a request row turned back into the document dispatch reads).

``install`` creates or repairs everything ``spoolops init --transport
postgresql`` promises, idempotently: three group roles (an owner that never
logs in, ``submit_role``, ``worker_role``), the schema and its tables owned
by the owner, row-level security (forced, so that not even the owner
bypasses it), grants, triggers and functions.  A database at an older
``schema_version`` is migrated step by step; a newer one is refused.

Identity comes from the database: a BEFORE INSERT trigger sets
``submitter := session_user`` and resets every column a client must not
choose, and the submit role may write only the request's own columns.  A
submitter reads and deletes (cancels, collects) only its own rows; only the
worker role answers.  Of other submitters' requests a submitter learns only
what two definer functions of the owner say: which batches are pending and
how many requests wait.  Notifications carry ids only: any role may NOTIFY any
channel, so a payload is a hint, and the row, read under these policies, is
the truth.

Trusts: the administrator's connection it is given (a superuser, or a role
with CREATEROLE that owns the database).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import SpoolSetupError

SCHEMA_VERSION = 2

# the request columns a submitter may write (column privilege and the trigger)
CLIENT_COLUMNS = ("id", "version", "op", "args", "priority", "deadline", "client_submitted",
                  "client", "answer_wanted")


@dataclass(frozen=True)
class Names:
    """The names one queue uses, from the configuration."""

    schema: str
    channel: str          # the NOTIFY channel prefix
    submit_role: str
    worker_role: str

    @property
    def owner_role(self) -> str:
        return f"{self.schema}_owner"

    @property
    def new_channel(self) -> str:
        return f"{self.channel}_new"

    @property
    def events_channel(self) -> str:
        return f"{self.channel}_events"

    def reply_channel(self, role: str) -> str:
        """The channel a submitter's replies are announced on; the same rule
        as the SQL function ``reply_channel`` (names are at most 63 bytes)."""
        name = f"{self.channel}_reply_{role}"
        if len(name.encode()) <= 63:
            return name
        return f"{self.channel}_reply_{hashlib.md5(role.encode()).hexdigest()}"

    @property
    def lock_space(self) -> int:
        """The first key of the workers' advisory locks (the second is the
        worker's id): stable per schema, positive int4."""
        return int.from_bytes(hashlib.sha256(self.schema.encode()).digest()[:4], "big") \
            & 0x7FFFFFFF

    def lock_held(self, worker: str) -> str:
        """SQL: true while the worker whose id is the expression ``worker``
        holds its advisory lock in this database (the one liveness test)."""
        return ("EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND"
                f" l.classid::bigint = {self.lock_space} AND l.objid::bigint = {worker} AND"
                " l.objsubid = 2 AND l.granted AND l.database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database()))")


# -- the row format: a request row <-> the request document dispatch reads --

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # noqa: UP017 - datetime.UTC is 3.11+
REQUEST_COLUMNS = ("id, submitter, version, op, args::text, priority, deadline,"
                   " client_submitted, client::text, submitted, answer_wanted")


def time_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, exactly (no float on the way)."""
    return (moment - EPOCH) // timedelta(microseconds=1) * 1000


def envelope(row: tuple) -> bytes:
    """The request document of a row of ``REQUEST_COLUMNS``, as the spool
    would hold it: dispatch parses and validates it the same way for both
    transports.  ``args`` and ``client`` go in as the text the client wrote
    (duplicate keys, depth and all, for dispatch to judge); ``"reply": false``
    only when the client wants no answer (an ordinary request's document is
    as it always was)."""
    rid, _submitter, version, op, args, priority, deadline, submitted, client = row[:9]
    answer_wanted = row[10] if len(row) > 10 else True
    fields = [("version", json.dumps(version)), ("id", json.dumps(rid)),
              ("op", json.dumps(op, ensure_ascii=False)), ("args", args or "null"),
              ("priority", json.dumps(priority))]
    if deadline is not None:
        fields.append(("deadline", json.dumps(
            deadline.astimezone(timezone.utc).isoformat())))  # noqa: UP017
    if submitted is not None:
        fields.append(("submitted", json.dumps(submitted, ensure_ascii=False)))
    if client is not None:
        fields.append(("client", client))
    if answer_wanted is False:
        fields.append(("reply", "false"))
    text = "{" + ", ".join(f'"{key}": {value}' for key, value in fields) + "}"
    return text.encode("utf-8", "backslashreplace")


def sql_name(name: str) -> str:
    """A quoted identifier (names are checked by the configuration too)."""
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _version_1(n: Names) -> list[str]:
    s = sql_name(n.schema)
    return [
        f"""CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL)""",
        f"""CREATE TABLE {s}.workers (
            id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            role name NOT NULL DEFAULT session_user,
            host text NOT NULL,
            work_dir text NOT NULL,
            pid int NOT NULL,
            started timestamptz NOT NULL DEFAULT clock_timestamp(),
            stats jsonb,
            stats_at timestamptz,
            lost_at timestamptz)""",
        # json, not jsonb: the text as the client wrote it (key order -- the
        # order of new header cards -- and duplicate keys, which dispatch refuses
        # as it does on the spool)
        f"""CREATE TABLE {s}.requests (
            id text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{{0,127}}$'),
            submitter name NOT NULL DEFAULT session_user,
            version int,
            op text NOT NULL,
            args json,
            priority int NOT NULL DEFAULT 0,
            deadline timestamptz,
            client_submitted text,
            client json,
            submitted timestamptz NOT NULL DEFAULT clock_timestamp(),
            state text NOT NULL DEFAULT 'queued'
                CHECK (state IN ('queued', 'running', 'answered', 'failed')),
            targets text[],
            claimed_by int,
            claimed_at timestamptz,
            attempt int NOT NULL DEFAULT 0,
            run json,
            reply json,
            reason text,
            finished timestamptz,
            CHECK ((state IN ('answered', 'failed')) = (finished IS NOT NULL)),
            -- text PostgreSQL can hold (no NUL): refused at submit, not by the worker
            CONSTRAINT args_are_text CHECK (args IS NULL OR args::jsonb IS NOT NULL))""",
        # the claim's order, over queued rows only
        f"""CREATE INDEX requests_queue ON {s}.requests (priority DESC, submitted, id)
            WHERE state = 'queued'""",
        f"""CREATE INDEX requests_running ON {s}.requests (claimed_by)
            WHERE state = 'running'""",
        f"""CREATE INDEX requests_finished ON {s}.requests (state, finished)
            WHERE state IN ('answered', 'failed')""",
        # one running request per target, across workers: the primary key is
        # the invariant, whatever code path claims
        f"""CREATE TABLE {s}.leases (
            target text PRIMARY KEY,
            request_id text NOT NULL REFERENCES {s}.requests (id) ON DELETE CASCADE)""",
        f"""CREATE INDEX leases_request ON {s}.leases (request_id)""",
    ]


def _version_2(n: Names) -> list[str]:
    """Requests that want no answer, and batches: which are pending is asked
    by any submitter (``pending_batches``), cheaply with thousands queued."""
    s = sql_name(n.schema)
    return [
        # answer_wanted: a client column (false: the worker deletes the row
        # instead of storing a reply).  batch: args->>'batch' kept with the row
        # (NULL for args that are no object or name no batch: ->> on a json
        # array or scalar is NULL, not an error), so that the pending batches
        # are read from a small index, never by parsing every queued row's args
        f"""ALTER TABLE {s}.requests
            ADD COLUMN answer_wanted boolean NOT NULL DEFAULT true,
            ADD COLUMN batch text GENERATED ALWAYS AS (args ->> 'batch') STORED""",
        f"""CREATE INDEX requests_pending_batch ON {s}.requests (batch)
            WHERE state IN ('queued', 'running') AND batch IS NOT NULL""",
        # a request answered with follow-up hook calls still to retry keeps its
        # batch pending until the worker releases it (the request's row may be
        # collected long before): no foreign key, on purpose
        f"""CREATE TABLE {s}.batch_holds (
            request_id text PRIMARY KEY,
            batch text NOT NULL,
            since timestamptz NOT NULL DEFAULT clock_timestamp())""",
    ]


MIGRATIONS = {1: _version_1, 2: _version_2}   # version -> the statements that reach it


def _functions(n: Names) -> list[str]:
    """Functions, triggers, security: re-made by every install (idempotent)."""
    s, p = sql_name(n.schema), n.channel
    events = _lit(n.events_channel)
    return [
        f"""CREATE OR REPLACE FUNCTION {s}.reply_channel(who name) RETURNS text
            LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
            SELECT CASE WHEN octet_length({_lit(p + '_reply_')} || who) <= 63
                        THEN {_lit(p + '_reply_')} || who
                        ELSE {_lit(p + '_reply_')} || md5(who) END $$""",
        # the 'finished' event of a reply: from the trigger when the reply is
        # stored, from the worker's DELETE when none was wanted.  A NOTIFY
        # payload must stay under 8000 bytes or the answer itself fails: the op
        # and message are cut short (the reply keeps them whole).  No SET
        # search_path, so that it is inlined into its caller's statement (the
        # trigger's, whose path is pinned): a SET costs every reply ~5 us.  No
        # definer: it runs as its caller, on pg_catalog's built-ins only
        f"""CREATE OR REPLACE FUNCTION {s}.finished_event(id text, op text, reply json,
                note text DEFAULT NULL) RETURNS text
            LANGUAGE sql STABLE AS $$
            SELECT json_build_object('event', 'finished', 'id', id, 'op', left(op, 200),
                'ok', (reply->>'ok')::boolean, 'error', left(reply->'error'->>'type', 200),
                'message', left(reply->'error'->>'message', 1000),
                'duration_s', round(extract(epoch FROM
                    (reply->>'finished_at')::timestamptz -
                    (reply->>'started_at')::timestamptz)::numeric, 3),
                'note', note)::text $$""",
        # what any submitter may know of everyone's requests -- which batches
        # are pending, how long the queue is -- and nothing else: definer
        # functions (the owner reads every row: policy owner_read), no argument.
        # Index-only scans of the partial indexes: the cost follows the queued
        # and running rows, never the answered and failed ones (the two counts
        # each use their own index; state IN (...) would read the table)
        f"""CREATE OR REPLACE FUNCTION {s}.pending_batches() RETURNS SETOF text
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
            SELECT r.batch FROM {s}.requests r
                WHERE r.state IN ('queued', 'running') AND r.batch IS NOT NULL
            UNION
            SELECT h.batch FROM {s}.batch_holds h $$""",
        f"""CREATE OR REPLACE FUNCTION {s}.queue_length() RETURNS bigint
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
            SELECT (SELECT count(*) FROM {s}.requests r WHERE r.state = 'queued')
                 + (SELECT count(*) FROM {s}.requests r WHERE r.state = 'running') $$""",
        # identity and state are the server's: whatever the client sent
        f"""CREATE OR REPLACE FUNCTION {s}.request_inserting() RETURNS trigger
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
            BEGIN
                NEW.submitter := session_user;
                NEW.submitted := clock_timestamp();
                NEW.state := 'queued';
                NEW.targets := NULL; NEW.claimed_by := NULL; NEW.claimed_at := NULL;
                NEW.attempt := 0; NEW.run := NULL; NEW.reply := NULL; NEW.reason := NULL;
                NEW.finished := NULL;
                RETURN NEW;
            END $$""",
        f"""CREATE OR REPLACE FUNCTION {s}.request_changed() RETURNS trigger
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
            BEGIN
                IF TG_OP = 'INSERT' THEN
                    PERFORM pg_notify({_lit(n.new_channel)}, NEW.id);
                    PERFORM pg_notify({events}, json_build_object('event', 'queued',
                        'id', NEW.id, 'op', NEW.op, 'priority', NEW.priority,
                        'user', NEW.submitter)::text);
                ELSIF TG_OP = 'DELETE' AND OLD.state = 'queued' THEN
                    -- a withdrawal; a collected reply says nothing: every NOTIFY
                    -- wakes every listening session, and a collect is the
                    -- client's business
                    PERFORM pg_notify({events}, json_build_object('event', 'removed',
                        'id', OLD.id, 'where', OLD.state,
                        'note', 'withdrawn (cancelled)')::text);
                END IF;
                IF TG_OP = 'UPDATE' AND OLD.state = 'running' AND NEW.state <> 'running' THEN
                    DELETE FROM {s}.leases WHERE request_id = OLD.id;  -- its targets are free
                END IF;
                IF TG_OP <> 'UPDATE' THEN
                    RETURN NULL;
                ELSIF NEW.state = 'queued' AND OLD.state <> 'queued' THEN
                    PERFORM pg_notify({_lit(n.new_channel)}, NEW.id);
                    PERFORM pg_notify({events}, json_build_object('event', 'queued',
                        'id', NEW.id, 'op', NEW.op, 'priority', NEW.priority,
                        'user', NEW.submitter, 'note', 'back in line from '
                        || OLD.state)::text);
                ELSIF NEW.state = 'running' AND NEW.run IS NOT NULL AND OLD.run IS NULL THEN
                    PERFORM pg_notify({events}, json_build_object('event', 'started',
                        'id', NEW.id, 'op', NEW.op, 'user', NEW.submitter,
                        'pid', NEW.run->'pid', 'host', NEW.run->'host',
                        'target', array_to_string(NEW.targets, ','))::text);
                ELSIF NEW.reply IS NOT NULL AND OLD.reply IS NULL THEN
                    PERFORM pg_notify({s}.reply_channel(NEW.submitter), NEW.id);
                    PERFORM pg_notify({events}, {s}.finished_event(NEW.id, NEW.op, NEW.reply));
                    IF NEW.state = 'failed' THEN
                        PERFORM pg_notify({events}, json_build_object('event', 'failed',
                            'id', NEW.id, 'reason', NEW.reason)::text);
                    END IF;
                END IF;
                RETURN NULL;
            END $$""",
        f"""DROP TRIGGER IF EXISTS requests_inserting ON {s}.requests""",
        f"""CREATE TRIGGER requests_inserting BEFORE INSERT ON {s}.requests
            FOR EACH ROW EXECUTE FUNCTION {s}.request_inserting()""",
        f"""DROP TRIGGER IF EXISTS requests_changed ON {s}.requests""",
        f"""CREATE TRIGGER requests_changed AFTER INSERT OR UPDATE OR DELETE
            ON {s}.requests FOR EACH ROW EXECUTE FUNCTION {s}.request_changed()""",
    ]


def _security(n: Names) -> list[str]:
    s, sub, wrk = sql_name(n.schema), sql_name(n.submit_role), sql_name(n.worker_role)
    out = [
        f"ALTER TABLE {s}.requests ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {s}.requests FORCE ROW LEVEL SECURITY",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM PUBLIC",
        f"REVOKE ALL ON SCHEMA {s} FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA {s} TO {sub}, {wrk}",
        f"GRANT SELECT ON {s}.meta TO {sub}, {wrk}",
        f"REVOKE ALL ON {s}.requests FROM {sub}, {wrk}",
        f"GRANT SELECT, DELETE ON {s}.requests TO {sub}",
        f"GRANT INSERT ({', '.join(CLIENT_COLUMNS)}) ON {s}.requests TO {sub}",
        # the worker never inserts: a request always has a submitter
        f"GRANT SELECT, UPDATE, DELETE ON {s}.requests TO {wrk}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.leases, {s}.workers TO {wrk}",
        # held batches: the worker's alone (a submitter learns of them only
        # through pending_batches)
        f"REVOKE ALL ON {s}.batch_holds FROM {sub}, {wrk}",
        f"GRANT SELECT, INSERT, DELETE ON {s}.batch_holds TO {wrk}",
        f"REVOKE ALL ON FUNCTION {s}.pending_batches(), {s}.queue_length() FROM PUBLIC",
        f"GRANT EXECUTE ON FUNCTION {s}.pending_batches(), {s}.queue_length() TO {sub}, {wrk}",
    ]
    policies = {
        "submit_read": f"FOR SELECT TO {sub} USING (submitter = session_user)",
        "submit_insert": f"FOR INSERT TO {sub} WITH CHECK (submitter = session_user)",
        # cancel (queued) and collect (answered) -- never a running request
        "submit_delete": (f"FOR DELETE TO {sub} USING (submitter = session_user"
                          " AND state IN ('queued', 'answered'))"),
        "worker_all": f"FOR ALL TO {wrk} USING (true) WITH CHECK (true)",
        # the owner (never a login; its definer functions pending_batches and
        # queue_length) reads every row -- it could alter these policies anyway
        "owner_read": f"FOR SELECT TO {sql_name(n.owner_role)} USING (true)",
    }
    for name, body in policies.items():
        out += [f"DROP POLICY IF EXISTS {name} ON {s}.requests",
                f"CREATE POLICY {name} ON {s}.requests {body}"]
    return out


def _role_exists(cur, role: str) -> bool:
    return cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() \
        is not None


def install(conn, names: Names, web_logins: tuple[str, ...] = (),
            worker_logins: tuple[str, ...] = ()) -> list[str]:
    """Create, repair or migrate the queue in the database of ``conn`` (an
    administrator's connection, not in a transaction); add the login roles
    to the group roles (creating them, LOGIN, when missing).  One line per
    change."""
    changes: list[str] = []
    with conn.transaction():
        cur = conn.cursor()
        for role in (names.owner_role, names.submit_role, names.worker_role):
            if not _role_exists(cur, role):
                cur.execute(f"CREATE ROLE {sql_name(role)} NOLOGIN")
                changes.append(f"created role {role}")
        for group, logins in ((names.submit_role, web_logins),
                              (names.worker_role, worker_logins)):
            for login in logins:
                if not _role_exists(cur, login):
                    cur.execute(f"CREATE ROLE {sql_name(login)} LOGIN")
                    changes.append(f"created role {login} (LOGIN)")
                member = cur.execute("SELECT pg_has_role(%s, %s, 'MEMBER')",
                                     (login, group)).fetchone()[0]
                if not member:
                    cur.execute(f"GRANT {sql_name(group)} TO {sql_name(login)}")
                    changes.append(f"granted {group} to {login}")
        exists = cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                             (names.schema,)).fetchone()
        if not exists:
            cur.execute(f"CREATE SCHEMA {sql_name(names.schema)} AUTHORIZATION {sql_name(names.owner_role)}")
            changes.append(f"created schema {names.schema}")
        version = installed_version(conn, names)
        if version is not None and version > SCHEMA_VERSION:
            raise SpoolSetupError(f"schema {names.schema} is at version {version}, newer than"
                               f" this spoolops ({SCHEMA_VERSION}): upgrade spoolops")
        # objects are made as their owner, so that no login role owns one
        cur.execute(f"SET LOCAL ROLE {sql_name(names.owner_role)}")
        for step in range((version or 0) + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[step](names):
                cur.execute(statement)
            changes.append(f"schema {names.schema}: version {step}")
        if version != SCHEMA_VERSION:
            cur.execute(f"INSERT INTO {sql_name(names.schema)}.meta (key, value) VALUES"
                        " ('schema_version', %s), ('channel', %s) ON CONFLICT (key) DO"
                        " UPDATE SET value = EXCLUDED.value",
                        (str(SCHEMA_VERSION), names.channel))
        for statement in _functions(names) + _security(names):
            cur.execute(statement)
        cur.execute(f"UPDATE {sql_name(names.schema)}.meta SET value = %s WHERE key = 'channel'",
                    (names.channel,))
        cur.execute("RESET ROLE")
    return changes


def installed_version(conn, names: Names) -> int | None:
    """The schema version in the database, None when there is none."""
    table = conn.execute("SELECT to_regclass(%s)",
                         (f"{sql_name(names.schema)}.meta",)).fetchone()[0]
    if table is None:
        return None
    row = conn.execute(f"SELECT value FROM {sql_name(names.schema)}.meta"
                       " WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else None


def check(conn, names: Names) -> list[tuple[str, bool, str, str]]:
    """(check, ok, message, fix) for ``spoolops doctor``, read-only."""
    fix = "run 'spoolops init --transport postgresql' (as the database administrator)"
    out: list[tuple[str, bool, str, str]] = []
    try:
        version = installed_version(conn, names)
    except Exception as exc:  # noqa: BLE001 - e.g. no USAGE on the schema
        conn.rollback()
        return [("schema", False, f"cannot read {names.schema}.meta: {exc}".strip(), fix)]
    if version is None:
        return [("schema", False, f"no schema {names.schema} in this database", fix)]
    out.append(("schema version", version == SCHEMA_VERSION,
                f"{names.schema} at version {version} (this spoolops: {SCHEMA_VERSION})",
                fix if version < SCHEMA_VERSION else "upgrade spoolops"))
    row = conn.execute("SELECT c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
                       " WHERE c.oid = to_regclass(%s)",
                       (f"{sql_name(names.schema)}.requests",)).fetchone()
    out.append(("row-level security", bool(row and row[0] and row[1]),
                "requests: " + ("enabled and forced" if row and row[0] and row[1] else
                                "NOT enabled and forced"), fix))
    channel = conn.execute(f"SELECT value FROM {sql_name(names.schema)}.meta WHERE key ="
                           " 'channel'").fetchone()
    out.append(("channel", bool(channel and channel[0] == names.channel),
                (f"triggers notify on {channel[0] if channel else '?'}_*, the configuration"
                f" listens on {names.channel}_*"), fix))
    me = conn.execute("SELECT session_user, r.rolsuper, r.rolbypassrls FROM pg_roles r"
                      " WHERE r.rolname = session_user").fetchone()
    if me is not None:
        out.append(("role", not (me[1] or me[2]),
                    f"connected as {me[0]}" + (" (superuser or BYPASSRLS: row-level"
                                               " security does not apply!)"
                                               if me[1] or me[2] else ""),
                    "connect as a login role that is a member of the submit or worker role"))
        roles = [r for r in (names.submit_role, names.worker_role)
                 if conn.execute("SELECT pg_has_role(session_user, %s, 'USAGE')",
                                 (r,)).fetchone()[0]]
        out.append(("membership", bool(roles),
                    f"{me[0]} is a member of {', '.join(roles) or 'neither group role'}",
                    f"GRANT {names.submit_role} (or {names.worker_role}) TO {me[0]}"))
    return out
