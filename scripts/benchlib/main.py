"""``scripts/bench``: spoolops against the systems it replaces (issue 6).

Runs each workload with its baselines in the same run, prints one table
(workload, spoolops, baseline, ratio, target, met/MISSED), writes every
figure to ``bench-results/bench-<timestamp>.json`` and, when matplotlib
imports, ``bench-results/bench-<timestamp>.png`` (echo latency vs clients),
and the table as RST (``.rst``) for pasting into ``docs/benchmarks.rst``.

Trusts: nothing outside the temporary folder it makes (removed at the end
unless ``--keep``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import report
from .common import fs_type, loadavg, machine

WORKLOADS = ("echo", "hol", "plain", "compressed", "backlog", "janitor", "idle", "pg",
             "fitsstorage")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions (about 2 min)")
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--out", default="bench-results", help="folder for the JSON and PNG")
    p.add_argument("--tmp", default=None, help="parent of the temporary folder (default:"
                   " $TMPDIR or /tmp; must be the filesystem you want to measure)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(only) - set(WORKLOADS)
    if unknown:
        print(f"unknown workload(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    info = machine()
    results: dict[str, Any] = {"machine": info, "quick": args.quick,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "loadavg_before": loadavg(), "workloads": {}}
    _log(f"machine: {info['cores']} cores, {info['cpu']}; load {results['loadavg_before']}")
    base = Path(tempfile.mkdtemp(prefix="spoolops-bench-", dir=args.tmp))
    info["bench_fs"] = f"{fs_type(base)} ({base.parent})"
    rows: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        from .workloads import run_all
        run_all(base, only, args.quick, results["workloads"], rows, _log)
    finally:
        if args.keep:
            _log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    results["loadavg_after"] = loadavg()
    results["seconds"] = round(time.monotonic() - t_start, 1)
    results["rows"] = [report.judge(r) for r in rows]
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = Path(args.out)
    report.write_json(out / f"bench-{stamp}.json", results)
    (out / f"bench-{stamp}.rst").write_text(report.table(results["rows"], rst=True) + "\n")
    print(f"spoolops bench ({'quick' if args.quick else 'full'}) on {info['cores']} cores,"
          f" {info['cpu']}, {info['mem_gb']} GB, {info['bench_fs']}, Python {info['python']};"
          f" load {results['loadavg_before']} -> {results['loadavg_after']};"
          f" {results['seconds']} s")
    print(report.table(results["rows"]))
    print(f"figures: {out / f'bench-{stamp}.json'}")
    echo = results["workloads"].get("echo")
    if echo:
        png = out / f"bench-{stamp}.png"
        if report.plot(png, echo, info):
            print(f"plot: {png}")
        else:
            print("plot: skipped (matplotlib not installed: pip install -e '.[bench]')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
