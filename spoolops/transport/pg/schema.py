"""The PostgreSQL queue's schema: its names, its tables versioned (each
migration step), and the row format (a request row turned back into the
document dispatch reads).  The functions, triggers and grants are
``functions``; putting it all in a database, and checking it, ``install``.

``install`` creates or repairs everything ``spoolops init --transport
postgresql`` promises, idempotently: three group roles (an owner that never
logs in, ``submit_role``, ``worker_role``), the schema and its tables owned
by the owner, row-level security (forced, so that not even the owner
bypasses it), grants, triggers and functions.  A database at an older
``schema_version`` is migrated step by step; a newer one is refused.

Identity comes from the database: a BEFORE INSERT trigger sets
``submitter := session_user`` and resets every column a client must not
choose.  Web roles hold no privilege on any table (none to LOCK, scan or
probe with): they submit, cancel their own queued requests and read and
remove their own replies through definer functions of the owner
(``submit``, ``cancel``, ``reply_of``, ``forget``, ``progress_of``,
``listen``; ``search_path`` pinned, the caller taken from
``session_user``) and see their own rows in the view ``my_requests``; only
the worker role answers.  Of other submitters' requests a submitter learns
only what two more definer functions say: which batches are pending and
how many requests wait -- ids are unique per submitter, so not even an id
taken tells it anything.  Notifications carry ids (and bounded words), on
channels whose names carry a random part only the worker role can read;
any role may NOTIFY a channel it can name, so a payload is a hint, and the
row, read under these policies, is the truth.

Trusts: the administrator's connection it is given (a superuser, or a role
with CREATEROLE that owns the database).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ...formats import valid_id

SCHEMA_VERSION = 7

# the request columns a submitter may write (column privilege and the trigger)
CLIENT_COLUMNS = ("id", "version", "op", "args", "priority", "deadline", "client_submitted",
                  "client", "answer_wanted", "reply_to")

# what a web role may call (it holds no privilege on any table): the definer
# functions of ``_functions``, with their argument types
WEB_FUNCTIONS = (
    "submit(text, int, text, json, int, timestamptz, text, json, boolean, int, boolean, text)",
    "cancel(text)", "collect(text, boolean)", "progress_of(text)", "listen(text, text)",
    "pending_batches()", "queue_length()")
# a client process's own reply channel: the random part of its name
REPLY_TO_RE = "^[0-9a-f]{16,32}$"
# a request's document is its columns and this much around them (the keys,
# quotes and commas of ``envelope``): what ``submit`` counts against
# max_request_bytes before it stores anything (the worker checks the
# document itself again)
ENVELOPE_BYTES = 128
CHANNEL_PREFIX_MAX = 24   # of a channel name: the prefix, then "_x_" and 32 hex digits


class DbChannel(str):
    """A channel whose real name only the database says (the string is a
    label for logs): ``pg.conn.listen`` LISTENs through ``<schema>.listen(kind)``,
    which checks that the caller may.  Any role may LISTEN on any channel it
    can name, so these names carry a random part no web role can read."""

    kind: str
    schema: str    # quoted

    def __new__(cls, label: str, kind: str, schema: str) -> DbChannel:  # noqa: PYI034
        made = super().__new__(cls, label)
        made.kind, made.schema = kind, schema
        return made

    def listen_sql(self, process: str | None = None) -> str:
        """LISTEN through the schema's function; ``process``: a reply
        channel of this process's own (its random part, ``REPLY_TO_RE``)."""
        if process is None:
            return f"SELECT {self.schema}.listen({sql_literal(self.kind)})"
        return f"SELECT {self.schema}.listen({sql_literal(self.kind)}, {sql_literal(process)})"


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
    def new_channel(self) -> DbChannel:
        """New requests' ids (the worker role's): LISTEN with ``pg.conn.listen``."""
        return DbChannel(f"{self.channel}_new", "new", sql_name(self.schema))

    @property
    def events_channel(self) -> DbChannel:
        """Events, ids and a few bounded words (the worker role's, and
        superusers'): LISTEN with ``pg.conn.listen``."""
        return DbChannel(f"{self.channel}_events", "events", sql_name(self.schema))

    @property
    def reply_channel(self) -> DbChannel:
        """The replies to the connecting role's requests (their client ids):
        the role's channel, and each process's own (``DbChannel.listen_sql``)
        for the requests it published while waiting for them."""
        return DbChannel(f"{self.channel}_r_*", "reply", sql_name(self.schema))

    def lock_held(self, worker: str) -> str:
        """SQL: true while the worker whose id is the expression ``worker`` is
        alive -- the one liveness test.  Alive means: the backend it
        registered (``workers.backend_pid``), a session of the role that
        registered it, holds the random advisory key it registered
        (``lock_key``, taken afresh on each connection).  Any role may take
        any advisory key, and every key is visible in ``pg_locks``: a key
        alone proves nothing, so the holder's pid and role are checked too
        (a web role's session is never that pid of that role)."""
        s = sql_name(self.schema)
        return (f"EXISTS (SELECT 1 FROM {s}.workers lw, pg_catalog.pg_locks l WHERE"
                f" lw.id = {worker} AND l.locktype = 'advisory' AND l.pid = lw.backend_pid"
                " AND l.granted AND l.objsubid = 1 AND l.classid::bigint = lw.lock_key >> 32"
                " AND l.objid::bigint = lw.lock_key & 4294967295 AND l.database = (SELECT"
                " d.oid FROM pg_catalog.pg_database d WHERE d.datname ="
                " pg_catalog.current_database()) AND (SELECT"
                " pg_catalog.pg_get_userbyid(a.usesysid) FROM"
                " pg_catalog.pg_stat_get_activity(lw.backend_pid) a) = lw.role)")


