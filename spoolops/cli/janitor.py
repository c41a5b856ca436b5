"""``spoolops janitor [--dry-run] [--json]``: the cron clean-up, printed.

Exit codes (docs/design.rst): 0 when all is well, 1 when stuck work was found (a
request queued longer than ``stuck_after``, an orphan with no worker, a
request running too long), 2 for configuration or permission problems.
Trusts: the configuration; prints what ``spoolops.janitor`` returns.
"""

from __future__ import annotations

import argparse
import json

from ..admin import become_worker_user
from ..janitor import JanitorReport, run_janitor
from .common import Exit, age_text, config_of
from .text import printable as p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="change nothing; say what would be done")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def render_text(report: JanitorReport) -> str:
    lines = []
    worker = report.worker
    state = "running, pid " + p(worker["pid"]) if worker["alive"] else (
        "unknown" if worker["alive"] is None else "NOT RUNNING")
    lines.append(f"spool {p(report.root)}: worker {state}"
                 + (" (dry run: nothing changed)" if report.dry_run else ""))
    # paths name files that web users named, reasons the ops they asked for:
    # every field printable
    for a in report.actions:
        verb = p(a.action) if a.done else f"would {p(a.action)}"
        if a.error:
            verb = f"FAILED to {p(a.action)}"
        tail = f": {p(a.error)}" if a.error else ""
        lines.append(f"{verb} {p(a.path)} (age {age_text(a.age_s)}; {p(a.why)}){tail}")
    for f in report.findings:
        label = "STUCK" if f.kind in ("stuck", "orphan", "running_long") else "NOTE"
        lines.append(f"{label} {p(f.kind)}: {p(f.path)} (age {age_text(f.age_s)}):"
                     f" {p(f.why)}")
    if not report.actions and not report.findings:
        lines.append("nothing to do")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = config_of(args)
    become_worker_user(config)
    report = run_janitor(config, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render_text(report))
    return Exit.FAIL if report.stuck else Exit.OK
