"""Installing the PostgreSQL queue in a database, and checking it: roles,
schema, migrations, functions and grants (``spoolops init``), the settings
every login role gets, and what ``doctor`` asks of an installed queue.

Trusts: the administrator's connection it is given (a superuser, or a role
with CREATEROLE that owns the database); ``check`` only reads.
"""

from __future__ import annotations

import secrets

from ...errors import SpoolSetupError
from . import functions
from .schema import (
    CHANNEL_PREFIX_MAX,
    MIGRATIONS,
    SCHEMA_VERSION,
    Names,
    sql_literal,
    sql_name,
)


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
        if version is not None and version < SCHEMA_VERSION:
            # a worker of the version before, still running, would serve the
            # new schema by its old rules (schema 7: it took every notice's
            # row for an id, and answered only at its rescans): fenced, it
            # stops at its next heartbeat, and a worker of this version --
            # the only kind that can start now -- takes its requests over
            fenced = cur.execute(
                f"UPDATE {sql_name(names.schema)}.workers SET fenced_at = clock_timestamp()"
                " WHERE fenced_at IS NULL").rowcount
            if fenced:
                changes.append(f"fenced {fenced} worker(s) of an older spoolops (each stops"
                               " at its next heartbeat; start this version's)")
        if version != SCHEMA_VERSION:
            cur.execute(f"INSERT INTO {sql_name(names.schema)}.meta (key, value) VALUES"
                        " ('schema_version', %s), ('channel', %s) ON CONFLICT (key) DO"
                        " UPDATE SET value = EXCLUDED.value",
                        (str(SCHEMA_VERSION), names.channel))
        for statement in functions.definitions(names) + functions.grants(names):
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
                     f" {sql_literal(value)}", f"set {name} = {value} for role {login} in database {db}")


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
