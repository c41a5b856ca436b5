"""Workload 6: the janitor over a spool holding N stale replies.

N reply files, two hours old, with ``reply_ttl = 1h``; ``spoolops janitor
--json`` (the command cron runs, Python start-up included) must remove them
all.  Baseline: ``find replies -type f -mmin +60 -delete`` on the same
files.  Figure: seconds per 10,000 files.

Trusts: the bench's temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import child_env
from .tree import SpoolopsTree

_DIRECT = ("import argparse, sys; from spoolops.cli import janitor;"
           " p = argparse.ArgumentParser(); p.add_argument('--config');"
           " p.add_argument('--root'); janitor.add_arguments(p);"
           " sys.exit(janitor.run(p.parse_args()))")


def _fill(replies: Path, count: int) -> None:
    old = time.time() - 7200
    body = b'{"version": 1, "id": "x", "ok": true, "result": {}}\n'
    for i in range(count):
        name = f"20261128T000000.{i:06d}Z-1-{i:08x}.json"
        fd = os.open(replies / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, body)
        os.close(fd)
        os.utime(replies / name, (old, old))


def _left(replies: Path) -> int:
    return len(os.listdir(replies))


def run(base: Path, quick: bool, log: Any) -> dict[str, Any]:
    count = 10_000 if quick else 100_000
    tree = SpoolopsTree(base / "tree", durable=True, extra="[janitor]\nreply_ttl = 1h\n")
    cmd = [sys.executable, "-m", "spoolops", "--config", str(tree.config_path), "janitor"]
    probe = subprocess.run([*cmd, "--help"], check=False, capture_output=True, text=True,
                           env=child_env())
    if probe.returncode != 0:
        # not wired into 'spoolops' yet: the subcommand module's own run()
        cmd = [sys.executable, "-c", _DIRECT, "--config", str(tree.config_path)]
        probe = subprocess.run([*cmd, "--help"], check=False, capture_output=True,
                               text=True, env=child_env())
        if probe.returncode != 0:
            return {"available": False, "why": "spoolops janitor not available"}
    replies = tree.root / "replies"
    _fill(replies, count)
    start = time.perf_counter()
    out = subprocess.run([*cmd, "--json"], check=False,
                         capture_output=True, text=True, env=child_env())
    sp = time.perf_counter() - start
    if out.returncode not in (0, 1) or _left(replies):
        raise RuntimeError(f"janitor exit {out.returncode}, {_left(replies)} replies left:"
                           f" {out.stderr[-300:]}")
    _fill(replies, count)
    start = time.perf_counter()
    subprocess.run(["find", str(replies), "-type", "f", "-mmin", "+60", "-delete"], check=True)
    fd = time.perf_counter() - start
    log(f"janitor: {sp:.2f} s, find: {fd:.2f} s for {count} files")
    return {"available": True, "count": count, "janitor_s": sp, "find_s": fd,
            "janitor_per_10k": sp * 10_000 / count, "find_per_10k": fd * 10_000 / count}


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    if not res.get("available"):
        return [{"workload": "6 janitor, stale replies", "spoolops": f"n/a ({res['why']})",
                 "baseline": None, "ratio": None, "target": None, "note": "n/a"}]
    return [{"workload": f"6 janitor, {res['count']:,} stale replies, s per 10,000",
             "spoolops": res["janitor_per_10k"], "baseline": res["find_per_10k"],
             "baseline_name": "find -delete", "unit": "s", "target": None}]
