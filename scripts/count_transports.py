#!/usr/bin/env python3
"""Count the test functions that run on both transports, on PostgreSQL only,
and on the spool only (or on no queue at all).

Usage (from the project folder)::

    .venv/bin/python scripts/count_transports.py             # the counts
    .venv/bin/python scripts/count_transports.py --list      # and each function's class
    .venv/bin/python scripts/count_transports.py tests/contract   # a part of the suite

It collects the suite as ``pytest --collect-only -q`` does (in-process, to
see each test's fixtures too) and classifies the node ids.  A *test
function* is a node id without its parameter id (``file::name``).  Its
class:

- ``both``: among its nodes' parameter ids, split at ``-``, one has the part
  ``spool`` and one the part ``postgresql`` (the ``queue``/``served``
  fixtures and ``parametrize("kind", TRANSPORTS)`` make exactly these ids);
- ``postgresql``: its nodes name ``postgresql`` and never ``spool``; or
  they name neither and either its file is a PostgreSQL file
  (``test_pg*.py``, ``test_*_pg.py``) or it uses the ``pgq`` or
  ``pg_cluster`` fixture;
- ``spool``: everything else -- nodes that name ``spool`` alone, and the
  tests with no transport parameter and no PostgreSQL fixture outside the
  PostgreSQL files (they run on the spool, or on no queue at all: parsing,
  configuration, FITS code).

The node counts (one per parametrised case) are printed beside the
function counts.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
PG_FILE = re.compile(r"(^|/)test_pg[^/]*\.py$|(^|/)test_[^/]*_pg\.py$")
PG_FIXTURES = {"pgq", "pg_cluster"}


class _Collector:
    def __init__(self) -> None:
        self.items: list[tuple[str, set[str]]] = []

    def pytest_collection_finish(self, session) -> None:
        self.items = [(item.nodeid, set(getattr(item, "fixturenames", ())))
                      for item in session.items]


def collect(args: list[str]) -> list[tuple[str, set[str]]]:
    collector = _Collector()
    os.chdir(PROJECT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args],
                           plugins=[collector])
    if code not in (0, 5):
        sys.exit(f"collection failed ({code}):\n{out.getvalue()}")
    return collector.items


def split(node: str) -> tuple[str, str]:
    """(function, parameter id) of a node id."""
    if node.endswith("]") and "[" in node:
        at = node.index("[")
        return node[:at], node[at + 1:-1]
    return node, ""


def classify(items: list[tuple[str, set[str]]]) -> dict[str, tuple[str, int]]:
    kinds: dict[str, set[str]] = defaultdict(set)
    fixtures: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    for node, used in items:
        function, param = split(node)
        counts[function] += 1
        parts = set(param.split("-")) if param else set()
        kinds[function] |= parts & {"spool", "postgresql"}
        fixtures[function] |= used
    out = {}
    for function, seen in kinds.items():
        path = function.split("::", 1)[0]
        pg_only = not seen and (PG_FILE.search(path) or fixtures[function] & PG_FIXTURES)
        if seen == {"spool", "postgresql"}:
            cls = "both"
        elif seen == {"postgresql"} or pg_only:
            cls = "postgresql"
        else:
            cls = "spool"
        out[function] = (cls, counts[function])
    return out


def main() -> None:
    listing = "--list" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--list"]
    found = classify(collect(args))
    if listing:
        for function, (cls, n) in sorted(found.items()):
            print(f"{cls:10} {n:3}  {function}")
    total_f = total_n = 0
    for cls in ("both", "postgresql", "spool"):
        functions = [n for c, n in found.values() if c == cls]
        total_f += len(functions)
        total_n += sum(functions)
        print(f"{cls:10} {len(functions):4} test functions  {sum(functions):4} nodes")
    print(f"{'total':10} {total_f:4} test functions  {total_n:4} nodes")


if __name__ == "__main__":
    main()
