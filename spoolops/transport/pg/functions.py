"""The PostgreSQL queue's functions, triggers, view and privileges: the SQL
``install`` makes afresh on every run (idempotent), for a schema ``Names``
describes.

``definitions``: the definer functions web roles act through (submit,
cancel, collect, progress_of, listen, pending_batches, queue_length; the
caller taken from ``session_user``, ``search_path`` pinned), the worker's
``claim_batch``, the triggers that set identity and send notifications, the
view ``my_requests``.  ``grants``: who may use what, and the row-level
security policies kept as a second wall.

Trusts: nothing; it writes SQL text.  Every name in it comes from ``Names``
(checked identifiers) or ``sql_literal``.
"""

from __future__ import annotations

from .schema import (
    CHANNEL_PREFIX_MAX,
    ENVELOPE_BYTES,
    REPLY_TO_RE,
    VIEW_COLUMNS,
    WEB_FUNCTIONS,
    Names,
    hint_sql,
    sql_literal,
    sql_name,
)


def definitions(n: Names) -> list[str]:
    """Functions, triggers, the web roles' view: re-made by every install
    (idempotent).

    Channels: the names of ``<channel>_new`` and ``<channel>_events`` carry
    a random part kept in ``secrets`` (the owner's and the worker role's
    only), and a submitter's reply channel is ``<channel>_r_`` and the md5
    of another random part and its role -- or, for a request its client
    process published while waiting for it (``reply_to``), that process's
    own, ``<channel>_p_`` and the md5 of the random part, the role and the
    process's random part, so that a reply wakes only its waiter's process:
    any role may LISTEN on any channel, so a channel's name is what keeps it
    private, and a role can name only its own.  Payloads are ids (and on
    the events channel a few bounded words: the event, ok, the error type),
    never an op, a path or a message -- ``tail`` reads those from the table
    -- but on ``<channel>_new``, whose listeners are the workers: a queued
    row's notice carries the row when it is small (``schema.hint_sql``), so
    that a worker need not read it again.

    Web roles hold no privilege on any table: they act through the definer
    functions below (owned by the owner, ``search_path`` pinned, the caller
    taken from ``session_user``), which is all they can lock or read."""
    s, wrk = sql_name(n.schema), n.worker_role
    reply_prefix = sql_literal(n.channel[:CHANNEL_PREFIX_MAX] + "_r_")
    process_prefix = sql_literal(n.channel[:CHANNEL_PREFIX_MAX] + "_p_")

    def secret(key: str) -> str:    # the value of a secret (``key``: an expression)
        return f"(SELECT x.value FROM {s}.secrets x WHERE x.key = {key})"
    new, events = secret("'new'"), secret("'events'")

    # the channel of a submitter's replies (``who``: an expression), or of
    # one of its processes (``process``: an expression, its random part --
    # hex digits, so that who and process split at the last '/').  The
    # secret comes first in a role's digest and last in a process's: a role
    # named '<role>/<process>' must not share a digest with that process
    def reply_to(who: str, process: str | None = None) -> str:
        role = (f"(SELECT {reply_prefix} || md5(x.value || {who}) FROM {s}.secrets x"
                " WHERE x.key = 'reply')")
        if process is None:
            return role
        return (f"(CASE WHEN {process} IS NULL THEN {role} ELSE (SELECT {process_prefix} ||"
                f" md5({who} || '/' || {process} || '/' || x.value) FROM {s}.secrets x"
                " WHERE x.key = 'reply') END)")

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
        # its own: a fresh snapshot).  Its commit is not waited for on disk:
        # a claim lost with the server is a request queued again, and one
        # that could do harm run twice never runs before a durable commit
        # of its own -- its run record (``start``) for every op but the
        # instant idempotent ones (echo), which may run again
        f"""CREATE OR REPLACE FUNCTION {s}.claim_batch(p_me int, p_ids text[])
                RETURNS SETOF {s}.requests
            LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
            BEGIN
                PERFORM set_config('synchronous_commit', 'off', true);
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
        # (their argument lists before version 6: a CREATE OR REPLACE with
        # another list would add a second function beside each)
        (f"DROP FUNCTION IF EXISTS {s}.submit(text, int, text, json, int, timestamptz, text,"
         " json, boolean, int, boolean)"),
        (f"DROP FUNCTION IF EXISTS {s}.submit_taken(text, int, text, json, int, timestamptz,"
         " text, json, boolean, boolean)"),
        f"""CREATE OR REPLACE FUNCTION {s}.submit(p_id text, p_version int, p_op text,
                p_args json, p_priority int, p_deadline timestamptz, p_client_submitted text,
                p_client json, p_answer_wanted boolean DEFAULT true,
                p_wait_ms int DEFAULT 5000, p_retry boolean DEFAULT false,
                p_reply_to text DEFAULT NULL) RETURNS text
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
                            client_submitted, client, answer_wanted, reply_to)
                        VALUES (p_id, p_version, p_op, p_args, coalesce(p_priority, 0),
                            p_deadline, p_client_submitted, p_client,
                            coalesce(p_answer_wanted, true), p_reply_to)
                        ON CONFLICT (id) DO NOTHING;
                    IF FOUND THEN
                        RETURN 'queued';
                    END IF;
                END IF;
                RETURN {s}.submit_taken(p_id, p_version, p_op, p_args, p_priority,
                    p_deadline, p_client_submitted, p_client, p_answer_wanted, p_retry,
                    p_reply_to);
            END $$""",
        # the rest of submit: the id taken (by the caller, or by another role:
        # then under the derived id), or a repeated submit.  Called by submit
        # only (no EXECUTE for any role: it runs as the owner, submit's caller)
        f"""CREATE OR REPLACE FUNCTION {s}.submit_taken(p_id text, p_version int, p_op text,
                p_args json, p_priority int, p_deadline timestamptz, p_client_submitted text,
                p_client json, p_answer_wanted boolean, p_retry boolean, p_reply_to text)
                RETURNS text
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
                            client_submitted, client, answer_wanted, client_id, reply_to)
                        VALUES (rid, p_version, p_op, p_args, coalesce(p_priority, 0),
                            p_deadline, p_client_submitted, p_client,
                            coalesce(p_answer_wanted, true),
                            CASE WHEN rid = p_id THEN NULL ELSE p_id END, p_reply_to)
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
        # replies' ('reply'; p_process: those of one of its processes, whose
        # random part the process chose); new requests' and events ('new',
        # 'events') for the worker role and superusers only
        f"DROP FUNCTION IF EXISTS {s}.listen(text)",
        f"""CREATE OR REPLACE FUNCTION {s}.listen(kind text, p_process text DEFAULT NULL)
                RETURNS void
            LANGUAGE plpgsql VOLATILE {definer} AS $$
            DECLARE
                channel text;
            BEGIN
                IF p_process IS NOT NULL AND (kind <> 'reply' OR p_process !~ '{REPLY_TO_RE}')
                        THEN
                    RAISE EXCEPTION 'no channel % of a process %', kind, p_process
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
                IF kind = 'reply' THEN
                    channel := {reply_to('session_user', 'p_process')};
                ELSIF kind IN ('new', 'events') THEN
                    IF NOT (pg_has_role(session_user, {sql_literal(wrk)}, 'USAGE') OR EXISTS (
                            SELECT 1 FROM pg_roles WHERE rolname = session_user
                            AND rolsuper)) THEN
                        RAISE EXCEPTION 'only members of % may listen to the queue''s %',
                            {sql_literal(wrk)}, kind USING ERRCODE = 'insufficient_privilege';
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
            SELECT coalesce(r.client_id, r.id) AS id, {VIEW_COLUMNS}
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
                    PERFORM pg_notify({new}, {hint_sql('NEW')});
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
                    PERFORM pg_notify({new}, {hint_sql('NEW')});
                    PERFORM pg_notify({events}, json_build_object('event', 'queued',
                        'id', NEW.id, 'note', 'back in line from ' || OLD.state)::text);
                ELSIF NEW.state = 'running' AND NEW.run IS NOT NULL AND OLD.run IS NULL THEN
                    PERFORM pg_notify({events}, json_build_object('event', 'started',
                        'id', NEW.id)::text);
                ELSIF NEW.reply IS NOT NULL AND OLD.reply IS NULL THEN
                    PERFORM pg_notify({reply_to('NEW.submitter', 'NEW.reply_to')},
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


def grants(n: Names) -> list[str]:
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
        (f"GRANT EXECUTE ON FUNCTION {s}.listen(text, text), {s}.pending_batches(),"
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
