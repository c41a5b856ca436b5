"""What every subcommand shares: exit codes, the configuration, how times
and progress read on a terminal.  (Printing happens in the subcommands.)"""

from __future__ import annotations

import argparse
from enum import IntEnum
from typing import Any

from ..config import Config, load_config


class Exit(IntEnum):
    """The exit codes of the design, one meaning each across subcommands."""

    OK = 0          # done; healthy
    FAIL = 1        # the operation failed; not found; problems or stuck work
    USAGE = 2       # usage, configuration or permission problem
    TIMEOUT = 3     # no reply in time (call)
    INTERRUPTED = 130


def config_of(args: argparse.Namespace) -> Config:
    """The configuration the command line names (``--config``, ``--root``)."""
    return load_config(getattr(args, "config", None), root=getattr(args, "root", None))


def operator_config_of(args: argparse.Namespace) -> Config:
    """``config_of`` for the read-only operator commands (``status``, ``ls``,
    ``show``, ``tail``), which switch to the worker user first when run as
    root, as ``worker``, ``janitor``, ``cancel`` and ``requeue`` do.

    On the spool they read files that members and the worker account write
    and may have rigged, and ``status`` signals the pid the worker account
    names: as the worker user, whatever slips past the checks of those reads
    and of that signal can reach nothing the worker account could not reach
    anyway.  Over PostgreSQL root has no database role of its own: it looks
    as the worker user (with peer authentication, the worker's role)."""
    from ..admin import become_worker_user
    config = config_of(args)
    become_worker_user(config)
    return config


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def progress_text(progress: dict[str, Any] | None, width: int = 30) -> str | None:
    if not progress or not progress.get("total"):
        return None
    done, total = int(progress["done"]), int(progress["total"])
    filled = int(width * done / total) if total else width
    return (f"[{'#' * filled}{'.' * (width - filled)}] {100.0 * done / total:5.1f}%"
            f"  {done / 1e6:.1f}/{total / 1e6:.1f} MB")
