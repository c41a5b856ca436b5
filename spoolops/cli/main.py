"""The ``spoolops`` command: parses arguments, calls the library, prints.

With the other modules of ``spoolops/cli`` the only code that parses
arguments or prints.  Exit codes are the design's (``common.Exit``): 2 for
usage, configuration and permission problems everywhere; the rest per
subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config, render_config, replace_config
from ..errors import (
    ConfigError,
    OpError,
    SpoolError,
    SpoolSetupError,
    Timeout,
    WorkerRunning,
)
from ..transport import transport_class
from . import doctor, hooks, inspect, janitor
from .common import Exit, config_of, progress_text
from .text import printable, printable_lines


def _add_config(parser: argparse.ArgumentParser, top: bool = False) -> None:
    # --config is accepted before or after the subcommand
    parser.add_argument("--config", "-c", metavar="FILE",
                        default=None if top else argparse.SUPPRESS,
                        help="configuration file (default: $SPOOLOPS_CONFIG, then"
                             " /etc/spoolops/spoolops.conf)")
    parser.add_argument("--root", metavar="DIR", default=None if top else argparse.SUPPRESS,
                        help="spool root (overrides [spool] root)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spoolops", description="A filesystem spool for privileged file operations.")
    parser.add_argument("--version", action="version", version=f"spoolops {__version__}")
    _add_config(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    sub.required = True

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config(p)
        return p

    p = add("init", "create or repair the spool tree, owners and modes")
    p.add_argument("--group", help="submit group (default: [spool] group, else the worker"
                   " user's primary group)")
    p.add_argument("--worker-user", help="user the worker runs as (default: [spool]"
                   " worker_user, else you)")
    p.add_argument("--write-config", metavar="FILE",
                   help="also write a configuration file for this tree")
    p.add_argument("--transport", choices=("spool", "postgresql"),
                   help="how requests travel (default: [spool] transport)")
    pg = p.add_argument_group("with --transport postgresql")
    pg.add_argument("--dsn", help="the queue's database, as clients and worker connect"
                    " (default: [postgresql] dsn)")
    pg.add_argument("--admin-dsn", metavar="DSN",
                    help="connect as this to create roles and the schema (default: --dsn"
                         " as user postgres)")
    pg.add_argument("--web-login", action="append", default=[], metavar="ROLE",
                    help="a login role that may submit (repeat; created when missing)")
    pg.add_argument("--worker-login", action="append", default=[], metavar="ROLE",
                    help="a login role the worker connects as (default: the worker user)")
    pg.add_argument("--database-only", action="store_true",
                    help="only the database part (run as the database administrator)")

    p = add("worker", "run the worker (until SIGTERM/SIGINT)")
    p.add_argument("--once", action="store_true", help="drain the queue, then exit")
    p.add_argument("--standby", action="store_true",
                   help="wait for the running worker to exit, then take over")
    p.add_argument("-v", "--verbose", action="store_true", help="also log request arguments")

    p = add("call", "submit a request, wait for the reply and print it as JSON")
    p.add_argument("op", help="operation name, e.g. echo")
    p.add_argument("--arg", action="append", default=[], metavar="K=V",
                   help="a string argument; K:=J gives a JSON value (--arg hdu:=1)")
    p.add_argument("--args-json", metavar="JSON", help="arguments as one JSON object")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds to wait for the reply (default 30)")
    p.add_argument("--priority", type=int, default=0, metavar="N", help="higher runs first")
    p.add_argument("--no-wait", action="store_true", help="print the request id and exit")

    inspect.add_status_arguments(add("status", "counts and oldest age per state, the worker,"
                                     " problems"))
    inspect.add_show_arguments(add("show", "where a request is, its request, reply and reason"))
    inspect.add_ls_arguments(add("ls", "one line per request, oldest first"))
    inspect.add_tail_arguments(add("tail", "follow the spool live, one line per event"))

    p = add("cancel", "withdraw a queued request")
    p.add_argument("id")
    p = add("requeue", "put a failed (or orphaned) request back in the queue")
    p.add_argument("id")

    doctor.add_arguments(add("doctor", "check users, groups, modes, filesystems, inotify limits,"
                             " config"))
    janitor.add_arguments(add("janitor", "cron cleanup: stale tmp files, uncollected replies,"
                              " old failed entries, orphaned active jobs"))
    hooks.add_arguments(add("hooks", "follow-up hook calls that failed: list, retry, drop"))

    p = add("demo", "run a worker on a local tree with sample FITS files")
    p.add_argument("--dir", metavar="DIR", help="where to build the tree (default: a"
                   " temporary folder, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the tree afterwards")
    p.add_argument("--transport", choices=("spool", "postgresql"), default="spool",
                   help="postgresql: the same over a throwaway PostgreSQL cluster (needs"
                        " the server binaries, e.g. Debian's postgresql package)")
    return parser


def setup_logging(config: Config, verbose: bool = False) -> None:
    target = config.log
    if target == "stderr":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    elif target == "syslog":
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.handlers.WatchedFileHandler(target)
    fmt = "spoolops[%(process)d]: level=%(levelname)s %(message)s" if target == "syslog" \
        else "%(asctime)s level=%(levelname)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    # the records need none of these (the logging docs' "Optimization"): a
    # worker logs a line per request, and each costs microseconds
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logProcesses = target == "syslog"
    root = logging.getLogger("spoolops")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else config.log_level.upper())
    root.propagate = False


def cmd_init(args: argparse.Namespace) -> int:
    from ..admin import init_tree, resolve_accounts
    config = config_of(args)
    if args.transport:
        config = replace_config(config, transport=args.transport)
    if args.dsn is not None:
        config = replace_config(config, dsn=args.dsn)
    accounts = resolve_accounts(config, args.worker_user, args.group)
    kind = transport_class(config)
    offered = {"admin_dsn": args.admin_dsn or f"{config.dsn} user=postgres",
               "web_logins": args.web_login,
               "worker_logins": args.worker_login or [accounts.worker_user],
               "database_only": args.database_only}
    options = {key: value for key, value in offered.items() if key in kind.create_options}
    for line in init_tree(config, accounts, **options):
        print(line)
    print(kind.ready_line(config, accounts.worker_user, accounts.group))
    if args.write_config:
        written = replace_config(config, worker_user=accounts.worker_user,
                                 group=accounts.group)
        path = Path(args.write_config)
        path.write_text(render_config(written))
        print(f"wrote {path}")
    return Exit.OK


def cmd_worker(args: argparse.Namespace) -> int:
    from ..admin import become_worker_user
    from ..worker import run_worker
    config = config_of(args)
    become_worker_user(config)
    setup_logging(config, args.verbose)
    return run_worker(config, once=args.once, standby=args.standby)


def parse_call_args(pairs: list[str], args_json: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if args_json:
        try:
            loaded = json.loads(args_json)
        except ValueError as exc:
            raise ConfigError(f"--args-json is not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("--args-json must be a JSON object")
        values.update(loaded)
    for pair in pairs:
        # K=V is a string (a night folder "20261128" stays a string); K:=J is JSON
        key, sep, raw = pair.partition("=")
        if not sep or not key or key == ":":
            raise ConfigError(f"--arg {pair!r}: use KEY=VALUE, or KEY:=JSON")
        if key.endswith(":"):
            try:
                values[key[:-1]] = json.loads(raw)
            except ValueError as exc:
                raise ConfigError(f"--arg {pair!r}: not valid JSON after ':=' ({exc})") from None
        else:
            values[key] = raw
    return values


class _ProgressLine:
    """Shows a running request's progress on stderr: a bar redrawn in place on
    a terminal, a plain line per change otherwise."""

    def __init__(self, rid: str) -> None:
        self.rid, self.tty, self.shown = rid, sys.stderr.isatty(), None

    def __call__(self, progress: dict[str, Any]) -> None:
        text = progress_text(progress)
        if text and text != self.shown:
            print(("\r" if self.tty else "") + f"{self.rid} {text}",
                  end="" if self.tty else "\n", file=sys.stderr, flush=True)
            self.shown = text

    def done(self) -> None:
        if self.shown is not None and self.tty:
            print(file=sys.stderr)


def cmd_call(args: argparse.Namespace) -> int:
    from ..client import Client
    client = Client(config=config_of(args))
    call_args = parse_call_args(args.arg, args.args_json)
    if args.no_wait:
        print(client.submit(args.op, call_args, priority=args.priority))
        return Exit.OK
    progress = _ProgressLine(args.op)
    try:
        reply = client.call_reply(args.op, call_args, timeout=args.timeout,
                                  priority=args.priority, on_progress=progress)
    except Timeout as exc:
        print(f"spoolops call: {printable(exc)}", file=sys.stderr)
        return Exit.TIMEOUT
    finally:
        progress.done()
    print(json.dumps(reply.raw, indent=2))
    return Exit.OK if reply.ok else Exit.FAIL


def cmd_cancel(args: argparse.Namespace) -> int:
    from ..admin import become_worker_user, cancel_request
    config = config_of(args)
    become_worker_user(config)
    if cancel_request(config, args.id):
        print(f"cancelled {args.id}")
        return Exit.OK
    print(f"spoolops cancel: {args.id} is not queued (already claimed, done, or unknown)",
          file=sys.stderr)
    return Exit.FAIL


def cmd_requeue(args: argparse.Namespace) -> int:
    from ..admin import become_worker_user, poke_worker, requeue
    config = config_of(args)
    become_worker_user(config)
    try:
        origin = requeue(config, args.id)
    except SpoolSetupError as exc:
        print(f"spoolops requeue: {printable(exc)}", file=sys.stderr)
        return Exit.FAIL
    print(f"requeued {args.id} (was in {printable(origin)})")
    poke_worker(config)
    return Exit.OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args.dir, keep=args.keep, transport=args.transport)


COMMANDS = {"init": cmd_init, "worker": cmd_worker, "call": cmd_call,
            "status": inspect.cmd_status, "show": inspect.cmd_show, "ls": inspect.cmd_ls,
            "tail": inspect.cmd_tail, "cancel": cmd_cancel, "requeue": cmd_requeue,
            "doctor": doctor.run, "janitor": janitor.run, "hooks": hooks.run,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # an error's message may quote what it failed on: a request id, a file
    # name, a reply's message -- printable (a configuration error may quote
    # its file over several lines: kept, each line printable)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"spoolops {args.command}: {printable_lines(exc)}", file=sys.stderr)
        return Exit.USAGE
    except (SpoolSetupError, WorkerRunning) as exc:
        print(f"spoolops {args.command}: {printable(exc)}", file=sys.stderr)
        return Exit.USAGE
    except PermissionError as exc:
        print(f"spoolops {args.command}: permission denied: {printable(exc.filename or exc)}",
              file=sys.stderr)
        return Exit.USAGE
    except OpError as exc:
        print(f"spoolops {args.command}: {printable(exc)}", file=sys.stderr)
        return Exit.FAIL
    except SpoolError as exc:
        print(f"spoolops {args.command}: {printable(exc)}", file=sys.stderr)
        return Exit.FAIL
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