# -- the row format: a request row <-> the request document dispatch reads --

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)  # noqa: UP017 - datetime.UTC is 3.11+
# every column of ``requests`` but its ids, as the view ``my_requests`` shows them
VIEW_COLUMNS = ", ".join("r." + c for c in (
    "submitter", "version", "op", "args", "priority", "deadline", "client_submitted",
    "client", "submitted", "state", "targets", "claimed_by", "claimed_at", "attempt", "run",
    "reply", "reason", "finished", "answer_wanted", "batch"))

REQUEST_COLUMNS = ("id, submitter, version, op, args::text, priority, deadline,"
                   " client_submitted, client::text, submitted, answer_wanted")


# REQUEST_COLUMNS by name, with their types: the rows ``answer_queued_sql``
# compares, as the worker read them
REQUEST_FIELDS = (("id", "text"), ("submitter", "name"), ("version", "int"), ("op", "text"),
                  ("args", "text"), ("priority", "int"), ("deadline", "timestamptz"),
                  ("client_submitted", "text"), ("client", "text"),
                  ("submitted", "timestamptz"), ("answer_wanted", "boolean"))


def answer_queued_sql(s: str) -> str:
    """Claim and answer queued rows as read, each with its reply, in one
    statement.  A row is answered only if it is still queued with every
    column as read; a row some web role holds locked (its own cancel, in a
    transaction left open) is skipped, as by the claim -- the main loop
    never waits on a lock a web role holds; nothing is answered by a fenced
    worker.  Parameters: the worker's id; the reads, a JSON array of
    objects with the ``REQUEST_FIELDS`` (times in ISO 8601 with their
    microseconds) and ``reply``; the worker's id again.  Returns the ids
    answered.  (One JSON text: an array parameter per column would be
    escaped element by element, which cost more than the statement.)"""
    fields = ", ".join(f"{name} {kind}" for name, kind in REQUEST_FIELDS)
    now = ", ".join("q." + column.strip() for column in REQUEST_COLUMNS.split(","))
    was = ", ".join(f"v.{name}" for name, _ in REQUEST_FIELDS)
    # each read finds its row by key (LATERAL, which its lock keeps from
    # being flattened): joined by hashing, the planner scanned every queued
    # row for one read
    return _answer_sql(s, "a.reply", f"SELECT q.id, v.reply FROM json_to_recordset(%s::json)"
                       f" AS v({fields}, reply json) CROSS JOIN LATERAL (SELECT q.id FROM"
                       f" {s}.requests q WHERE q.id = v.id AND q.state = 'queued' AND ({now})"
                       f" IS NOT DISTINCT FROM ({was}) FOR UPDATE SKIP LOCKED) q")


