"""What a test needs of the host, and how it says that it cannot run here.

``unavailable(reason)`` is a skip with its reason, except in CI
(``CI=true``), where a missing tool or an unusable account fails the run
instead of passing it silently.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip with ``reason`` -- or, in CI, fail: CI must run every test."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: everything must run here)", pytrace=False)
    pytest.skip(reason)


def require_fitsverify() -> str:
    """The path of ``fitsverify``, the independent judge of FITS files."""
    found = shutil.which("fitsverify")
    if found is None:
        unavailable("fitsverify is not installed (Debian package fitsverify):"
                    " no independent verdict on the FITS files")
    return found


def is_root() -> bool:
    return os.geteuid() == 0
