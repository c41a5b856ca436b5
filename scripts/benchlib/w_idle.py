"""Workload 7: what an idle worker costs, right after a burst.

A caller runs 300 echo round trips back to back (the worker then polls
briefly before sleeping, see ``worker.POLL_BEFORE_SLEEP_S``), then stops;
the worker's CPU time over the next 2 s of idleness is its cost at rest
(only the periodic counter save should run).  Then 20 round trips 50 ms
apart: spaced-out requests must never make it poll.  Figures: CPU seconds
per second idle, and CPU milliseconds per spaced-out request.

Trusts: the bench's temporary folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .tree import SpoolopsTree


def _cpu_seconds(pid: int) -> float:
    import os
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(base: Path, quick: bool, log: Any) -> dict[str, Any]:
    from spoolops import Client
    tree = SpoolopsTree(base / "tree", durable=True)
    try:
        worker = tree.start_worker()
        client = Client(config=tree.config_path)
        for i in range(300):
            client.call("echo", {"i": i}, timeout=30)
        time.sleep(0.3)                       # the stats save after the burst
        before = _cpu_seconds(worker.pid)
        time.sleep(2.0)
        idle = (_cpu_seconds(worker.pid) - before) / 2.0
        before = _cpu_seconds(worker.pid)
        for i in range(20):
            client.call("echo", {"i": i}, timeout=30)
            time.sleep(0.05)
        spaced = (_cpu_seconds(worker.pid) - before) / 20
    finally:
        tree.stop_worker()
    log(f"idle: {idle:.4f} CPU s per s, {spaced * 1e3:.2f} CPU ms per spaced request")
    return {"idle_cpu_per_s": idle, "spaced_cpu_ms": spaced * 1e3}


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"workload": "7 idle worker after a burst, CPU s per s", "spoolops":
             res["idle_cpu_per_s"], "baseline": 0.05, "baseline_name": "limit",
             "unit": "s", "target": ("<=", 1.0)},
            {"workload": "7 echo 50 ms apart, worker CPU ms per request", "spoolops":
             res["spaced_cpu_ms"], "baseline": 10.0, "baseline_name": "limit",
             "unit": "ms", "target": ("<=", 1.0)}]