def answer_one_sql(s: str) -> str:
    """``answer_queued_sql`` for one read, as plain parameters: the reply,
    the worker's id, the id, the row as read (``REQUEST_COLUMNS``), the
    worker's id again; the id if answered.  (One read in a JSON array costs
    more than the statement: a generic plan takes the array for 100 rows.)"""
    was = ", ".join(f"%s::{kind}" for _, kind in REQUEST_FIELDS)
    return _answer_sql(s, "%s", f"SELECT id FROM {s}.requests WHERE id = %s AND state ="
                       f" 'queued' AND ({REQUEST_COLUMNS}) IS NOT DISTINCT FROM ({was}) FOR"
                       " UPDATE SKIP LOCKED")


def _answer_sql(s: str, reply: str, reads: str) -> str:
    """Answer (and claim for this worker, its first attempt) the rows
    ``reads`` selects, with ``reply``, unless this worker is fenced."""
    return (f"UPDATE {s}.requests r SET state = 'answered', reply = {reply}, finished ="
            " clock_timestamp(), claimed_by = %s, claimed_at = clock_timestamp(), attempt ="
            f" r.attempt + 1 FROM ({reads}) a WHERE r.id = a.id AND EXISTS (SELECT 1 FROM"
            f" {s}.workers w WHERE w.id = %s AND w.fenced_at IS NULL) RETURNING r.id")


# what the worker's scan reads of queued requests' bodies, in all: the rows
# beyond it come as ids and keys (``peek`` reads them one at a time), so that
# a backlog of large requests never sits in the worker's memory at once
SCAN_BYTES = 4 * 2**20


def scan_sql(s: str) -> str:
    """The worker's scan of queued rows (``s``: the quoted schema; parameters:
    the bytes budget, the row limit), in claim order: ``(id, whole, *a row of
    REQUEST_COLUMNS)`` where ``whole`` is false, and ``op``, ``args`` and
    ``client`` NULL, once the running total of the rows' sizes passes the
    budget."""
    body = ("octet_length(r.op) + coalesce(octet_length(r.args::text), 0)"
            " + coalesce(octet_length(r.client::text), 0)"
            " + coalesce(octet_length(r.client_submitted), 0)")
    order = "r.priority DESC, r.submitted, r.id"
    # the sizes are summed over keys only; a body is read once, for the row
    # that fits.  Each row is then fetched by its key (LATERAL ... OFFSET 0
    # keeps the planner from joining by hashing the whole table, answered
    # rows and all: 60 ms a scan at 100,000 rows, against 6)
    return (f"SELECT q.id, q.whole, r.id, r.submitter, r.version, CASE WHEN q.whole THEN"
            " r.op END, CASE WHEN q.whole THEN r.args::text END, r.priority, r.deadline,"
            " r.client_submitted, CASE WHEN q.whole THEN r.client::text END, r.submitted,"
            f" r.answer_wanted FROM (SELECT r.id, r.priority, r.submitted, sum({body}) OVER"
            f" (ORDER BY {order}) <= %s AS whole FROM {s}.requests r WHERE r.state ="
            f" 'queued' ORDER BY {order} LIMIT %s) q CROSS JOIN LATERAL (SELECT * FROM"
            f" {s}.requests r WHERE r.id = q.id OFFSET 0) r"
            " ORDER BY q.priority DESC, q.submitted, q.id")


# a queued row's notice to the workers carries the row itself up to this
# many bytes, its id alone beyond: an instant op's request is small, and
# NOTIFY's queue is one per cluster (8 GB), which a session left listening
# in an open transaction keeps from being trimmed -- a notice must cost it
# little more than an id would
HINT_BYTES = 1000


