"""Contract: hostile request *contents*, on every transport (the ``served``
fixture).

A client that skips ``Client``'s checks publishes request documents
straight through its transport (``ClientSide.publish``, as a hostile web
application could with the same credentials): bad envelopes (version, op,
deadline, client, submitted, reply), bad arguments (not an object, too
deep, NaN, wrong types, out of range, huge), ops that do not exist or that
the submitter may not call, a deadline already past, and a document over
``max_request_bytes``.

Each one is either refused when published -- with ``BadRequest``, nothing
queued -- or answered exactly once with an expected error type: never run,
never answered ``ok``.  Afterwards the same worker process still serves,
and nothing is left queued, running or uncollected.

(Values of a field's meaning but not its JSON type -- ``"version": "1"``,
``"priority": "9"`` -- are refused by the spool, which reads the document
as it was written, and cast by PostgreSQL's typed columns: they are not
cases here.)  What a member of the submit group can do to the spool's
*files* (links, FIFOs, bad names, unreadable files, future mtimes) is in
``test_hostile_input.py``; what a web role can send PostgreSQL by hand is
in ``test_pg_attacks.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from support.waiting import wait_for

from spoolops import BadRequest
from spoolops.formats import PROTOCOL_VERSION, utc_iso

BAD = frozenset({"BadRequest"})
NOT_AN_OP = frozenset({"BadRequest", "UnknownOp"})


def envelope(rid: str, op: str = "echo", args: Any = None) -> dict[str, Any]:
    """A request document as ``Client`` builds it."""
    return {"version": PROTOCOL_VERSION, "id": rid, "op": op,
            "args": {"x": 1} if args is None else args, "priority": 0,
            "submitted": utc_iso(), "client": {"pid": os.getpid(), "host": "hostile"}}


def _set(**fields: Any) -> Callable[[dict], dict]:
    return lambda doc: {**doc, **fields}


def _drop(key: str) -> Callable[[dict], dict]:
    return lambda doc: {k: v for k, v in doc.items() if k != key}


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# (label, how the document is spoiled, the error types expected)
CASES: list[tuple[str, Callable[[dict], dict], frozenset[str]]] = [
    ("missing version", _drop("version"), BAD),
    ("wrong version", _set(version=PROTOCOL_VERSION + 1), BAD),
    ("missing op", _drop("op"), BAD),
    ("empty op", _set(op=""), BAD),
    ("op not a string", _set(op=["echo"]), NOT_AN_OP),
    ("op with a NUL", _set(op="echo\u0000"), NOT_AN_OP),
    ("op of 500 characters", _set(op="x" * 500), NOT_AN_OP),
    ("unknown op", _set(op="rm_rf"), frozenset({"UnknownOp"})),
    ("path traversal op name", _set(op="../../etc/passwd"), frozenset({"UnknownOp"})),
    ("op the submitter may not call", _set(op="restricted", args={}),
     frozenset({"PermissionDenied"})),
    ("args not an object", _set(args=[1, 2]), BAD),
    ("args a string", _set(args="x=1"), BAD),
    ("deeply nested args", _set(args={"x": _deep(200)}), BAD),
    ("NaN in args", _set(args={"x": float("nan")}), BAD),
    ("wrong argument type", _set(op="sleep", args={"seconds": "long"}), BAD),
    ("argument out of range", _set(op="sleep", args={"seconds": 1e9}), BAD),
    ("argument a bool", _set(op="sleep", args={"seconds": True}), BAD),
    ("huge structure in args", _set(op="sleep", args={"seconds": 0, "target": ["x"] * 3000}),
     BAD),
    ("priority too large", _set(priority=10**12), BAD),
    ("deadline not a time", _set(deadline="not a time"), BAD),
    ("deadline a number", _set(deadline=123), BAD),
    ("deadline in the past", _set(deadline="2000-01-01T00:00:00Z"), frozenset({"Expired"})),
    ("client not an object", _set(client="web1"), BAD),
    ("submitted a number", _set(submitted=0), BAD),
    ("reply not a boolean", _set(reply="yes"), BAD),
]


def test_hostile_request_documents_are_refused_or_answered_once(served) -> None:
    client = served.client()
    publisher = client.transport
    proc = served.workers[0]
    limit = served.config.max_request_bytes
    cases = [*CASES, ("over max_request_bytes",
                      _set(args={"blob": "x" * (limit + 10)}), BAD)]
    outcomes: dict[str, str] = {}                 # label -> what happened
    published: dict[str, str] = {}                # rid -> label
    for n, (label, spoil, _expected) in enumerate(cases):
        rid = f"hostile-doc-{n:02d}"
        try:
            publisher.publish(spoil(envelope(rid)))
        except BadRequest:
            outcomes[label] = "BadRequest"        # refused: nothing queued
            assert served.transport().describe(rid) is None, label
        except Exception as exc:   # noqa: BLE001 -- reported below, with every other case
            outcomes[label] = f"publish raised {type(exc).__name__}: {exc}"
        else:
            published[rid] = label

    replies: dict[str, dict] = {}

    def all_answered() -> bool:
        for rid in published.keys() - replies.keys():
            got = client.transport.collect(rid)
            if got is not None:
                replies[rid] = got
        return replies.keys() == published.keys()
    wait_for(all_answered, timeout=120, what="a reply to every published hostile request")
    for rid, label in published.items():
        reply = replies[rid]
        assert reply["id"] == rid, (label, reply)
        outcomes[label] = ("ok: " + json.dumps(reply)[:200]) if reply["ok"] else \
            reply["error"]["type"]
    wrong = {label: outcomes[label] for label, _spoil, expected in cases
             if outcomes[label] not in expected}
    assert not wrong, wrong

    # each answered once; the same worker still serves; nothing left behind
    for rid in published:
        assert client.transport.collect(rid) is None
    assert proc.poll() is None and served.workers[0].pid == proc.pid
    assert client.call("echo", {"after": "hostile"}, timeout=60) == {"after": "hostile"}
    wait_for(lambda: served.quiet() and served.replies_left() == 0, what="nothing left")
    assert served.count("failed") == 0
