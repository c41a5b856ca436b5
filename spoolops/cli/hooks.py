"""``spoolops hooks``: the follow-up hook calls that failed and wait for a retry.

Lists them (``--json``), tries them again at once (``retry ID`` or ``retry
--all``: the running worker picks them up within its next round), or gives up
on a request's calls (``drop ID``: the archive will not learn of that change
unless someone tells it).  Run as root or the worker user: the calls live in
the worker's own folder; root switches to the worker user first.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..admin import become_worker_user
from ..formats import batch_name
from ..hookledger import HookLedger
from ..transport import open_transport
from ..transport.base import Batch
from .common import Exit, config_of
from .text import printable as p


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("list", "retry", "drop"), default="list",
                        help="list (default), retry now, or drop (give up)")
    parser.add_argument("id", nargs="?", help="the request id (retry, drop)")
    parser.add_argument("--all", action="store_true", help="retry: every kept call")
    parser.add_argument("--json", action="store_true", help="list: one JSON array")


def run(args: argparse.Namespace) -> int:
    config = config_of(args)
    become_worker_user(config)
    transport = open_transport(config)
    ledger = HookLedger(transport.work_dir, config.durable)
    if args.action == "list":
        calls = ledger.calls()
        if args.json:
            print(json.dumps([call.view() for call in calls], indent=2))
        else:
            for call in calls:
                view = call.view()
                # each field as the worker account kept it (the id and op a web
                # user's): printable, never raw
                print(f"{p(view['state']):8} {p(call.id)}  hook={p(call.hook)}"
                      f" op={p(call.op)} tries={p(call.tries)} next={p(view['next_try'])}"
                      f"  {p(call.last_error)}")
            if not calls:
                print("no hook calls wait for a retry")
        return Exit.OK
    if args.action == "retry" and (args.all or args.id):
        count = ledger.retry_now(None if args.all else args.id)
    elif args.action == "drop" and args.id:
        dropped = [call for call in ledger.calls() if call.id == args.id]
        count = ledger.drop(args.id)
        if dropped:
            # given up: the request's batch no longer waits for it
            call = dropped[0]
            transport.release_batch(call.id, Batch(call.marker, batch_name(call.args)))
    else:
        print(f"spoolops hooks {args.action}: name a request id"
              f"{' (or --all)' if args.action == 'retry' else ''}", file=sys.stderr)
        return Exit.USAGE
    if not count:
        print(f"spoolops hooks {args.action}: no kept hook call for {args.id}", file=sys.stderr)
        return Exit.FAIL
    # the running worker re-reads the calls now (it keeps them in memory)
    transport.load_stats(fresh=True)
    print(f"{args.action}: {count} hook call(s)")
    return Exit.OK
