"""Workload ``pg``: spoolops over PostgreSQL against LISTEN/NOTIFY peers.

Two throwaway clusters, one after the other
(``spoolops.pgcluster.start_cluster``: unix socket; every system alike on
each): ``fsync = off`` (``start_cluster()``: also ``synchronous_commit =
off`` and ``full_page_writes = off`` server-wide, so no commit waits for a
flush) and ``fsync = on`` (``start_cluster(durable=True)``: PostgreSQL's
defaults, ``synchronous_commit = on``, ``full_page_writes = on``, as sites
run it).  The settings each cluster reports (``pg_settings``) go into the
JSON (``settings``).  On each, a database per system:

* spoolops: a queue set up as ``tests/support/env.py`` ``make_pg_env`` does
  (``pgtree``), its worker ``python -m spoolops worker`` (role ``wrk``),
  clients ``spoolops.Client(config=...)`` (role ``web1``) in client
  processes calling ``client.call("echo", ...)``;
* floor: a bare LISTEN/NOTIFY round trip in psycopg 3 (``pgpeers``): the
  least a LISTEN/NOTIFY queue can do;
* durable floor (``pgpeers``, psycopg 3): the least a durable queue with a
  reply path can do over LISTEN/NOTIFY: the client INSERTs the request row
  and NOTIFYs (one statement, one commit), the server UPDATEs the row with
  the reply and NOTIFYs the client (one statement, one commit), the client
  SELECTs the reply once;
* pgqueuer 1.6 (``pgpeers``): ``AsyncpgDriver`` worker, ``batch_size=1``,
  ``CompletionWatcher`` with ``debounce=timedelta(0)``.  pgqueuer stores no
  return values, so the glue is a reply table ``echo_reply (job_id bigint
  PRIMARY KEY, body bytea)``: the handler INSERTs the job's payload there,
  the client enqueues, waits on ``CompletionWatcher(...).wait_for(job_id)``
  (LISTEN/NOTIFY) and then SELECTs the reply row;
* a queue polled once a second (client and worker), as ``dbpoll`` but in
  PostgreSQL: a handful of calls only (~1 s each); ``fsync = off`` only.

Echo: for 1 and 8 client processes (made afresh per level), each system
answers ``n`` timed calls per client after a few untimed warm-up calls,
``reps`` times with the systems interleaved (the order rotates), so that a
burst of load from elsewhere hits all alike.  Per run: median round trip and
throughput (calls / wall time of the run); reported: medians over runs.
Each cluster's echo runs on its own (the other cluster is not running).
Rows of the ``fsync = off`` cluster keep the names they had before the
second cluster came (no fsync in the name, except the new durable floor
rows); every ``fsync = on`` row says so.

Backlog (``fsync = off`` cluster only): N echo requests are queued while no
worker runs (one ``web1`` connection, batched calls of the ``submit``
function with exactly the values ``Client.submit`` ->
``PgTransport.publish`` sends), then the worker starts;
the superuser counts queued + running rows every 0.2 s until none is left.
Drain rate = (answered - 1) / (last - first ``finished``, the server's
microsecond clock); peak RSS = the worker's ``VmHWM``.  Baseline: a backlog
of 100, drained by a fresh worker each time, median of several.  Replies
stay in the table (nobody collects them): each run's rows are truncated
after it, and the database is dropped at the end.

Trusts: the throwaway cluster it starts and the bench's temporary folder.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

from .common import ClientPool, median, spawn, stop
from .w_echo import _one_run, _summary

LEVELS = (1, 8)
SYSTEMS = ("spoolops", "floor", "durable floor", "pgqueuer")
CLUSTERS = (("off", False), ("on", True))     # fsync, start_cluster(durable=...)
SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "wal_sync_method",
            "shared_buffers", "server_version")
GLUE = ("pgqueuer stores no return values; glue: reply table echo_reply(job_id, body) the"
        " handler INSERTs into; client enqueues, waits CompletionWatcher(debounce=0)"
        ".wait_for(job_id) (LISTEN/NOTIFY), then SELECTs the reply row")
FLOOR_NOTE = "floor: bare LISTEN/NOTIFY round trip (psycopg 3)"
DFLOOR_NOTE = ("durable floor: INSERT+NOTIFY (1 commit), UPDATE+NOTIFY (1 commit), SELECT;"
               " psycopg 3")
BASELINES = {"floor": ("floor", FLOOR_NOTE), "durable floor": ("durable floor", DFLOOR_NOTE),
             "pgqueuer": ("pgqueuer+reply table", GLUE)}
BATCH = 5000


def _pgqueuer_missing() -> str | None:
    try:
        import asyncpg  # noqa: F401
        import pgqueuer  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} not installed: pip install pgqueuer asyncpg"
    return None


def _server(servers: list, kind: str, dsn: str) -> None:
    proc = spawn("pgpeers", kind, dsn)
    servers.append(proc)
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"pgpeers {kind} server did not start")


def _echo(targets: dict[str, tuple[str, str]], quick: bool, log: Any,
          tag: str) -> dict[str, Any]:
    reps, n, warmup = (3, 40, 5) if quick else (5, 150, 10)
    names = list(targets)
    raw: dict[str, dict[int, list]] = {s: {lv: [] for lv in LEVELS} for s in names}
    for level in LEVELS:
        pools: dict[str, ClientPool] = {}
        try:
            for name in names:
                pools[name] = ClientPool(*targets[name], level)
            for rep in range(reps):
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    raw[name][level].append(_one_run(pools[name], level, n, warmup))
        finally:
            for pool in pools.values():
                pool.close()
        log(f"pg: fsync {tag}: echo, {level} client(s) done: " + ", ".join(
            f"{name} {1e3 * median([r['median'] for r in raw[name][level]]):.2f} ms"
            for name in names))
    return {name: {str(lv): _summary(runs) for lv, runs in by.items()}
            for name, by in raw.items()}


# -- backlog ---------------------------------------------------------------------------

def _queue(sp: Any, count: int) -> float:
    """Queue ``count`` echo requests as ``web1``, exactly as ``Client.submit``
    would (the ``submit`` function a web role calls, with
    ``PgTransport.publish``'s values and adapters), in batches of calls in
    one transaction: faster than one round trip per request."""
    import psycopg
    from psycopg.types.json import Json

    from spoolops.formats import PROTOCOL_VERSION, new_request_id, utc_iso
    insert = (f'SELECT "{sp.schema}".submit(%s, %s::int, %s, %s::json, %s::int,'
              " %s::timestamptz, %s, %s::json, true, 5000, false)")
    client = {"pid": os.getpid(), "host": socket.gethostname()}
    start = time.perf_counter()
    with psycopg.connect(sp.cluster.dsn(sp.dbname, "web1"),
                         options="-c search_path=pg_catalog,pg_temp") as conn:
        for first in range(0, count, BATCH):
            rows = [(new_request_id(), PROTOCOL_VERSION, "echo", Json({"i": i}), 0, None,
                     utc_iso(), Json(client)) for i in range(first, min(count, first + BATCH))]
            with conn.cursor() as cur:
                cur.executemany(insert, rows)
            conn.commit()
    return time.perf_counter() - start


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _drain(sp: Any, count: int, limit_s: float) -> dict[str, Any]:
    """Start a worker on the queued backlog, wait until nothing is queued or
    running (or ``limit_s``), stop it; the figures, then the rows go."""
    import psycopg
    table = f'"{sp.schema}".requests'
    start = time.time()
    proc = sp.start_worker(wait=False)
    hwm_kb, left = 0, count
    try:
        with psycopg.connect(sp.cluster.dsn(sp.dbname, "postgres"), autocommit=True) as db:
            while True:
                hwm_kb = max(hwm_kb, _hwm_kb(proc.pid))
                left = db.execute(f"SELECT count(*) FROM {table} WHERE state IN ('queued',"
                                  " 'running')").fetchone()[0]
                if left == 0 or proc.poll() is not None or time.time() - start > limit_s:
                    break
                time.sleep(0.2)
            hwm_kb = max(hwm_kb, _hwm_kb(proc.pid))
            answered, failed, first, last = db.execute(
                f"SELECT count(*) FILTER (WHERE state = 'answered'), count(*) FILTER (WHERE"
                f" state = 'failed'), extract(epoch FROM min(finished))::float8, extract(epoch"
                f" FROM max(finished))::float8 FROM {table}").fetchone()
    finally:
        exit_code = proc.poll()
        sp.stop_worker()
    sp.sql(f"TRUNCATE {table} CASCADE")
    if answered < 2:
        raise RuntimeError(f"{answered} replies for {count} requests (worker exit {exit_code})")
    span = last - first
    return {"count": count, "answered": answered, "failed": failed, "complete": left == 0,
            "rate": (answered - 1) / span if span > 0 else float("nan"),
            "first_reply_s": first - start, "total_s": time.time() - start,
            "peak_rss_mb": hwm_kb / 1024, "worker_exit": exit_code}


def _backlog(sp: Any, quick: bool, log: Any) -> dict[str, Any]:
    big, reps, limit = (20_000, 3, 300) if quick else (100_000, 5, 1200)
    small = []
    for _ in range(reps):
        _queue(sp, 100)
        small.append(_drain(sp, 100, 60))
    log(f"pg: backlog 100: {median([r['rate'] for r in small]):.0f} replies/s")
    queue_s = _queue(sp, big)
    log(f"pg: queued {big:,} in {queue_s:.1f} s; draining")
    large = _drain(sp, big, limit)
    log(f"pg: backlog {big:,}: {large['rate']:.0f} replies/s, first reply"
        f" {large['first_reply_s']:.2f} s, peak RSS {large['peak_rss_mb']:.0f} MB")
    return {"big": big, "queue_s": queue_s, "queue_rate": big / queue_s, "large": large,
            "small": small, "small_rate": median([r["rate"] for r in small]),
            "small_first_reply_s": median([r["first_reply_s"] for r in small])}


# -- the workload ------------------------------------------------------------------------

def _start_pgqueuer(cluster: Any, servers: list) -> tuple[str, str]:
    from .pgpeers import install_pgqueuer
    cluster.psql('CREATE DATABASE "pgq"')
    dsn = cluster.dsn("pgq", "postgres")
    asyncio.run(install_pgqueuer(dsn))
    _server(servers, "pgqueuer", dsn)
    return "benchlib.pgpeers:PgqueuerCaller", dsn


def _settings(cluster: Any) -> dict[str, str]:
    names = ", ".join(f"'{n}'" for n in SETTINGS)
    text = cluster.psql("SELECT name || '=' || current_setting(name) FROM pg_settings"
                        f" WHERE name IN ({names}) ORDER BY name")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _key(name: str, tag: str) -> str:
    """Where one cluster's figures go: the names of before for fsync = off."""
    return name if tag == "off" else f"{name}_fsync_on"


def _on_cluster(cluster: Any, tag: str, base: Path, quick: bool, log: Any,
                out: dict[str, Any]) -> None:
    """Echo of every system (and, on fsync = off, polling and the backlog)."""
    from .pgtree import PgSpoolops
    servers: list = []
    queues: list[PgSpoolops] = []
    try:
        out["settings"][tag] = settings = _settings(cluster)
        log(f"pg: fsync {tag} cluster in {cluster.base}: " + ", ".join(
            f"{k} {v}" for k, v in settings.items()))
        sp = PgSpoolops(cluster, base / "echo", "sp_echo")
        queues.append(sp)
        sp.start_worker()
        cluster.psql('CREATE DATABASE "peers"')
        peers = cluster.dsn("peers", "postgres")
        # its own database: a NOTIFY signals the listeners of its database
        cluster.psql('CREATE DATABASE "dfloor"')
        dfloor = cluster.dsn("dfloor", "postgres")
        _server(servers, "floor", peers)
        _server(servers, "dfloor", dfloor)
        if tag == "off":
            _server(servers, "poll", peers)
        targets = {"spoolops": ("spoolops", str(sp.client_config)),
                   "floor": ("benchlib.pgpeers:PgFloorCaller", peers),
                   "durable floor": ("benchlib.pgpeers:PgDurableFloorCaller", dfloor)}
        pq_na = _key("pgqueuer_na", tag)
        out[pq_na] = out["pgqueuer_missing"]
        if out[pq_na] is None:
            try:
                targets["pgqueuer"] = _start_pgqueuer(cluster, servers)
            except Exception as exc:  # noqa: BLE001 - the other rows go on
                out[pq_na] = f"pgqueuer did not start: {type(exc).__name__}: {exc}"
        out[_key("echo", tag)] = _echo(targets, quick, log, tag)
        if tag != "off":
            return
        calls = 3 if quick else 5
        pool = ClientPool("benchlib.pgpeers:PgPollCaller", peers, 1)
        try:
            out["polling"] = _summary([_one_run(pool, 1, calls, 0)])
        finally:
            pool.close()
        log(f"pg: polling {out['polling']['median_ms']:.0f} ms")
        sp.close()
        queues.remove(sp)
        for proc in servers:
            stop(proc)
        servers.clear()
        try:
            bl = PgSpoolops(cluster, base / "backlog", "sp_backlog")
            queues.append(bl)
            out["backlog"] = _backlog(bl, quick, log)
        except Exception as exc:  # noqa: BLE001 - the echo rows stand
            traceback.print_exc()
            out["backlog_na"] = f"error: {type(exc).__name__}: {exc}"
    finally:
        for proc in servers:
            stop(proc)
        for q in queues:
            q.stop_worker()


def run(base: Path, quick: bool, log: Any) -> dict[str, Any]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return {"quick": quick, "na": "psycopg not installed"}
    from spoolops.pgcluster import PgUnavailable, start_cluster
    missing = _pgqueuer_missing()
    out: dict[str, Any] = {"quick": quick, "pgqueuer_missing": missing, "settings": {}}
    for tag, durable in CLUSTERS:
        try:
            cluster = start_cluster(durable=durable)
        except PgUnavailable as exc:
            if tag == "off":
                return {"quick": quick, "na": f"no PostgreSQL: {exc}"}
            out["fsync_on_na"] = f"no PostgreSQL: {exc}"
            continue
        try:
            _on_cluster(cluster, tag, base / f"fsync-{tag}", quick, log, out)
        except Exception as exc:
            if tag == "off":
                raise
            traceback.print_exc()       # the fsync = off rows stand
            out["fsync_on_na"] = f"error: {type(exc).__name__}: {exc}"
        finally:
            cluster.destroy()
    return out


def _na_rows(names: list[str], why: str) -> list[dict[str, Any]]:
    return [{"workload": name, "spoolops": f"n/a ({why})", "baseline": None, "ratio": None,
             "target": None, "note": "n/a"} for name in names]


def _specs(tag: str) -> list[tuple[str, str, str, str, str, tuple | None]]:
    """One cluster's echo rows: (name, baseline system, clients, figure, unit,
    target).  fsync = off rows that existed before keep their names."""
    on = tag == "on"
    old, new = (", fsync on" if on else ""), f", fsync {tag}"
    return [
        (f"PG echo median, 1 client{old}", "floor", "1", "median_ms", "ms",
         None if on else ("<=", 2.0)),
        (f"PG echo median, 8 clients{old}", "floor", "8", "median_ms", "ms", ("<=", 3.0)),
        (f"PG echo throughput, 8 clients{old} (vs floor)", "floor", "8", "throughput",
         "req/s", None),
        (f"PG echo median, 1 client{new} (vs durable floor)", "durable floor", "1",
         "median_ms", "ms", ("<=", 1.3) if on else None),
        (f"PG echo median, 8 clients{new} (vs durable floor)", "durable floor", "8",
         "median_ms", "ms", None),
        (f"PG echo throughput, 8 clients{new} (vs durable floor)", "durable floor", "8",
         "throughput", "req/s", None),
        (f"PG echo median, 1 client{old} (vs pgqueuer)", "pgqueuer", "1", "median_ms", "ms",
         ("<=", 1.0)),
        (f"PG echo median, 8 clients{old} (vs pgqueuer)", "pgqueuer", "8", "median_ms", "ms",
         ("<=", 1.0)),
        (f"PG echo throughput, 8 clients{old} (vs pgqueuer)", "pgqueuer", "8", "throughput",
         "req/s", (">=", 2.0)),
    ]


POLL_NAME = "PG echo median, 1 client (vs 1-second polling queue)"


def _names(big: int) -> list[str]:
    return [spec[0] for tag, _ in CLUSTERS for spec in _specs(tag)] + \
        [POLL_NAME, *_backlog_names(big)]


def _backlog_names(big: int) -> list[str]:
    return [f"PG drain rate, {big:,} queued vs 100 queued", f"PG worker peak RSS, {big:,} queued",
            f"PG time to first reply, {big:,} queued",
            f"PG queueing {big:,} (batched submit() as web1)"]


def _cluster_rows(res: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    specs = _specs(tag)
    echo = res.get(_key("echo", tag))
    if echo is None:
        return _na_rows([spec[0] for spec in specs], res.get("fsync_on_na") or "not run")
    out = []
    for name, system, level, key, unit, target in specs:
        if system not in echo:
            why = res.get(_key("pgqueuer_na", tag)) if system == "pgqueuer" else None
            out += _na_rows([name], why or f"{system} not run")
            continue
        base_name, note = BASELINES[system]
        out.append({"workload": name, "spoolops": echo["spoolops"][level][key],
                    "baseline": echo[system][level][key], "baseline_name": base_name,
                    "unit": unit, "target": target, "note": note, "cluster": f"fsync {tag}"})
    return out


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    big = res.get("backlog", {}).get("big", 20_000 if res.get("quick") else 100_000)
    if "na" in res:
        return _na_rows(_names(big), res["na"])
    out = [row for tag, _ in CLUSTERS for row in _cluster_rows(res, tag)]
    out.append({"workload": POLL_NAME,
                "spoolops": res["echo"]["spoolops"]["1"]["median_ms"],
                "baseline": res["polling"]["median_ms"], "baseline_name": "1-s polling",
                "unit": "ms", "target": None, "cluster": "fsync off",
                "note": f"{res['polling']['runs'][0]['calls']} polling calls"})
    if "backlog" not in res:
        return out + _na_rows(_backlog_names(big), res.get("backlog_na") or "not run")
    bl, lg = res["backlog"], res["backlog"]["large"]
    note = "-" if lg["complete"] else \
        f"stopped: {lg['answered']:,} of {big:,} in {lg['total_s']:.0f} s"
    out += [
        {"workload": f"PG drain rate, {big:,} queued vs 100 queued", "spoolops": lg["rate"],
         "baseline": bl["small_rate"], "baseline_name": "100 queued", "unit": "req/s",
         "ratio": bl["small_rate"] / lg["rate"] if lg["rate"] else None,
         "target": ("<=", 1.3), "note": note + " (ratio = 100-rate / big-rate)"},
        {"workload": f"PG worker peak RSS, {big:,} queued", "spoolops": lg["peak_rss_mb"],
         "baseline": 150.0, "baseline_name": "limit", "unit": "MB", "target": ("<=", 1.0)},
        {"workload": f"PG time to first reply, {big:,} queued",
         "spoolops": lg["first_reply_s"], "baseline": bl["small_first_reply_s"],
         "baseline_name": "100 queued", "unit": "s", "target": None,
         "note": "from the worker's launch"},
        {"workload": f"PG queueing {big:,} (batched submit() as web1)",
         "spoolops": bl["queue_rate"], "baseline": None, "unit": "req/s", "target": None},
    ]
    return out
