"""``spoolops doctor``: print one line per problem found, with its fix.

Exit codes (docs/design.rst: 0 ok, 1 problems): 0 when every check passes, 1 when
any does not -- a configuration file that does not parse is a problem like
any other (exit 1, not the usage code 2), so that monitoring which runs
``spoolops doctor`` sees one meaning per code: 1 = the deployment needs a fix.
Only a command line that argparse rejects exits 2.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..doctor import run_checks
from .common import Exit
from .text import printable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--all", action="store_true",
                        help="also print the checks that passed")
    parser.add_argument("--json", action="store_true",
                        help="print the findings as one JSON list")


def run(args: argparse.Namespace) -> int:
    findings = run_checks(getattr(args, "config", None), root=getattr(args, "root", None))
    problems = [f for f in findings if not f.ok]
    if getattr(args, "json", False):
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        for finding in findings:
            if getattr(args, "all", False) or not finding.ok:
                # a finding quotes paths, user and group names, what the
                # database or the worker account answered: one line, printable
                print(printable(finding.line()))
        if problems:
            print(f"doctor: {len(problems)} problem(s) in {len(findings)} checks")
        else:
            print(f"doctor: all {len(findings)} checks passed")
    return Exit.FAIL if problems else Exit.OK
