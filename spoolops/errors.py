"""The one error hierarchy of spoolops.

Every exception spoolops raises on purpose is a ``SpoolError``.  Some classes
also inherit a built-in exception they resemble (as filelock's
``Timeout(TimeoutError)`` does), so callers may catch either -- but an
operation's error is never an ``OSError`` (nor ``FileNotFoundError``,
``PermissionError`` or ``TimeoutError``, which are ``OSError``s): code that
catches a vanished spool file must never swallow a request's ``NotFound``,
and a caller's ``except OSError`` must never mistake a refused request for a
system condition.  Fail closed.

``OpError`` and its subclasses are the error *types* of the reply format
(docs/design.rst): an operation raises e.g. ``Conflict("...")`` in the worker, the
reply carries ``{"type": "Conflict", ...}``, and the client raises
``Conflict`` again in the caller.  ``error_for`` maps a type name back to its
class; an unknown name fails closed to ``OpFailed``.
"""

from __future__ import annotations

from typing import Any


class SpoolError(Exception):
    """Base class of every error raised by spoolops."""


class ConfigError(SpoolError, ValueError):
    """The configuration file or a value in it is invalid."""


class SpoolSetupError(SpoolError, OSError):
    """The spool tree is missing, unreadable or has the wrong owners/modes."""


class WorkerRunning(SpoolError, RuntimeError):
    """Another worker already holds the spool's worker lock."""


class TransportUnavailable(SpoolError, ConnectionError):
    """The queue cannot be reached now (its database is down or unreachable);
    nothing was queued or answered by the call that raised it."""


class Timeout(SpoolError, TimeoutError):
    """No reply arrived within the time the caller allowed."""


class OpError(SpoolError):
    """A request failed; ``type`` is one of the reply error types.

    Raised by operations in the worker (the message goes into the reply) and
    by the client when a reply says ``ok: false`` (``reply`` is then set).
    """

    type = "OpFailed"

    def __init__(self, message: str = "", reply: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


class BadRequest(OpError, ValueError):
    """The request or its arguments are malformed or not allowed."""

    type = "BadRequest"


class UnknownOp(OpError, LookupError):
    """No operation of that name is registered."""

    type = "UnknownOp"


class PermissionDenied(OpError):
    """The submitting user may not call this operation."""

    type = "PermissionDenied"


class NotFound(OpError, LookupError):
    """A file the request names does not exist."""

    type = "NotFound"


class Conflict(OpError):
    """The target is not in the state the request expected (md5, existence)."""

    type = "Conflict"


class Expired(OpError):
    """The request's deadline passed before the worker started it."""

    type = "Expired"


class Interrupted(OpError):
    """The worker died while running a non-idempotent operation."""

    type = "Interrupted"


class Cancelled(OpError):
    """The request was withdrawn before it ran."""

    type = "Cancelled"


class OpFailed(OpError, RuntimeError):
    """The operation raised an unexpected error."""

    type = "OpFailed"


ERROR_TYPES: dict[str, type[OpError]] = {
    cls.type: cls
    for cls in (BadRequest, UnknownOp, PermissionDenied, NotFound, Conflict,
                Expired, Interrupted, Cancelled, OpFailed)
}


def error_for(type_name: str) -> type[OpError]:
    """The exception class for a reply error type (``OpFailed`` if unknown)."""
    return ERROR_TYPES.get(type_name, OpFailed)
