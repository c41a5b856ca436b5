"""``echo``: returns its arguments.  For health checks and benchmarks.

Touches no file, so it has no target, is idempotent, and runs inline on the
worker's dispatch thread (it returns at once, so it can block nobody).
"""

from __future__ import annotations

from typing import Any

from . import NO_TARGETS, SITE_DEFAULT, OpContext, Operation


def run_echo(ctx: OpContext, args: dict[str, Any]) -> dict[str, Any]:
    return args


ECHO = Operation(
    name="echo",
    run=run_echo,
    targets=NO_TARGETS,
    allowed_users=SITE_DEFAULT,
    idempotent=True,
    inline=True,
    description="Return the arguments unchanged.",
    schema={"*": "any JSON value"},
)
