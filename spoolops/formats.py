"""The formats every transport shares: request ids, times, JSON.

Request ids (UTC time + pid + random: they sort by time and never collide),
times as ``2026-11-28T12:34:56.789Z``, JSON written one top-level key per
line (files that ``cat`` and ``grep`` well), and the strict JSON reader for
what arrives from others (UTF-8, an object, no duplicate keys, no NaN,
bounded depth).  No I/O; trusts nothing it parses.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import time
from datetime import datetime, timezone
from typing import Any

from .errors import BadRequest

PROTOCOL_VERSION = 1
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_DEPTH = 32


# a request's priority: an integer within this, either way (not a bool, not text)
MAX_PRIORITY = 1_000_000


def priority_problem(priority: object) -> str | None:
    """Why ``priority`` cannot be a request's priority, or None if it can
    (None itself means 0).  The client refuses what the worker would."""
    if priority is None or (not isinstance(priority, bool) and isinstance(priority, int)
                            and abs(priority) <= MAX_PRIORITY):
        return None
    return f"'priority' must be an integer between -{MAX_PRIORITY} and {MAX_PRIORITY}"


def valid_id(rid: object) -> bool:
    return isinstance(rid, str) and ID_RE.match(rid) is not None


def new_request_id(now: float | None = None) -> str:
    """UTC time + pid + random: sorts by time, never collides."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}.{int(now % 1 * 1e6):06d}Z-{os.getpid()}-{secrets.token_hex(4)}"


def utc_iso(ts: float | None = None) -> str:
    """``2026-11-28T12:34:56.789Z`` (milliseconds, UTC)."""
    ts = time.time() if ts is None else ts
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(ts))}.{int(ts % 1 * 1000):03d}Z"


def parse_iso(text: str) -> float:
    """Seconds since the epoch from an ISO 8601 time; naive times are UTC."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)  # noqa: UP017 - datetime.UTC is 3.11+
    return dt.timestamp()


_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode


@functools.lru_cache(maxsize=256)
def _key_line_start(key: str) -> str:
    return f"  {_encode(key)}: "


def encode_json(obj: Any) -> bytes:
    """UTF-8 JSON, one top-level key per line, with a trailing newline: small
    files that ``cat`` and ``grep`` well.  (Nested values stay on their key's
    line, so the C encoder does all the work: ``indent`` would not use it.)"""
    if isinstance(obj, dict) and obj and all(type(k) is str for k in obj):
        body = ",\n".join([_key_line_start(k) + _encode(v) for k, v in obj.items()])
        # a lone surrogate (from a "\\udc80" escape in a request) becomes that
        # escape again: still valid JSON, decoded to the same string
        return f"{{\n{body}\n}}\n".encode("utf-8", "backslashreplace")
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
            ).encode("utf-8", "backslashreplace")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _depth_ok(obj: Any, limit: int) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return True


def decode_json_object(data: bytes, what: str = "request") -> dict[str, Any]:
    """Strict JSON: UTF-8, an object, no duplicate keys, no NaN, bounded depth."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates,
                         parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, duplicate keys, huge ints
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"{what} must be a JSON object, not {type(obj).__name__}")
    # each level of nesting needs a bracket: with few of them (brackets in
    # strings count too) the walk is not needed
    if data.count(b"[") + data.count(b"{") >= MAX_DEPTH and not _depth_ok(obj, MAX_DEPTH):
        raise BadRequest(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return obj


def batch_name(args: Any) -> str | None:
    """A request's batch as text (``args["batch"]``: a string as it is, any
    other value as JSON -- as PostgreSQL's ``args->>'batch'`` gives it)."""
    batch = args.get("batch") if isinstance(args, dict) else None
    if batch is None:
        return None
    return batch if isinstance(batch, str) else json.dumps(batch)
