"""What the test files share: one package, imported by name (``from
support.env import ...``); ``tests/`` is on ``sys.path`` (setup.cfg's
``[tool:pytest] pythonpath``).  Test files and ``conftest.py`` import from
here; nothing here imports a test file or ``conftest``.

- ``env``: the test environments' one face (``Env``) and its spool and
  PostgreSQL kinds, run by the test's own account (``SpoolEnv``, ``PgEnv``);
- ``accounts``: real unix accounts, and ``Deployment`` -- the same face on a
  tree ``spoolops init`` made for them;
- ``waiting``: waits with deadlines (``wait_for``, ``wait_log``, ``Lines``);
- ``requires``: what a test needs of the host (``unavailable``,
  ``require_fitsverify``, ``is_root``);
- ``contract``: requests, replies and handles of the transport contract suite;
- ``fitsfiles``: FITS files to test with; ``fitsarchive``: a FitsStorage
  archive database for the sample site package.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
PROJECT = TESTS.parent
SITEOPS = TESTS / "siteops"       # the test site operations the workers run