def hint_sql(row: str) -> str:
    """The payload of the notice that ``row`` (``NEW``, in a trigger) is
    queued: a JSON array of ``REQUEST_COLUMNS`` -- ``args`` and ``client``
    as the text the client wrote, times as microseconds since the epoch --
    when it fits in ``HINT_BYTES``, else its id.  The channel's name is a
    secret of the worker role's: the row is for the workers' eyes only."""
    def micros(column: str) -> str:
        return f"(extract(epoch FROM {row}.{column}) * 1000000)::bigint"
    whole = (f"json_build_array({row}.id, {row}.submitter, {row}.version, {row}.op,"
             f" {row}.args::text, {row}.priority, {micros('deadline')},"
             f" {row}.client_submitted, {row}.client::text, {micros('submitted')},"
             f" {row}.answer_wanted)::text")
    # sized before it is built (a large request is never encoded here) and
    # after (escapes may grow it)
    size = (f"octet_length({row}.op) + coalesce(octet_length({row}.args::text), 0)"
            f" + coalesce(octet_length({row}.client::text), 0)"
            f" + coalesce(octet_length({row}.client_submitted), 0)")
    return (f"(SELECT CASE WHEN octet_length(h.payload) <= {HINT_BYTES} THEN h.payload"
            f" ELSE {row}.id END FROM (SELECT CASE WHEN {size} <= {HINT_BYTES} THEN {whole}"
            " END AS payload) h)")


def row_of_hint(payload: str) -> tuple | None:
    """The row of ``REQUEST_COLUMNS`` a notice carries (see ``hint_sql``),
    or None for a notice that names an id only (or that does not parse: a
    notice is a hint, the table the truth)."""
    if not payload.startswith("[") or len(payload) > HINT_BYTES:
        return None
    try:
        (rid, submitter, version, op, args, priority, deadline, client_submitted, client,
         submitted, answer_wanted) = json.loads(payload)
        if not (valid_id(rid) and isinstance(submitter, str) and isinstance(op, str)
                and _whole(version) and _whole(priority) and _whole(submitted)
                and (deadline is None or _whole(deadline))
                and all(v is None or isinstance(v, str) for v in (args, client_submitted,
                                                                   client))
                and isinstance(answer_wanted, bool)):
            return None
        return (rid, submitter, version, op, args, priority,
                None if deadline is None else EPOCH + timedelta(microseconds=deadline),
                client_submitted, client, EPOCH + timedelta(microseconds=submitted),
                answer_wanted)
    except Exception:  # noqa: BLE001 - whatever a forged notice holds: not a row
        return None


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


def sql_literal(text: str) -> str:
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


def _version_3(n: Names) -> list[str]:
    """Issue 20, the worker's side: liveness only a worker can give, hung
    workers, order across workers, and no deadline a worker cannot read.

    ``workers`` gains ``backend_pid`` and ``lock_key`` (the session and the
    random advisory key of ``Names.lock_held``), ``heartbeat`` (written by
    the worker's main loop every ``lock_grace / 4``: another worker fences
    one whose heartbeat is stale, see ``pg.PgTransport.orphans``) and
    ``fenced_at`` (set by the worker that took this one's requests over: it
    stops when it sees it).  ``requests_known_targets`` finds the queued and
    running rows whose targets a worker has learnt (stored by ``lease``,
    ``start`` and ``put_back``): the lease of a later request on one of them
    waits.  A ``deadline`` beyond what a client library can read (infinity,
    after 9999, before year 1) made every worker that claimed the row fail
    after the claim had committed: refused at INSERT now, and cleared on
    rows that have one."""
    s = sql_name(n.schema)
    window = ("deadline > '0001-01-02 00:00:00+00' AND deadline <"
              " '9999-12-30 00:00:00+00'")
    return [
        f"""ALTER TABLE {s}.workers
            ADD COLUMN backend_pid int,
            ADD COLUMN lock_key bigint,
            ADD COLUMN heartbeat timestamptz NOT NULL DEFAULT clock_timestamp(),
            ADD COLUMN fenced_at timestamptz""",
        f"""CREATE INDEX requests_known_targets ON {s}.requests (priority DESC, submitted, id)
            WHERE state IN ('queued', 'running') AND targets IS NOT NULL
                AND cardinality(targets) > 0""",
        f"""UPDATE {s}.requests SET deadline = NULL
            WHERE deadline IS NOT NULL AND NOT ({window})""",
        f"""ALTER TABLE {s}.requests ADD CONSTRAINT deadline_readable
            CHECK (deadline IS NULL OR ({window}))""",
    ]


