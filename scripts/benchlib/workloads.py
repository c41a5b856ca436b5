"""Runs the selected workloads in order and collects their rows.

A workload that cannot run (its operation is not installed yet) or fails
yields rows marked ``n/a`` with the reason, and the bench goes on.

Trusts: the temporary folder ``base``.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from .systems import Systems


def _na(rows: list[dict[str, Any]], workload: str, why: str) -> None:
    rows.append({"workload": workload, "spoolops": f"n/a ({why})", "baseline": None,
                 "ratio": None, "target": None, "note": "n/a"})


def _has_update_headers() -> bool:
    try:
        from spoolops.ops.headers import UPDATE_HEADERS  # noqa: F401
    except ImportError:
        return False
    return True


def run_all(base: Path, only: list[str], quick: bool, results: dict[str, Any],
            rows: list[dict[str, Any]], log: Any) -> None:
    systems = None
    try:
        if {"echo", "hol", "plain", "compressed"} & set(only):
            log("starting workers, baseline servers and client processes")
            systems = Systems(base / "systems", with_dbpoll="echo" in only)
        for name in only:
            log(f"workload {name}")
            try:
                _run_one(name, base, systems, quick, results, rows, log)
            except Exception as exc:  # noqa: BLE001 - one broken workload must not stop the rest
                traceback.print_exc()
                _na(rows, name, f"error: {type(exc).__name__}: {exc}")
    finally:
        if systems is not None:
            systems.close()


def _run_one(name: str, base: Path, systems: Systems | None, quick: bool,
             results: dict[str, Any], rows: list[dict[str, Any]], log: Any) -> None:
    if name == "echo":
        from . import w_echo
        results["echo"] = w_echo.run(systems, quick, log)
        rows += w_echo.rows(results["echo"])
    elif name in ("hol", "plain", "compressed"):
        if not _has_update_headers():
            _na(rows, {"hol": "2 head-of-line", "plain": "3 update_headers plain",
                       "compressed": "4 update_headers compressed"}[name],
                "update_headers not available")
            return
        from . import w_fits
        getattr(w_fits, f"run_{name}")(base / "fits", systems, quick, results, rows, log)
    elif name == "backlog":
        from . import w_backlog
        results["backlog"] = w_backlog.run(base / "backlog", quick, log)
        rows += w_backlog.rows(results["backlog"])
    elif name == "janitor":
        from . import w_janitor
        results["janitor"] = w_janitor.run(base / "janitor", quick, log)
        rows += w_janitor.rows(results["janitor"])
    elif name == "idle":
        from . import w_idle
        results["idle"] = w_idle.run(base / "idle", quick, log)
        rows += w_idle.rows(results["idle"])
    elif name == "fitsstorage":
        from . import w_fitsstorage
        results["fitsstorage"] = w_fitsstorage.run(base / "fitsstorage", quick, log)
        rows += w_fitsstorage.rows(results["fitsstorage"])
    elif name == "pg":
        from . import w_pg
        results["pg"] = w_pg.run(base / "pg", quick, log)
        rows += w_pg.rows(results["pg"])
