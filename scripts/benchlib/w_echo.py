"""Workload 1: ``echo`` round trips against floor, old-http and db-poll.

For 1, 2, 4 and 8 concurrent client processes (made afresh for each level:
no idle client of another level is around to be woken by replies), each
system answers ``n`` timed calls per client (after a few untimed warm-up
calls), repeated ``reps`` times with the systems interleaved, so that a burst
of load from elsewhere on a shared machine hits every system alike.  Per run: median and
p99 of all round trips, and throughput = calls / wall time of the run.
Reported: the median over runs of each.

Trusts: the systems it is handed.
"""

from __future__ import annotations

from typing import Any

from .common import ClientPool, median, percentile
from .systems import Systems

LEVELS = (1, 2, 4, 8)
FAST = ("spoolops/off", "floor/off", "spoolops/on", "floor/on", "old-http")


def _one_run(pool: ClientPool, level: int, n: int, warmup: int) -> dict[str, Any]:
    outs = pool.run(level, {"cmd": "echo", "n": n, "warmup": warmup, "pad": 64})
    lat = [x for out in outs for x in out["lat"]]
    span = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    return {"median": median(lat), "p99": percentile(lat, 99), "calls": len(lat),
            "throughput": len(lat) / span if span > 0 else float("nan"),
            "errors": sum(o["errors"] for o in outs)}


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"median_ms": 1e3 * median([r["median"] for r in runs]),
            "p99_ms": 1e3 * median([r["p99"] for r in runs]),
            "throughput": median([r["throughput"] for r in runs]),
            "errors": sum(r["errors"] for r in runs), "runs": runs}


def run(systems: Systems, quick: bool, log: Any) -> dict[str, Any]:
    reps, n, warmup = (3, 40, 5) if quick else (5, 150, 10)
    raw: dict[str, dict[int, list]] = {s: {lv: [] for lv in LEVELS} for s in FAST}
    for level in LEVELS:
        pools = {name: systems.make_pool(name, level) for name in FAST}
        try:
            for rep in range(reps):
                for name in FAST[rep % len(FAST):] + FAST[:rep % len(FAST)]:
                    raw[name][level].append(_one_run(pools[name], level, n, warmup))
        finally:
            for pool in pools.values():
                pool.close()
        log(f"echo: {level} client(s) done")
    out = {name: {str(lv): _summary(runs) for lv, runs in by.items()}
           for name, by in raw.items()}
    if "db-poll" in systems.targets:
        levels, calls = ((1, 8), 3) if quick else (LEVELS, 5)
        out["db-poll"] = {}
        for level in levels:
            pool = systems.make_pool("db-poll", level)
            try:
                out["db-poll"][str(level)] = _summary([_one_run(pool, level, calls, 0)])
            finally:
                pool.close()
        log("echo: db-poll done")
    return out


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for tag in ("off", "on"):
        for level in ("1", "8"):
            sp, fl = res[f"spoolops/{tag}"][level], res[f"floor/{tag}"][level]
            out.append({"workload": f"1 echo median, {level} client(s), durable {tag}",
                        "spoolops": sp["median_ms"], "baseline": fl["median_ms"],
                        "baseline_name": f"floor/{tag}", "unit": "ms",
                        "target": ("<=", 1.3)})
    for tag in ("off", "on"):
        sp, http = res[f"spoolops/{tag}"]["8"], res["old-http"]["8"]
        out.append({"workload": f"1 echo throughput, 8 clients, durable {tag}",
                    "spoolops": sp["throughput"], "baseline": http["throughput"],
                    "baseline_name": "old-http", "unit": "req/s", "target": (">=", 1.0)})
    if "db-poll" in res:
        out.append({"workload": "1 echo median, 1 client (vs db-poll)",
                    "spoolops": res["spoolops/on"]["1"]["median_ms"],
                    "baseline": res["db-poll"]["1"]["median_ms"], "baseline_name": "db-poll",
                    "unit": "ms", "target": None})
    return out
