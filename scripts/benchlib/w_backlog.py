"""Workload 5: a backlog queued while the worker is stopped, then drained.

Two client processes queue N echo requests with ``Client.submit``; then
``spoolops worker --once`` starts, drains and exits.  From the reply files'
mtimes: time to first reply (from the worker's launch, Python start-up
included).  From the replies' ``finished_at`` (milliseconds; ext4 mtimes move
in 4 ms steps here, too coarse for the 100 replies of ~15 ms below): the
drain rate with N queued (replies 1 to 1,000) and with at most 100 queued
(the last 100 replies of the same run: same warm process, so the comparison
is of queue depth alone).  A separate cold run of 100 gives
the time to first reply of a small backlog.  Peak RSS is the worker's
``VmHWM`` from ``/proc/PID/status``, read every 20 ms until it exits (not
``wait4``'s ``ru_maxrss``: Linux carries the high-water mark of the forking
parent's image across ``execve``, so it would report the bench's own size).
The tree uses ``durable = no``: fsync costs the same per request at any queue
depth, so it would only slow the bench down, not change the ratio.

Trusts: the bench's temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spoolops.formats import parse_iso

from .common import child_env, median, spawn
from .tree import SpoolopsTree

WINDOW = 1000


def _queue(tree: SpoolopsTree, count: int) -> float:
    start = time.perf_counter()
    halves = [count // 2, count - count // 2]
    procs = [spawn("submitter", str(tree.config_path), str(n)) for n in halves if n]
    for proc in procs:
        proc.communicate()
        if proc.returncode:
            raise RuntimeError("submitter failed")
    return time.perf_counter() - start


def _drain(tree: SpoolopsTree, count: int, limit_s: float) -> dict[str, Any]:
    """Run ``worker --once`` on the queued backlog; stopped after ``limit_s``
    (then the figures cover the replies so far and ``complete`` is False)."""
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "spoolops", "worker", "--once",
                             "--config", str(tree.config_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=child_env())
    hwm_kb = 0
    status = Path(f"/proc/{proc.pid}/status")
    while True:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm_kb = max(hwm_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        try:
            proc.wait(0.02)
            break
        except subprocess.TimeoutExpired:
            if time.time() - start > limit_s:
                proc.terminate()   # finishes what runs, leaves the rest queued
                proc.wait(120)
                break
    end = time.time()
    with os.scandir(tree.root / "replies") as it:
        by_mtime = sorted((e.stat().st_mtime_ns, e.path) for e in it)
    done = len(by_mtime)
    if done < 2:
        raise RuntimeError(f"{done} replies for {count} requests in {end - start:.0f} s")
    times = [t / 1e9 for t, _ in by_mtime]
    # a margin of replies beyond each window: mtimes tie within 4 ms
    head = _finished(by_mtime[:WINDOW + 200])[:min(WINDOW, done)]
    tail_ts = _finished(by_mtime[-300:])[-min(100, done):]
    w = len(head) - 1
    span = head[-1] - head[0]
    tail = tail_ts[-1] - tail_ts[0] if done == count else 0.0
    return {"first_reply_s": times[0] - start, "total_s": end - start, "replied": done,
            "complete": done == count, "rate": w / span if span > 0 else float("nan"),
            "tail_rate": (len(tail_ts) - 1) / tail if tail > 0 else float("nan"),
            "peak_rss_mb": hwm_kb / 1024, "exit": proc.returncode}


def _finished(entries: list[tuple[int, str]]) -> list[float]:
    """Sorted ``finished_at`` of the reply files in ``entries``."""
    out = []
    for _, path in entries:
        with open(path, "rb") as f:
            out.append(parse_iso(json.loads(f.read())["finished_at"]))
    return sorted(out)


def _clear(tree: SpoolopsTree) -> None:
    for name in ("new", "replies"):
        shutil.rmtree(tree.root / name)
        (tree.root / name).mkdir()
        os.chmod(tree.root / name, 0o2770 if name == "replies" else 0o2730)


def run(base: Path, quick: bool, log: Any) -> dict[str, Any]:
    big = 10_000 if quick else 100_000
    tree = SpoolopsTree(base / "tree", durable=False)
    small = []
    for _ in range(3):
        _queue(tree, 100)
        small.append(_drain(tree, 100, 60))
        _clear(tree)
    log(f"backlog 100: first reply {median([r['first_reply_s'] for r in small]):.2f} s")
    queue_s = _queue(tree, big)
    log(f"backlog: queued {big} in {queue_s:.1f} s; draining")
    large = _drain(tree, big, 90 if quick else 900)
    _clear(tree)
    log(f"backlog {big}: first reply {large['first_reply_s']:.2f} s, {large['rate']:.0f}"
        f" replies/s at {big}, {large['tail_rate']:.0f} at <= 100,"
        f" peak RSS {large['peak_rss_mb']:.0f} MB")
    return {"big": big, "queue_s": queue_s, "queue_rate": big / queue_s, "large": large,
            "small": small, "small_first_reply_s": median([r["first_reply_s"] for r in small])}


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    big, lg = res["big"], res["large"]
    rates = (lg["tail_rate"], lg["rate"])
    note = "-" if lg["complete"] else \
        f"stopped: {lg['replied']:,} of {big:,} in {lg['total_s']:.0f} s"
    return [
        {"workload": f"5 drain rate at {big:,} vs <= 100 queued", "spoolops": lg["rate"],
         "baseline": lg["tail_rate"], "baseline_name": "at <= 100", "unit": "req/s",
         "ratio": max(rates) / min(rates), "target": ("<=", 1.3), "note": note},
        {"workload": f"5 time to first reply, {big:,} queued", "spoolops": lg["first_reply_s"],
         "baseline": res["small_first_reply_s"], "baseline_name": "100 queued", "unit": "s",
         "target": None},
        {"workload": f"5 worker peak RSS, {big:,} queued", "spoolops": lg["peak_rss_mb"],
         "baseline": 150.0, "baseline_name": "limit", "unit": "MB", "target": ("<=", 1.0)},
        {"workload": f"5 queueing {big:,} (2 submitters)", "spoolops": res["queue_rate"],
         "baseline": None, "unit": "req/s", "target": None},
    ]