def _version_4_security(n: Names) -> list[str]:
    """Issue 20, the web roles' side (findings 3, 5, 9): web roles act through
    definer functions only (``_functions``), so the tables gain what those
    need.

    ``secrets``: the random parts of the channel names (the owner's and the
    worker role's only: a role that cannot read it cannot guess a channel
    to LISTEN on).  ``retired``: the ids of requests that wanted no reply,
    kept a while after the worker removed them, so that a submit whose
    answer was lost and is repeated finds it was queued (and ran) rather
    than queueing it again.  ``requests.client_id``: the id the client
    chose, when it is not the row's ``id`` -- ids are unique per submitter:
    a second submitter's request under an id already taken is stored under
    an id derived from both (``derived_id``) and answered under its own,
    so that a taken id tells nobody that another role's request exists."""
    s = sql_name(n.schema)
    return [
        f"""ALTER TABLE {s}.requests ADD COLUMN client_id text""",
        f"""CREATE TABLE {s}.secrets (key text PRIMARY KEY, value text NOT NULL)""",
        f"""CREATE TABLE {s}.retired (
            id text PRIMARY KEY,
            submitter name NOT NULL,
            at timestamptz NOT NULL DEFAULT clock_timestamp())""",
        f"""CREATE INDEX retired_at ON {s}.retired (at)""",
    ]


def _version_5_review(n: Names) -> list[str]:
    """Issue 20's attacker review.  ``leases`` keyed by a digest of the
    target: a path longer than an index entry (2704 bytes) was refused by
    the primary key, and its request was put back and retried for ever.
    ``claim_turn``: one row that only the worker role may lock; claims take
    it first, one worker at a time, so that a claim may skip the rows some
    web role holds locked (its own cancel or collect in an open
    transaction) instead of waiting on them -- what is skipped is then never
    a row another worker is claiming, whose order ``lease`` relies on."""
    s = sql_name(n.schema)
    return [
        f"""ALTER TABLE {s}.leases ADD COLUMN target_key text
            GENERATED ALWAYS AS (pg_catalog.md5(target)) STORED""",
        f"""ALTER TABLE {s}.leases DROP CONSTRAINT leases_pkey""",
        f"""ALTER TABLE {s}.leases ADD PRIMARY KEY (target_key)""",
        f"""CREATE TABLE {s}.claim_turn (one boolean PRIMARY KEY DEFAULT true CHECK (one))""",
        f"""INSERT INTO {s}.claim_turn VALUES (true)""",
    ]


def _version_6_reply_to(n: Names) -> list[str]:
    """Issue 22: a reply wakes only its waiter's process.  Every client
    process of a role LISTENed on the role's one reply channel, so every
    reply woke every process of the role (eight clients: eight wake-ups per
    reply, seven for nothing).  ``reply_to``: the random part of the channel
    of the process that published the request while waiting for it
    (``Client.call``); its reply is NOTIFYed there, a request published
    without a waiter on the role's channel as before."""
    s = sql_name(n.schema)
    return [
        f"""ALTER TABLE {s}.requests ADD COLUMN reply_to text
            CONSTRAINT reply_to_random CHECK (reply_to ~ '{REPLY_TO_RE}')""",
    ]


def _version_7_hints(n: Names) -> list[str]:
    """Issue 22: a queued row's notice to the workers carries the row
    (``hint_sql``), so that a worker can answer an instant idempotent
    request with one statement that also claims it.  No table changes:
    the trigger is re-made by every install.  A worker of an older
    spoolops, which takes every payload for an id, may not start on this
    version, and one still running is fenced by the migration (``install``
    fences the registered workers whenever it migrates)."""
    return []


# version -> the statements that reach it
MIGRATIONS = {1: _version_1, 2: _version_2, 3: _version_3, 4: _version_4_security,
              5: _version_5_review, 6: _version_6_reply_to, 7: _version_7_hints}
