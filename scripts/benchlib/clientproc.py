"""A persistent bench client process: ``python -m benchlib.clientproc KIND TARGET DURABLE``.

KIND is ``spoolops`` (TARGET: a config file; a real ``spoolops.Client``),
``floor`` (TARGET: a floor spool root), ``http`` (TARGET: a URL) or
``dbpoll`` (TARGET: an sqlite file), or ``module:Class`` (an experimental
caller taking ``(target, durable)``, found on ``PYTHONPATH``).  It prints ``ready``, then reads one
JSON command per line from stdin and prints one JSON line per command:

* ``{"cmd": "echo", "n": N, "warmup": W, "pad": P, "until": PATH|null}``:
  W untimed then N timed echo round trips (or until PATH exists) ->
  ``{"lat": [s, ...], "t0": mono, "t1": mono, "errors": E}``
* ``{"cmd": "call", "op": OP, "args": {...}, "timeout": S}`` -> one timed
  call: ``{"lat": s, "ok": bool, "result": ..., "error": str|null}``
* ``{"cmd": "quit"}``

Trusts: its parent (the bench) and the server it was pointed at.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


class SpoolopsCaller:
    def __init__(self, target: str, durable: bool) -> None:
        from spoolops import Client
        self.client = Client(config=target)

    def call(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        return self.client.call(op, args, timeout=timeout)

    def call_timed(self, op: str, args: dict[str, Any], timeout: float) -> tuple[Any, float]:
        """The result and the worker's own time for the op (``finished_at -
        started_at`` of the reply, millisecond resolution)."""
        from spoolops.formats import parse_iso
        rid = self.client.submit(op, args, deadline=time.time() + timeout)
        reply = self.client.wait(rid, timeout=timeout)
        reply.raise_for_error()
        return reply.result, parse_iso(reply.finished_at) - parse_iso(reply.started_at)


def make_caller(kind: str, target: str, durable: bool) -> Any:
    if kind == "spoolops":
        return SpoolopsCaller(target, durable)
    if kind == "floor":
        from .floor import FloorCaller
        return FloorCaller(target, durable)
    if kind == "http":
        from .oldhttp import HttpCaller
        return HttpCaller(target)
    if kind == "dbpoll":
        from .dbpoll import DbPollCaller
        return DbPollCaller(target)
    if ":" in kind:  # "module:Class", for experiments with other clients
        import importlib
        module, cls = kind.split(":", 1)
        return getattr(importlib.import_module(module), cls)(target, durable)
    raise SystemExit(f"unknown client kind {kind!r}")


def echo_run(caller: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    pad = "x" * int(cmd.get("pad", 0))
    timeout = float(cmd.get("timeout", 120))
    for i in range(int(cmd.get("warmup", 0))):
        caller.call("echo", {"i": i, "pad": pad}, timeout)
    until = cmd.get("until")
    n = int(cmd.get("n", 0))
    lat: list[float] = []
    errors = 0
    t0 = time.monotonic()
    i = 0
    while (i < n) if until is None else (not os.path.exists(until) and i < max(n, 10**7)):
        start = time.perf_counter()
        try:
            caller.call("echo", {"i": i, "pad": pad}, timeout)
        except Exception:  # noqa: BLE001 - counted and reported, the run goes on
            errors += 1
        lat.append(time.perf_counter() - start)
        i += 1
    return {"lat": lat, "t0": t0, "t1": time.monotonic(), "errors": errors}


def one_call(caller: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    op_s = None
    try:
        if hasattr(caller, "call_timed"):
            result, op_s = caller.call_timed(cmd["op"], cmd.get("args", {}),
                                             float(cmd.get("timeout", 600)))
        else:
            result = caller.call(cmd["op"], cmd.get("args", {}), float(cmd.get("timeout", 600)))
        error = None
    except Exception as exc:  # noqa: BLE001 - reported to the bench
        result, error = None, f"{type(exc).__name__}: {exc}"
    return {"lat": time.perf_counter() - start, "ok": error is None, "result": result,
            "error": error, "op_s": op_s}


def main(argv: list[str]) -> int:
    kind, target, durable = argv[0], argv[1], argv[2] == "yes"
    caller = make_caller(kind, target, durable)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        out = echo_run(caller, cmd) if cmd["cmd"] == "echo" else one_call(caller, cmd)
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
