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
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ...errors import SpoolSetupError

SCHEMA_VERSION = 5

# the request columns a submitter may write (column privilege and the trigger)
CLIENT_COLUMNS = ("id", "version", "op", "args", "priority", "deadline", "client_submitted",
                  "client", "answer_wanted")

# what a web role may call (it holds no privilege on any table): the definer
# functions of ``_functions``, with their argument types
WEB_FUNCTIONS = (
    "submit(text, int, text, json, int, timestamptz, text, json, boolean, int, boolean)",
    "cancel(text)", "collect(text, boolean)", "progress_of(text)", "listen(text)",
    "pending_batches()", "queue_length()")
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

    def listen_sql(self) -> str:
        return f"SELECT {self.schema}.listen({_lit(self.kind)})"


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
        """The replies to the connecting role's requests (their client ids)."""
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
_VIEW_COLUMNS = ", ".join("r." + c for c in (
    "submitter", "version", "op", "args", "priority", "deadline", "client_submitted",
    "client", "submitted", "state", "targets", "claimed_by", "claimed_at", "attempt", "run",
    "reply", "reason", "finished", "answer_wanted", "batch"))

REQUEST_COLUMNS = ("id, submitter, version, op, args::text, priority, deadline,"
                   " client_submitted, client::text, submitted, answer_wanted")


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
    # that fits
    return (f"SELECT q.id, q.whole, r.id, r.submitter, r.version, CASE WHEN q.whole THEN"
            " r.op END, CASE WHEN q.whole THEN r.args::text END, r.priority, r.deadline,"
            " r.client_submitted, CASE WHEN q.whole THEN r.client::text END, r.submitted,"
            f" r.answer_wanted FROM (SELECT r.id, r.priority, r.submitted, sum({body}) OVER"
            f" (ORDER BY {order}) <= %s AS whole FROM {s}.requests r WHERE r.state ="
            f" 'queued' ORDER BY {order} LIMIT %s) q JOIN {s}.requests r ON r.id = q.id"
            " ORDER BY q.priority DESC, q.submitted, q.id")


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


# version -> the statements that reach it
MIGRATIONS = {1: _version_1, 2: _version_2, 3: _version_3, 4: _version_4_security,
              5: _version_5_review}


