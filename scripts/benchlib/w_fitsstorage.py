"""Workload 9: what FitsStorage's code asks of spoolops beyond a round trip.

- ``pending_batches()`` and ``queue_length()`` with 10,000 requests queued
  (100 batches) and no worker: their reducer's ``after_batch`` gate asks on
  every poll.  Median of repeated calls in this process, against the floor
  of one ``os.listdir`` of a folder of as many names (the spool) or of a
  ``SELECT 1`` round trip (PostgreSQL, after ``VACUUM ANALYZE``).
- ``"reply": false`` (their callers' ``response_required=False``) against a
  normal echo: a backlog of N echo requests of each kind, queued with the
  worker stopped, then drained by ``spoolops worker --once``; the drain rate
  from the worker's launch to its exit (both include Python start-up), on a
  tree as ``spoolops init`` writes it (``durable = yes``).  Run twice each,
  interleaved; medians.

Trusts: the bench's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spoolops import Client

from .common import child_env, median
from .tree import SpoolopsTree

QUEUED = 10_000
BATCHES = 100


def _calls(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def _gate(base: Path, quick: bool, log: Any) -> dict[str, Any]:
    tree = SpoolopsTree(base / "gate", durable=False)
    client = Client(config=tree.config)
    for n in range(QUEUED):
        client.submit("echo", {"batch": f"night-{n % BATCHES}"}, reply=False)
    log(f"fitsstorage: {QUEUED:,} queued")
    assert len(client.pending_batches()) == BATCHES and client.queue_length() == QUEUED
    floor_dir = base / "floor"
    floor_dir.mkdir()
    for n in range(QUEUED):
        (floor_dir / f"{n:016x}").touch()
    repeat = 10 if quick else 30
    return {"queued": QUEUED, "batches": BATCHES,
            "pending_batches_ms": _calls(client.pending_batches, repeat) * 1e3,
            "queue_length_ms": _calls(client.queue_length, repeat) * 1e3,
            "listdir_ms": _calls(lambda: os.listdir(floor_dir), repeat) * 1e3}


def _gate_pg(base: Path, quick: bool, log: Any) -> dict[str, Any]:
    """The same over PostgreSQL: 10,000 queued by a web role, asked by it."""
    try:
        import psycopg  # noqa: F401

        from spoolops.pgcluster import PgUnavailable, start_cluster
    except ImportError:
        return {"na": "psycopg not installed"}
    try:
        cluster = start_cluster()
    except PgUnavailable as exc:
        return {"na": f"no PostgreSQL: {exc}"}
    from spoolops.config import load_config

    from .pgtree import PgSpoolops
    try:
        sp = PgSpoolops(cluster, base / "pg-gate", "sp_gate")
        client = Client(config=load_config(sp.client_config))
        for n in range(QUEUED):
            client.submit("echo", {"batch": f"night-{n % BATCHES}"}, reply=False)
        log(f"fitsstorage: {QUEUED:,} queued over PostgreSQL")
        assert len(client.pending_batches()) == BATCHES and client.queue_length() == QUEUED
        sp.sql("VACUUM ANALYZE")
        repeat = 10 if quick else 30
        return {"pending_batches_ms": _calls(client.pending_batches, repeat) * 1e3,
                "queue_length_ms": _calls(client.queue_length, repeat) * 1e3,
                # one round trip on the client's own pooled connection
                "floor_ms": _calls(lambda: client.transport.pools.run(
                    lambda c: c.execute("SELECT 1").fetchone()), repeat) * 1e3}
    except Exception as exc:  # noqa: BLE001 - the spool's rows stand
        return {"na": f"error: {type(exc).__name__}: {exc}"}
    finally:
        cluster.destroy()


def _drain(tree: SpoolopsTree, count: int, reply: bool) -> float:
    client = Client(config=tree.config)
    for _ in range(count):
        client.submit("echo", {"x": 1}, reply=reply)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spoolops", "worker", "--once", "--config",
                    str(tree.config_path)], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, env=child_env())
    elapsed = time.perf_counter() - start
    if reply:
        for path in (tree.root / "replies").iterdir():
            path.unlink()
    return count / elapsed


def run(base: Path, quick: bool, log: Any) -> dict[str, Any]:
    res = _gate(base, quick, log)
    res["pg"] = _gate_pg(base, quick, log)
    count = 1000 if quick else 5000
    tree = SpoolopsTree(base / "drain", durable=True)
    rates: dict[str, list[float]] = {"reply": [], "no_reply": []}
    for _ in range(2):
        rates["reply"].append(_drain(tree, count, reply=True))
        rates["no_reply"].append(_drain(tree, count, reply=False))
    log("fitsstorage: drains done")
    res.update(drained=count, reply_rate=median(rates["reply"]),
               no_reply_rate=median(rates["no_reply"]), rates=rates)
    return res


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    queued = f"{res['queued']:,} queued"
    return [
        {"workload": f"9 pending_batches(), {queued}", "spoolops": res["pending_batches_ms"],
         "baseline": res["listdir_ms"], "baseline_name": "listdir floor", "unit": "ms",
         "ratio": res["pending_batches_ms"] / res["listdir_ms"], "target": None},
        {"workload": f"9 queue_length(), {queued}", "spoolops": res["queue_length_ms"],
         "baseline": res["listdir_ms"], "baseline_name": "listdir floor", "unit": "ms",
         "ratio": res["queue_length_ms"] / res["listdir_ms"], "target": None},
        *_pg_rows(res.get("pg", {}), queued),
        {"workload": f"9 drain {res['drained']:,} echo, reply: false (durable)",
         "spoolops": res["no_reply_rate"], "baseline": res["reply_rate"],
         "baseline_name": "with reply", "unit": "req/s",
         "ratio": res["no_reply_rate"] / res["reply_rate"], "target": None},
    ]


def _pg_rows(pg: dict[str, Any], queued: str) -> list[dict[str, Any]]:
    if "na" in pg or not pg:
        return [{"workload": "9 PG pending_batches()", "spoolops": f"n/a ({pg.get('na')})",
                 "baseline": None, "ratio": None, "target": None}]
    return [
        {"workload": f"9 PG pending_batches(), {queued}", "spoolops": pg["pending_batches_ms"],
         "baseline": pg["floor_ms"], "baseline_name": "SELECT 1", "unit": "ms",
         "target": None},
        {"workload": f"9 PG queue_length(), {queued}", "spoolops": pg["queue_length_ms"],
         "baseline": pg["floor_ms"], "baseline_name": "SELECT 1", "unit": "ms",
         "target": None},
    ]
