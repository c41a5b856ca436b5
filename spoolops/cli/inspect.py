"""``status``, ``show``, ``ls`` and ``tail``: the spool telling its own story.

Printing only; the facts come from ``status.py``, ``prometheus.py`` and the
transport's reads.  Output is for a person on a terminal unless ``--json``
(or ``--prometheus``) asks for a machine format.

Run as root, each switches to the worker user before it reads anything
(``common.operator_config_of``): the spool holds files that members and the
worker account write, and root must not read through their links or signal
the pid they name.  Trusts the configuration; what the transport reads is
printed, never acted on.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from ..status import STATES, spool_status
from ..transport import open_transport
from ..transport.base import STATE_WORDS, OperatorSide
from .common import Exit, age_text, operator_config_of, progress_text
from .text import printable as p
from .text import printable_lines

# Every field printed in text is passed through ``p`` (``text.printable``):
# ids, op names, users, targets, hosts, errors and reasons are written by web
# users or the worker account and must not reach the terminal raw.


def _joined(values: Any, sep: str = ",") -> str:
    """A list of untrusted values, each printable, joined ('' for none)."""
    if not values:
        return ""
    if isinstance(values, (list, tuple)):
        return sep.join(p(value) for value in values)
    return p(values)


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="one JSON object")
    group.add_argument("--prometheus", action="store_true",
                       help="Prometheus text format (for node_exporter's textfile collector)")


def cmd_status(args: argparse.Namespace) -> int:
    config = operator_config_of(args)
    transport: OperatorSide = open_transport(config)
    status = spool_status(config, refresh=True, transport=transport)
    if args.prometheus:
        from ..prometheus import render_metrics
        stats = transport.load_stats() if status["worker"]["alive"] else None
        sys.stdout.write(render_metrics(status, stats))
    elif args.json:
        print(json.dumps(status, indent=2))
    else:
        print(p(transport.title()))
        print(f"{'state':<10}{transport.place_heading:<10}{'count':>8}  oldest")
        for state in STATES:
            s = status[state]
            count = "?" if s["count"] is None else p(s["count"])
            print(f"{state:<10}{transport.place_of(state):<10}{count:>8}"
                  f"  {age_text(s['oldest_age_s'])}")
        worker = status["worker"]
        if worker["alive"]:
            extra = ""
            if "uptime_s" in worker:
                extra = (f", up {age_text(worker['uptime_s'])},"
                         f" served {p(worker.get('served'))}")
            print(f"worker    running, pid {p(worker['pid'])}{extra}")
        else:
            print("worker    NOT RUNNING")
        for w in status.get("workers", ()):
            state = "FENCED" if w["fenced"] else "alive" if w["alive"] else "gone"
            holds = f", running {_joined(w['running'])}" if w["running"] else ""
            leases = f", leases {_joined(w['leases'])}" if w["leases"] else ""
            print(f"  worker {p(w['id'])} on {p(w['host'])} pid {p(w['pid'])}: {state},"
                  " heartbeat"
                  f" {age_text(w['heartbeat_age_s'])} ago{holds}{leases}")
        for problem in status["problems"]:
            print(f"PROBLEM: {p(problem)}")
    return Exit.FAIL if status["problems"] else Exit.OK


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="request id or a unique prefix of one")
    parser.add_argument("--json", action="store_true", help="one JSON object")


def cmd_show(args: argparse.Namespace) -> int:
    transport: OperatorSide = open_transport(operator_config_of(args))
    ids = transport.find(args.id)
    if not ids:
        print(f"spoolops show: no request matches {args.id!r}", file=sys.stderr)
        return Exit.FAIL
    if len(ids) > 1:
        print(f"spoolops show: {args.id!r} matches {len(ids)} requests: "
              + _joined(ids[:10], ", "), file=sys.stderr)
        return Exit.FAIL
    info = transport.describe(ids[0])
    if info is None:
        print(f"spoolops show: {p(ids[0])} vanished", file=sys.stderr)
        return Exit.FAIL
    if args.json:
        print(json.dumps(info, indent=2))
        return Exit.OK
    request, reply, run = info.get("request"), info.get("reply"), info.get("run")
    print(f"id:       {p(info['id'])}")
    print(f"state:    {p(info['state'])}  ({p(info.get('path', ''))},"
          f" since {p(info.get('since'))})")
    if isinstance(request, dict):
        print(f"op:       {p(request.get('op'))}   priority {p(request.get('priority', 0))}"
              f"   submitted {p(request.get('submitted'))} by {p(info.get('owner'))}"
              " (file owner)")
    if isinstance(run, dict):
        print(f"running:  since {p(run.get('started_at'))} by worker pid {p(run.get('pid'))}"
              f" on {p(run.get('host'))}; target {_joined(run.get('targets'), ', ') or '-'}")
        bar = progress_text(run.get("progress"))
        if bar:
            print(f"progress: {bar}")
    if isinstance(reply, dict):
        print(f"timings:  queued {p(reply.get('queued_at'))}"
              f" -> started {p(reply.get('started_at'))}"
              f" -> finished {p(reply.get('finished_at'))}")
        worker = reply.get("worker")
        worker = worker if isinstance(worker, dict) else {}
        print(f"worker:   pid {p(worker.get('pid'))} on {p(worker.get('host'))}")
        error = reply.get("error")
        error = error if isinstance(error, dict) else {}
        print("outcome:  " + ("ok" if reply.get("ok") else
                              f"{p(error.get('type'))}: {p(error.get('message'))}"))
    if info.get("reason"):
        print(f"reason:   {p(info['reason'])}")
    for label, body in (("request", request), ("reply", reply)):
        if body is not None:
            print(f"{label}:")
            # JSON is printed as json.dumps writes it (every control and
            # non-ASCII character escaped); a body that is no JSON line by line
            print(json.dumps(body, indent=2) if not isinstance(body, str) else
                  printable_lines(body))
    return Exit.OK


def add_ls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("state", nargs="?", choices=sorted(STATE_WORDS),
                        help="one folder (default: all four)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def cmd_ls(args: argparse.Namespace) -> int:
    transport: OperatorSide = open_transport(operator_config_of(args))
    folders = [args.state] if args.state else list(STATE_WORDS)
    now = time.time()
    if not args.json:
        print(f"{'state':<8} {'id':<40} {'op':<15} {'user':<10} {'age':>7} {'prio':>4}  target")
    for folder in folders:
        try:
            entries = transport.entries(STATE_WORDS[folder])
        except PermissionError:
            print(f"spoolops ls: cannot list {folder}/ as this user (run as root or the"
                  " worker user)", file=sys.stderr)
            return Exit.FAIL
        for entry in entries:
            row = {"state": entry.state, "id": entry.id or entry.name,
                   "age_s": round(max(0.0, now - entry.mtime), 3), **entry.fields}
            if args.json:
                print(json.dumps(row))
            else:
                unread = f"  [not read: {p(row['unread'])}]" if row.get("unread") else ""
                print(f"{folder:<8} {p(row['id']):<40} {p(row['op'] or '?'):<15}"
                      f" {p(row['user'] or '?'):<10} {age_text(row['age_s']):>7}"
                      f" {p(row['priority'] if row['priority'] is not None else '-'):>4}"
                      f"  {p(row['target'] or '-')}{unread}")
    return Exit.OK


def add_tail_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per event")
    parser.add_argument("--count", type=int, metavar="N",
                        help="exit after N events (default: follow until interrupted)")


def tail_line(event: dict[str, Any]) -> str:
    kind = event["event"]
    head = f"{p(event['time'])} {p(kind):<8} {p(event.get('id', ''))}"
    if kind == "queued":
        return f"{head} op={p(event.get('op'))} priority={p(event.get('priority'))}"
    if kind == "started":
        return (f"{head} op={p(event.get('op'))} pid={p(event.get('pid'))}"
                f" user={p(event.get('user'))} target={p(event.get('target') or '-')}")
    if kind == "finished":
        if event.get("ok") is None:
            return f"{head} ({p(event.get('note'))})"
        outcome = "ok" if event.get("ok") else \
            f"{p(event.get('error'))}: {p(event.get('message'))}"
        return f"{head} op={p(event.get('op'))} {outcome} in {p(event.get('duration_s'))}s"
    if kind == "failed":
        return f"{head} {p(event.get('reason'))}"
    return f"{head} {p(event.get('where', ''))} ({p(event.get('note', ''))})"


def cmd_tail(args: argparse.Namespace) -> int:
    transport: OperatorSide = open_transport(operator_config_of(args))
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    seen = 0
    try:
        for event in transport.follow(lambda: bool(stopping)):
            print(json.dumps(event) if args.json else tail_line(event), flush=True)
            seen += 1
            if args.count is not None and seen >= args.count:
                break
    except KeyboardInterrupt:
        pass
    return Exit.OK
