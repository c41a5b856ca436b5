"""Checking an operation's arguments: one way, for every operation.

The arguments are untrusted JSON from a member of the submit group.  Each
helper takes the args object and one name, and returns the cleaned value or
raises ``BadRequest`` naming the argument and what it must be.  JSON
``null`` means "not given" everywhere (the default applies).  Paths are
split and checked by ``spoolops.confine`` (no ``..``, no absolute path, no
control character), never opened here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .. import confine
from ..errors import BadRequest

_MD5_RE = re.compile(r"^[0-9a-f]{32}$")


def object_args(args: Any, ctx: Any = None) -> dict[str, Any]:
    """The args as a dict (a copy); ``BadRequest`` unless a JSON object.
    Usable as an ``Operation``'s ``validate`` as it is."""
    if not isinstance(args, dict):
        raise BadRequest(f"args must be a JSON object, not {type(args).__name__}")
    return dict(args)


def only(args: Mapping[str, Any], known: Iterable[str], op: str) -> None:
    """``BadRequest`` naming any argument that is not one of ``known``."""
    known = tuple(known)
    unknown = sorted(str(k) for k in args if k not in known)
    if unknown:
        raise BadRequest(f"unknown argument(s) for {op}: {', '.join(unknown)}"
                         f" (known: {', '.join(known)})")


def flag(args: Mapping[str, Any], name: str, default: bool = False) -> bool:
    """A true/false argument."""
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, not {type(value).__name__}")
    return value


def integer(args: Mapping[str, Any], name: str, default: int, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """A whole number (not a bool), within bounds."""
    value = args.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or \
            (minimum is not None and value < minimum) or \
            (maximum is not None and value > maximum):
        bounds = " and ".join(part for part in (
            f">= {minimum}" if minimum is not None else "",
            f"<= {maximum}" if maximum is not None else "") if part)
        raise BadRequest(f"{name} must be an integer{' ' + bounds if bounds else ''}")
    return value


def text(args: Mapping[str, Any], name: str, default: str | None = None) -> str | None:
    """A string (valid UTF-8: a lone surrogate from a JSON escape is refused)."""
    value = args.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} is not valid UTF-8") from None
    return value


def md5(args: Mapping[str, Any], name: str) -> str | None:
    """An md5 digest: 32 hexadecimal digits (either case), returned lower-case."""
    value = text(args, name)
    if value is None:
        return None
    value = value.strip().lower()
    if not _MD5_RE.match(value):
        raise BadRequest(f"{name} must be 32 hexadecimal digits")
    return value


def relative_path(args: Mapping[str, Any], name: str, allow_empty: bool = False
                  ) -> list[str]:
    """A path below a configured root, as its components."""
    value = text(args, name, "" if allow_empty else None)
    if value is None:
        raise BadRequest(f"{name} is required")
    return confine.split_relative(value, name, allow_empty=allow_empty)


def file_name(args: Mapping[str, Any], name: str) -> str:
    """A single file name (no folder part)."""
    value = text(args, name)
    if value is None:
        raise BadRequest(f"{name} is required")
    return confine.split_filename(value, name)
