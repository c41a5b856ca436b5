"""Site operations for the tests, registered through the real entry-point group.

``sleep``: sleeps ``seconds`` holding target ``target`` (serialisation tests).
``crash``: raises an unexpected exception (becomes OpFailed).
``whoami``: returns the submitter (access control tests); only user ``nobody-allowed``
may call ``restricted``.
``nonidem``: a non-idempotent op that sleeps (recovery tests).
``single``: an entry point naming one ``Operation`` directly (not a callable
returning several); answers ``{"single": true}``.
A data_label resolver (``labels``: a JSON map in ``$SPOOLOPS_TEST_LABELS``)
and a follow-up hook (``record``: one JSON line per call appended to
``$SPOOLOPS_TEST_HOOK_LOG``; it raises when ``$SPOOLOPS_TEST_HOOK_FAIL`` is
set), both idle unless their variable is set.
``append``: appends its ``tag`` (one line) to the file ``path``, holding
target ``target``, after ``seconds``; not idempotent -- the file says in
which order, and how often, requests ran (order and exactly-once tests).
``hold``: runs until the file ``release`` exists (or ``timeout`` passes),
reporting progress 1/2 when it starts: a test holds a request running for
as long as it needs, then releases it -- no sleep stands in for "still
running".
"""

from __future__ import annotations

import os
import time

from spoolops.errors import BadRequest, OpFailed
from spoolops.ops import EVERYONE, NO_TARGETS, Operation


def _validate_sleep(args, ctx):
    if not isinstance(args, dict):
        raise BadRequest("args must be an object")
    seconds = args.get("seconds", 0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds <= 60:
        raise BadRequest("seconds must be a number from 0 to 60")
    target = args.get("target")
    if target is not None and not isinstance(target, str):
        raise BadRequest("target must be a string")
    return {"seconds": float(seconds), "target": target, "tag": args.get("tag")}


def _run_sleep(ctx, args):
    start = time.time()
    time.sleep(args["seconds"])
    return {"start": start, "end": time.time(), "tag": args["tag"], "pid": os.getpid()}


def _run_crash(ctx, args):
    raise RuntimeError("deliberate failure in a site op")


def _run_whoami(ctx, args):
    return {"user": ctx.user}


def _validate_hold(args, ctx):
    if not isinstance(args, dict) or not isinstance(args.get("release"), str) or \
            not os.path.isabs(args["release"]):
        raise BadRequest("release must be an absolute path")
    timeout = args.get("timeout", 120)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or \
            not 0 < timeout <= 600:
        raise BadRequest("timeout must be a number of seconds up to 600")
    target = args.get("target")
    if target is not None and not isinstance(target, str):
        raise BadRequest("target must be a string")
    return {"release": args["release"], "timeout": float(timeout), "target": target,
            "tag": args.get("tag")}


def _run_hold(ctx, args):
    start = time.time()
    ctx.progress(1, 2)
    end = time.monotonic() + args["timeout"]
    while not os.path.exists(args["release"]):
        if time.monotonic() > end:
            raise OpFailed(f"hold: {args['release']} never appeared")
        time.sleep(0.01)
    ctx.progress(2, 2)
    return {"start": start, "end": time.time(), "tag": args["tag"], "pid": os.getpid()}


def _validate_append(args, ctx):
    checked = _validate_sleep(args, ctx)
    if not isinstance(args.get("path"), str) or not os.path.isabs(args["path"]):
        raise BadRequest("path must be an absolute path")
    if not isinstance(args.get("tag"), str):
        raise BadRequest("tag must be a string")
    return dict(checked, path=args["path"], tag=args["tag"])


def _run_append(ctx, args):
    time.sleep(args["seconds"])
    fd = os.open(args["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (args["tag"] + "\n").encode())
    finally:
        os.close(fd)
    return {"tag": args["tag"], "pid": os.getpid()}


def operations():
    targets = lambda args, ctx: [args["target"]] if args["target"] else []
    return [
        Operation("sleep", _run_sleep, validate=_validate_sleep, targets=targets,
                  allowed_users=EVERYONE,
                  idempotent=True),
        Operation("nonidem", _run_sleep, validate=_validate_sleep, targets=targets,
                  allowed_users=EVERYONE,
                  idempotent=False),
        Operation("append", _run_append, validate=_validate_append, targets=targets,
                  allowed_users=EVERYONE, idempotent=False),
        Operation("hold", _run_hold, validate=_validate_hold, targets=targets,
                  allowed_users=EVERYONE,
                  idempotent=True),
        Operation("crash", _run_crash, targets=NO_TARGETS, allowed_users=EVERYONE,
                  idempotent=True),
        Operation("whoami", _run_whoami, targets=NO_TARGETS, allowed_users=EVERYONE,
                  idempotent=True),
        Operation("restricted", _run_whoami, targets=NO_TARGETS, idempotent=True,
                  allowed_users=("nobody-allowed",)),
    ]


SINGLE = Operation("single", lambda ctx, args: {"single": True}, targets=NO_TARGETS,
                   allowed_users=EVERYONE, idempotent=True)


def resolve_label(data_label, ctx):
    path = os.environ.get("SPOOLOPS_TEST_LABELS")
    if not path:
        return None
    import json
    with open(path) as f:
        return json.load(f).get(data_label)


def record_hook(op, args, result, ctx):
    path = os.environ.get("SPOOLOPS_TEST_HOOK_LOG")
    if not path:
        return
    import json
    with open(path, "a") as f:
        f.write(json.dumps({"op": op, "id": ctx.request_id, "args": args,
                            "result": result}) + "\n")
    fail = os.environ.get("SPOOLOPS_TEST_HOOK_FAIL")
    # "1": always; a path: while that file exists (the archive's database is
    # "down" until the test removes it)
    if fail == "1" or (fail and os.path.exists(fail)):
        raise RuntimeError("deliberate failure of a follow-up hook")