def _functions(n: Names) -> list[str]:
    """Functions, triggers, the web roles' view: re-made by every install
    (idempotent).

    Channels: the names of ``<channel>_new`` and ``<channel>_events`` carry
    a random part kept in ``secrets`` (the owner's and the worker role's
    only), and a submitter's reply channel is ``<channel>_r_`` and the md5
    of another random part and its role: any role may LISTEN on any channel,
    so a channel's name is what keeps it private.  Payloads are ids (and on
    the events channel a few bounded words: the event, ok, the error type),
    never an op, a path or a message -- ``tail`` reads those from the table.

    Web roles hold no privilege on any table: they act through the definer
    functions below (owned by the owner, ``search_path`` pinned, the caller
    taken from ``session_user``), which is all they can lock or read."""
    s, wrk = sql_name(n.schema), n.worker_role
    reply_prefix = _lit(n.channel[:CHANNEL_PREFIX_MAX] + "_r_")

    def secret(key: str) -> str:    # the value of a secret (``key``: an expression)
        return f"(SELECT x.value FROM {s}.secrets x WHERE x.key = {key})"
    new, events = secret("'new'"), secret("'events'")

    # the channel of a submitter's replies (``who``: an expression)
    def reply_to(who: str) -> str:
        return (f"(SELECT {reply_prefix} || md5(x.value || {who}) FROM {s}.secrets x"
                " WHERE x.key = 'reply')")

    # the caller's own row of client id p_id: under it, or under the id
    # derived from it (one equality each: the primary key, whatever the plan)
    mine = "r.submitter = session_user AND r.id = rid"
    first = "rid text := p_id;"
    second = f"rid := {s}.derived_id(session_user, p_id);"
    definer = "SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
    size = (f"({ENVELOPE_BYTES} + octet_length(p_id) + octet_length(p_op)"
            " + coalesce(octet_length(p_args::text), 4)"
            " + coalesce(octet_length(p_client::text), 0)"
            " + coalesce(octet_length(p_client_submitted), 0))")
    # the reply under the id its client chose (``p_id``)
    reply_as_asked = ("CASE WHEN r.id = p_id OR json_typeof(r.reply) <> 'object' THEN r.reply"
                      " ELSE jsonb_set(r.reply::jsonb, '{id}', to_jsonb(p_id))::json END")
    return [
        f"DROP FUNCTION IF EXISTS {s}.reply_channel(name)",
        # the id a second submitter's request is stored under when its own is
        # taken (by another role: ids are unique per submitter), within the
        # pattern and length of an id; the row keeps the client's in client_id.
        # Keyed by a secret: a role that could work it out could take it
        # first, and the second submitter's request would be refused
        # (no SET: inlined into its callers, whose search_path is pinned)
        f"""CREATE OR REPLACE FUNCTION {s}.derived_id(who name, id text) RETURNS text
            LANGUAGE sql STABLE AS $$
            SELECT pg_catalog.left(id, 119) || '.' || pg_catalog.left(pg_catalog.md5(
                x.value || '/' || who || '/' || id), 8)
                FROM {s}.secrets x WHERE x.key = 'derive' $$""",
        # the worker's claim (as the worker role): the turn first, so that the
        # rows it skips (SKIP LOCKED) are only ever rows a web role holds --
        # another worker's claim is waited for, and is committed (running,
        # seen by lease) by the time this one reads the table (a statement of
        # its own: a fresh snapshot)
        f"""CREATE OR REPLACE FUNCTION {s}.claim_batch(p_me int, p_ids text[])
                RETURNS SETOF {s}.requests
            LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
            BEGIN
                PERFORM 1 FROM {s}.claim_turn FOR UPDATE;
                RETURN QUERY UPDATE {s}.requests r SET state = 'running', claimed_by = p_me,
                        claimed_at = clock_timestamp(), attempt = r.attempt + 1
                    FROM (SELECT q.id FROM {s}.requests q WHERE q.id = ANY(p_ids)
                          AND q.state = 'queued' ORDER BY q.id FOR UPDATE SKIP LOCKED) c
                    WHERE r.id = c.id RETURNING r.*;
            END $$""",
        # the 'finished' event of a request that wanted no reply, which the
        # worker's DELETE sends (its row is gone: the event says the outcome,
        # in a few bounded words).  It NOTIFYs the events channel itself and
        # returns NULL: the channel the worker passes alongside (a name any
        # role could guess) gets an empty payload
        f"""CREATE OR REPLACE FUNCTION {s}.finished_event(id text, op text, reply json,
                note text DEFAULT NULL) RETURNS text
            LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
            BEGIN
                PERFORM pg_notify({events}, json_build_object('event', 'finished', 'id', id,
                    'ok', (reply->>'ok')::boolean, 'error', left(reply->'error'->>'type', 64),
                    'note', left(note, 200))::text);
                RETURN NULL;
            END $$""",
        # what any submitter may know of everyone's requests -- which batches
        # are pending, how long the queue is -- and nothing else: definer
        # functions (the owner reads every row: policy owner_read), no argument.
        # Index-only scans of the partial indexes: the cost follows the queued
        # and running rows, never the answered and failed ones (the two counts
        # each use their own index; state IN (...) would read the table)
        f"""CREATE OR REPLACE FUNCTION {s}.pending_batches() RETURNS SETOF text
            LANGUAGE sql STABLE {definer} AS $$
            SELECT r.batch FROM {s}.requests r
                WHERE r.state IN ('queued', 'running') AND r.batch IS NOT NULL
            UNION
            SELECT h.batch FROM {s}.batch_holds h $$""",
        f"""CREATE OR REPLACE FUNCTION {s}.queue_length() RETURNS bigint
            LANGUAGE sql STABLE {definer} AS $$
            SELECT (SELECT count(*) FROM {s}.requests r WHERE r.state = 'queued')
                 + (SELECT count(*) FROM {s}.requests r WHERE r.state = 'running') $$""",
        # -- the web roles' functions ---------------------------------------------
        # submit: refused whole when larger than max_request_bytes (54000,
        # nothing stored, no lock taken); waits at most p_wait_ms for a lock;
        # idempotent for a repeated submit (p_retry: the first one's answer was
        # lost): 'already' when the caller's row with this id and content is
        # there, or was answered and removed (retired); an id the caller uses
        # for another request is 23505.  An id another role holds is no error
        # (that would tell the caller it exists): the request is stored under
        # derived_id(caller, id) and answered under its own id
        f"""CREATE OR REPLACE FUNCTION {s}.submit(p_id text, p_version int, p_op text,
                p_args json, p_priority int, p_deadline timestamptz, p_client_submitted text,
                p_client json, p_answer_wanted boolean DEFAULT true,
                p_wait_ms int DEFAULT 5000, p_retry boolean DEFAULT false) RETURNS text
            LANGUAGE plpgsql {definer} SET lock_timeout = '5s' AS $$
            BEGIN
                IF {size} > (SELECT m.value::bigint FROM {s}.meta m
                             WHERE m.key = 'max_request_bytes') THEN
                    RAISE EXCEPTION 'request is % bytes, more than max_request_bytes (%)',
                        {size}, (SELECT m.value FROM {s}.meta m
                                 WHERE m.key = 'max_request_bytes')
                        USING ERRCODE = 'program_limit_exceeded';
                END IF;
                IF p_wait_ms IS DISTINCT FROM 5000 THEN
                    PERFORM set_config('lock_timeout',
                        greatest(coalesce(p_wait_ms, 5000), 1)::text || 'ms', true);
                END IF;
                IF NOT p_retry THEN     -- the common case: one INSERT
                    INSERT INTO {s}.requests (id, version, op, args, priority, deadline,
                            client_submitted, client, answer_wanted)
                        VALUES (p_id, p_version, p_op, p_args, coalesce(p_priority, 0),
                            p_deadline, p_client_submitted, p_client,
                            coalesce(p_answer_wanted, true))
                        ON CONFLICT (id) DO NOTHING;
                    IF FOUND THEN
                        RETURN 'queued';
                    END IF;
                END IF;
                RETURN {s}.submit_taken(p_id, p_version, p_op, p_args, p_priority,
                    p_deadline, p_client_submitted, p_client, p_answer_wanted, p_retry);
            END $$""",
        # the rest of submit: the id taken (by the caller, or by another role:
        # then under the derived id), or a repeated submit.  Called by submit
        # only (no EXECUTE for any role: it runs as the owner, submit's caller)
        f"""CREATE OR REPLACE FUNCTION {s}.submit_taken(p_id text, p_version int, p_op text,
                p_args json, p_priority int, p_deadline timestamptz, p_client_submitted text,
                p_client json, p_answer_wanted boolean, p_retry boolean) RETURNS text
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
            DECLARE
                rid text := p_id;
                got text;
                holder name;
                same boolean;
            BEGIN
                IF p_retry AND EXISTS (SELECT 1 FROM {s}.retired t WHERE t.id IN
                        (p_id, {s}.derived_id(session_user, p_id))
                        AND t.submitter = session_user) THEN
                    RETURN 'already';
                END IF;
                FOR attempt IN 1..4 LOOP
                    INSERT INTO {s}.requests (id, version, op, args, priority, deadline,
                            client_submitted, client, answer_wanted, client_id)
                        VALUES (rid, p_version, p_op, p_args, coalesce(p_priority, 0),
                            p_deadline, p_client_submitted, p_client,
                            coalesce(p_answer_wanted, true),
                            CASE WHEN rid = p_id THEN NULL ELSE p_id END)
                        ON CONFLICT (id) DO NOTHING RETURNING id INTO got;
                    IF got IS NOT NULL THEN
                        RETURN 'queued';
                    END IF;
                    SELECT r.submitter, r.op = p_op AND r.version IS NOT DISTINCT FROM p_version
                            AND r.args::text IS NOT DISTINCT FROM p_args::text
                            AND r.client_submitted IS NOT DISTINCT FROM p_client_submitted
                        INTO holder, same FROM {s}.requests r WHERE r.id = rid;
                    IF holder = session_user THEN
                        IF p_retry AND same THEN
                            RETURN 'already';
                        END IF;
                        RAISE EXCEPTION 'request id % is already in use', p_id
                            USING ERRCODE = 'unique_violation';
                    ELSIF holder IS NOT NULL THEN
                        IF rid <> p_id THEN    -- taken twice over: never by chance
                            RAISE EXCEPTION 'request id % is already in use', p_id
                                USING ERRCODE = 'unique_violation';
                        END IF;
                        rid := {s}.derived_id(session_user, p_id);
                    END IF;                     -- (gone meanwhile: the same id again)
                END LOOP;
                RAISE EXCEPTION 'request id % is already in use', p_id
                    USING ERRCODE = 'unique_violation';
            END $$""",
        # cancel: the caller's own request, while it is queued.  (These are
        # plpgsql, whose plans are kept for the session: an SQL function's
        # query is planned again on every call)
        f"""CREATE OR REPLACE FUNCTION {s}.cancel(p_id text) RETURNS boolean
            LANGUAGE plpgsql {definer} SET lock_timeout = '2s' AS $$
            DECLARE
                {first}
            BEGIN
                DELETE FROM {s}.requests r WHERE {mine} AND r.state = 'queued';
                IF NOT FOUND THEN
                    {second}
                    DELETE FROM {s}.requests r WHERE {mine} AND r.state = 'queued';
                END IF;
                RETURN FOUND;
            END $$""",
        # collect: the caller's reply (answered, or failed: kept).  p_remove:
        # an answered row is deleted -- the client calls this inside its own
        # transaction and commits once it holds the reply, so that a collect
        # whose answer is lost removes nothing (pg.client)
        f"DROP FUNCTION IF EXISTS {s}.collect(text, boolean)",
        f"""CREATE FUNCTION {s}.collect(p_id text, p_remove boolean DEFAULT true)
                RETURNS json
            LANGUAGE plpgsql {definer} SET lock_timeout = '2s' AS $$
            DECLARE
                {first}
                found_reply json;
            BEGIN
                FOR attempt IN 1..2 LOOP
                    IF p_remove THEN
                        DELETE FROM {s}.requests r WHERE {mine} AND r.state = 'answered'
                            RETURNING {reply_as_asked} INTO found_reply;
                        IF FOUND THEN
                            RETURN found_reply;
                        END IF;
                    END IF;
                    SELECT {reply_as_asked} INTO found_reply FROM {s}.requests r
                        WHERE {mine} AND r.reply IS NOT NULL
                            AND (r.state = 'failed' OR NOT p_remove AND r.state = 'answered');
                    IF FOUND THEN
                        RETURN found_reply;
                    END IF;
                    {second}
                END LOOP;
                RETURN NULL;
            END $$""",
        f"""CREATE OR REPLACE FUNCTION {s}.progress_of(p_id text) RETURNS json
            LANGUAGE plpgsql STABLE {definer} SET lock_timeout = '2s' AS $$
            DECLARE
                {first}
                found_it json;
            BEGIN
                SELECT r.run->'progress' INTO found_it FROM {s}.requests r
                    WHERE {mine} AND r.state = 'running';
                IF NOT FOUND THEN
                    {second}
                    SELECT r.run->'progress' INTO found_it FROM {s}.requests r
                        WHERE {mine} AND r.state = 'running';
                END IF;
                RETURN found_it;
            END $$""",
        # LISTEN on a channel whose name the caller may not read: its own
        # replies' ('reply'); new requests' and events ('new', 'events') for
        # the worker role and superusers only
        f"""CREATE OR REPLACE FUNCTION {s}.listen(kind text) RETURNS void
            LANGUAGE plpgsql VOLATILE {definer} AS $$
            DECLARE
                channel text;
            BEGIN
                IF kind = 'reply' THEN
                    channel := {reply_to('session_user')};
                ELSIF kind IN ('new', 'events') THEN
                    IF NOT (pg_has_role(session_user, {_lit(wrk)}, 'USAGE') OR EXISTS (
                            SELECT 1 FROM pg_roles WHERE rolname = session_user
                            AND rolsuper)) THEN
                        RAISE EXCEPTION 'only members of % may listen to the queue''s %',
                            {_lit(wrk)}, kind USING ERRCODE = 'insufficient_privilege';
                    END IF;
                    channel := {secret('kind')};
                ELSE
                    RAISE EXCEPTION 'no channel %', kind USING ERRCODE = 'invalid_parameter_value';
                END IF;
                IF channel IS NULL THEN
                    RAISE EXCEPTION 'no channel % (run spoolops init)', kind
                        USING ERRCODE = 'undefined_object';
                END IF;
                EXECUTE format('LISTEN %I', channel);
            END $$""",
        # a web role's own rows, for 'spoolops status/ls/show' (the owner reads
        # them: the role itself has no privilege on the table)
        f"DROP VIEW IF EXISTS {s}.my_requests",
        # under the ids their client chose: a row stored under a derived id
        # (another role holds the client's) must not tell its submitter so
        f"""CREATE VIEW {s}.my_requests WITH (security_barrier) AS
            SELECT coalesce(r.client_id, r.id) AS id, {_VIEW_COLUMNS}
            FROM {s}.requests r WHERE r.submitter = session_user""",
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
        # every payload is an id, or a few bounded words with it (under NOTIFY's
        # 8000 bytes whatever the request holds); the reply's is the id its
        # client chose
        f"""CREATE OR REPLACE FUNCTION {s}.request_changed() RETURNS trigger
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
            BEGIN
                IF TG_OP = 'INSERT' THEN
                    PERFORM pg_notify({new}, NEW.id);
                    PERFORM pg_notify({events}, json_build_object('event', 'queued',
                        'id', NEW.id)::text);
                    RETURN NULL;
                ELSIF TG_OP = 'DELETE' THEN
                    IF OLD.state = 'queued' THEN
                        -- a withdrawal; a collected reply says nothing: every NOTIFY
                        -- wakes every listening session, and a collect is the
                        -- client's business
                        PERFORM pg_notify({events}, json_build_object('event', 'removed',
                            'id', OLD.id, 'where', OLD.state,
                            'note', 'withdrawn (cancelled)')::text);
                    ELSIF OLD.state = 'running' AND NOT OLD.answer_wanted THEN
                        -- answered and removed (no reply wanted): a submit of it
                        -- repeated after a lost answer must not queue it again
                        INSERT INTO {s}.retired (id, submitter) VALUES (OLD.id, OLD.submitter)
                            ON CONFLICT (id) DO NOTHING;
                    END IF;
                    RETURN NULL;
                END IF;
                IF OLD.state = 'running' AND NEW.state <> 'running' THEN
                    DELETE FROM {s}.leases WHERE request_id = OLD.id;  -- its targets are free
                END IF;
                IF NEW.state = 'queued' AND OLD.state <> 'queued' THEN
                    PERFORM pg_notify({new}, NEW.id);
                    PERFORM pg_notify({events}, json_build_object('event', 'queued',
                        'id', NEW.id, 'note', 'back in line from ' || OLD.state)::text);
                ELSIF NEW.state = 'running' AND NEW.run IS NOT NULL AND OLD.run IS NULL THEN
                    PERFORM pg_notify({events}, json_build_object('event', 'started',
                        'id', NEW.id)::text);
                ELSIF NEW.reply IS NOT NULL AND OLD.reply IS NULL THEN
                    PERFORM pg_notify({reply_to('NEW.submitter')},
                                      coalesce(NEW.client_id, NEW.id));
                    PERFORM pg_notify({events}, json_build_object('event', 'finished',
                        'id', NEW.id, 'ok', (NEW.reply->>'ok')::boolean,
                        'error', left(NEW.reply->'error'->>'type', 64))::text);
                    IF NEW.state = 'failed' THEN
                        PERFORM pg_notify({events}, json_build_object('event', 'failed',
                            'id', NEW.id)::text);
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
    owner = sql_name(n.owner_role)
    web_functions = ", ".join(f"{s}.{f}" for f in WEB_FUNCTIONS)
    out = [
        f"ALTER TABLE {s}.requests ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {s}.requests FORCE ROW LEVEL SECURITY",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM PUBLIC",
        # every function and procedure here: none for PUBLIC (each role gets
        # what it needs, below; a function added later needs its own GRANT)
        f"REVOKE ALL ON ALL ROUTINES IN SCHEMA {s} FROM PUBLIC",
        f"REVOKE ALL ON SCHEMA {s} FROM PUBLIC",
        f"GRANT USAGE ON SCHEMA {s} TO {sub}, {wrk}",
        f"GRANT SELECT ON {s}.meta TO {sub}, {wrk}",
        # web roles: no privilege on any table (none to LOCK, scan or probe
        # with); their own rows through the view, the rest through functions
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM {sub}",
        f"GRANT SELECT ON {s}.meta, {s}.my_requests TO {sub}",
        f"GRANT EXECUTE ON FUNCTION {web_functions} TO {sub}",
        # the worker never inserts: a request always has a submitter
        f"REVOKE ALL ON {s}.requests FROM {wrk}",
        f"GRANT SELECT, UPDATE, DELETE ON {s}.requests TO {wrk}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {s}.leases, {s}.workers TO {wrk}",
        # held batches: the worker's alone (a submitter learns of them only
        # through pending_batches)
        f"REVOKE ALL ON {s}.batch_holds FROM {wrk}",
        f"GRANT SELECT, INSERT, DELETE ON {s}.batch_holds TO {wrk}",
        # the channels' random parts (the triggers read them as the worker)
        f"REVOKE ALL ON {s}.secrets, {s}.retired FROM {wrk}",
        f"GRANT SELECT ON {s}.secrets TO {wrk}",
        f"GRANT SELECT, INSERT, DELETE ON {s}.retired TO {wrk}",
        (f"GRANT EXECUTE ON FUNCTION {s}.listen(text), {s}.pending_batches(),"
         f" {s}.queue_length(), {s}.finished_event(text, text, json, text),"
         f" {s}.claim_batch(int, text[]) TO {wrk}"),
        f"REVOKE ALL ON {s}.claim_turn FROM {wrk}",
        f"GRANT SELECT, UPDATE ON {s}.claim_turn TO {wrk}",
    ]
    policies = {
        # (no privilege backs these now: kept as a second wall)
        "submit_read": f"FOR SELECT TO {sub} USING (submitter = session_user)",
        "submit_insert": f"FOR INSERT TO {sub} WITH CHECK (submitter = session_user)",
        # cancel (queued) and collect (answered) -- never a running request
        "submit_delete": (f"FOR DELETE TO {sub} USING (submitter = session_user"
                          " AND state IN ('queued', 'answered'))"),
        "worker_all": f"FOR ALL TO {wrk} USING (true) WITH CHECK (true)",
        # the owner (never a login; its definer functions) reads every row --
        # it could alter these policies anyway; it inserts and removes only
        # the calling session's, as its functions mean to
        "owner_read": f"FOR SELECT TO {owner} USING (true)",
        "owner_submit": (f"FOR INSERT TO {owner} WITH CHECK (submitter = session_user"
                         " AND state = 'queued')"),
        "owner_remove": (f"FOR DELETE TO {owner} USING (submitter = session_user"
                         " AND state IN ('queued', 'answered'))"),
    }
    for name, body in policies.items():
        out += [f"DROP POLICY IF EXISTS {name} ON {s}.requests",
                f"CREATE POLICY {name} ON {s}.requests {body}"]
    return out


def _role_exists(cur, role: str) -> bool:
    return cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() \
        is not None


def install(conn, names: Names, web_logins: tuple[str, ...] = (),
            worker_logins: tuple[str, ...] = (), max_request_bytes: int | None = None
            ) -> list[str]:
    """Create, repair or migrate the queue in the database of ``conn`` (an
    administrator's connection, not in a transaction); add the login roles
    to the group roles (creating them, LOGIN, when missing).  One line per
    change.  Also, in this database: ``max_request_bytes`` (the
    configuration's) kept in ``meta`` for ``submit``; the channels' secrets
    made once; CREATE on schema ``public`` taken from PUBLIC; CONNECT taken
    from PUBLIC when the database holds nothing but the queue (and given to
    the two group roles); ``ROLE_SETTINGS`` for every login of the groups
    that has none of its own here."""
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
        _keep_settings(cur, names, max_request_bytes, changes)
        cur.execute("RESET ROLE")
        _close_database(conn, names, changes)
    return changes


# what every login role of the two groups gets in the queue's database
# (ALTER ROLE ... IN DATABASE ... SET), unless it has a value of its own
# there: a session the transport opens never waits long for a lock nor idles
# in a transaction, and a role's forgotten transaction ends
ROLE_SETTINGS = (("lock_timeout", "10s"), ("idle_in_transaction_session_timeout", "1min"))


def _keep_settings(cur, names: Names, max_request_bytes: int | None,
                   changes: list[str]) -> None:
    """As the owner: the meta value ``submit`` reads, the channels' secrets."""
    s = sql_name(names.schema)
    if max_request_bytes is not None:
        old = cur.execute(f"SELECT value FROM {s}.meta WHERE key = 'max_request_bytes'"
                          ).fetchone()
        if old is None or old[0] != str(max_request_bytes):
            cur.execute(f"INSERT INTO {s}.meta (key, value) VALUES ('max_request_bytes', %s)"
                        " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        (str(max_request_bytes),))
            changes.append(f"max_request_bytes = {max_request_bytes} (refused at submit)")
    prefix = names.channel[:CHANNEL_PREFIX_MAX]
    made = cur.execute(
        f"INSERT INTO {s}.secrets (key, value) VALUES ('new', %s), ('events', %s),"
        " ('reply', %s), ('derive', %s) ON CONFLICT (key) DO NOTHING RETURNING key",
        (f"{prefix}_n_{secrets.token_hex(12)}", f"{prefix}_e_{secrets.token_hex(12)}",
         secrets.token_hex(16), secrets.token_hex(16))).fetchall()
    if made:
        changes.append(f"channel names made private ({len(made)} secret(s) in"
                       f" {names.schema}.secrets)")


def _close_database(conn, names: Names, changes: list[str]) -> None:
    """As the administrator, in the queue's database: no schema on a default
    search path that every role may create in, CONNECT for those who need
    it, the role settings.  A step this administrator may not take is said,
    not fatal (a savepoint each)."""
    cur = conn.cursor()
    db = cur.execute("SELECT current_database()").fetchone()[0]
    groups = (names.submit_role, names.worker_role)

    def step(statement: str, said: str) -> None:
        try:
            with conn.transaction():
                cur.execute(statement)
            changes.append(said)
        except Exception as exc:  # noqa: BLE001 - said, and init goes on
            changes.append(f"could not: {statement} ({str(exc).strip().splitlines()[0]})")

    public_create = cur.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace n, aclexplode(coalesce(n.nspacl,"
        " acldefault('n', n.nspowner))) a WHERE n.nspname = 'public' AND a.grantee = 0"
        " AND a.privilege_type = 'CREATE')").fetchone()[0]
    if public_create:
        step("REVOKE CREATE ON SCHEMA public FROM PUBLIC",
             f"revoked CREATE on schema public from PUBLIC in database {db} (a function any"
             " role plants on a search path runs as whoever calls it)")
    public_connect, shared = cur.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_database d, aclexplode(coalesce(d.datacl,"
        " acldefault('d', d.datdba))) a WHERE d.datname = current_database() AND"
        " a.grantee = 0 AND a.privilege_type = 'CONNECT'), EXISTS (SELECT 1 FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'v',"
        " 'm', 'f', 'S') AND n.nspname <> %s AND n.nspname <> 'information_schema' AND"
        " n.nspname !~ '^pg_')", (names.schema,)).fetchone()
    if not public_connect or not shared:
        # the group roles connect by their own grant (idempotent), PUBLIC's or not
        cur.execute(f"GRANT CONNECT ON DATABASE {sql_name(db)} TO"
                    f" {', '.join(sql_name(g) for g in groups)}")
    if public_connect and not shared:
        step(f"REVOKE CONNECT ON DATABASE {sql_name(db)} FROM PUBLIC",
             f"revoked CONNECT on database {db} from PUBLIC (granted to {', '.join(groups)})")
    logins = [r[0] for r in cur.execute(
        "SELECT DISTINCT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
        " JOIN pg_roles g ON g.oid = m.roleid WHERE g.rolname = ANY(%s) AND r.rolcanlogin"
        " AND NOT r.rolsuper ORDER BY 1", (list(groups),)).fetchall()]
    for login in logins:
        have = cur.execute(
            "SELECT coalesce(setconfig, '{}') FROM pg_db_role_setting s JOIN pg_roles r ON"
            " r.oid = s.setrole JOIN pg_database d ON d.oid = s.setdatabase WHERE r.rolname ="
            " %s AND d.datname = current_database()", (login,)).fetchone()
        names_set = {item.split("=", 1)[0] for item in (have[0] if have else [])}
        for name, value in ROLE_SETTINGS:
            if name not in names_set:
                step(f"ALTER ROLE {sql_name(login)} IN DATABASE {sql_name(db)} SET {name} ="
                     f" {_lit(value)}", f"set {name} = {value} for role {login} in database {db}")


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
        out += _path_checks(conn, me[0])
    return out


def _path_checks(conn, role: str) -> list[tuple[str, bool, str, str]]:
    """A schema on this role's default search path (the server's
    ``"$user", public`` or the role's and database's own settings) that a
    role other than its owner may create in: code planted there runs as
    whoever calls a function by its bare name -- the transport's sessions
    pin their own path, a role's other sessions (psql, the web
    application) do not.  And the settings init gives every login."""
    out: list[tuple[str, bool, str, str]] = []
    settings = [item for row in conn.execute(
        "SELECT s.setconfig FROM pg_db_role_setting s WHERE s.setrole IN (0, (SELECT oid FROM"
        " pg_roles WHERE rolname = session_user)) AND s.setdatabase IN (0, (SELECT oid FROM"
        " pg_database WHERE datname = current_database())) ORDER BY s.setrole DESC,"
        " s.setdatabase DESC").fetchall() for item in (row[0] or [])]
    path = next((item.split("=", 1)[1] for item in settings
                 if item.startswith("search_path=")), None)
    if path is None:
        path = conn.execute("SELECT boot_val FROM pg_settings WHERE name = 'search_path'"
                            ).fetchone()[0]
    schemas = {part.strip().strip('"').replace("$user", role) for part in path.split(",")}
    open_to = conn.execute(
        "SELECT n.nspname, string_agg(DISTINCT CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE"
        " pg_get_userbyid(a.grantee) END, ', ') FROM pg_namespace n,"
        " aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a WHERE n.nspname ="
        " ANY(%s) AND a.privilege_type = 'CREATE' AND a.grantee <> n.nspowner GROUP BY 1"
        " ORDER BY 1", (sorted(schemas),)).fetchall()
    mine = conn.execute("SHOW search_path").fetchone()[0]
    out.append(("search path", not open_to and mine.replace(" ", "") == "pg_catalog,pg_temp",
                f"the transport's sessions: {mine}; default path of {role} ({path}): "
                + ("; ".join(f"schema {name} may be created in by {who}"
                             for name, who in open_to) or "no schema others may create in"),
                "; ".join(f"REVOKE CREATE ON SCHEMA {sql_name(name)} FROM PUBLIC (and from"
                          f" {who})" for name, who in open_to) or
                "connect through spoolops (its sessions pin search_path)"))
    # (the role's own, as every session of it gets them: this one's are pinned)
    values = {name: next((item.split("=", 1)[1] for item in settings
                          if item.startswith(name + "=")), "0") for name, _ in ROLE_SETTINGS}
    unset = [name for name, value in values.items() if value in ("0", "0ms")]
    out.append(("timeouts", not unset,
                f"{role}: " + ", ".join(f"{name} = {value}" for name, value in values.items()),
                "run 'spoolops init --transport postgresql' again (ALTER ROLE ... IN DATABASE"
                " ... SET " + ", ".join(unset) + ")"))
    public_connect = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_database d, aclexplode(coalesce(d.datacl,"
        " acldefault('d', d.datdba))) a WHERE d.datname = current_database() AND"
        " a.grantee = 0 AND a.privilege_type = 'CONNECT')").fetchone()[0]
    out.append(("connect", True, "every role may connect to this database (it holds more"
                " than the queue: channel names are private, tables closed)" if public_connect
                else "only the group roles (and superusers) may connect to this database", ""))
    return out
