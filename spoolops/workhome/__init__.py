"""The worker's home: its private folder on its own host, ``work/``.

Every transport gives the worker one (the spool: ``<root>/work``; the
PostgreSQL queue: ``<[spool] root>/work`` on each worker's host), mode
2700, the worker account's alone.  This module is the one place its names
are made; what lives there, and who writes it:

===================  ==========================================================
``worker.lock``      one worker per home: ``flock`` held for its life, its pid
                     inside (``transport/worklock.py``)
``stats.json``       the worker's counters (the transport's ``save_stats``)
``locks/``           one lock file per target, named by a digest (dispatch)
``memos/``           a request's notes for its own re-run (``memos``)
``temps/``           records of operations' temporary files (``workhome.temps``)
``journals/``        header rewrites in flight (``fits.journal``)
``hooks/``           follow-up hook calls kept for a retry (``hookledger``)
``*.tmp``, ...       a transport's own staging (the spool's staged replies)
===================  ==========================================================

Trusts: nothing; it names things.  Whoever opens a name decides how far it
trusts what is there (root's tools read the worker account's files as
hostile).
"""

from __future__ import annotations

import os
from pathlib import Path

LOCK_NAME = "worker.lock"
STATS_NAME = "stats.json"
TARGET_LOCKS_DIR = "locks"
MEMOS_DIR = "memos"
TEMPS_DIR = "temps"
JOURNALS_DIR = "journals"
HOOKS_DIR = "hooks"
# files of the home itself (not a dead worker's leftovers)
OWN_FILES = frozenset({LOCK_NAME, STATS_NAME})
# the folders inside it that ``spoolops init`` makes (the rest appear on use)
MADE_BY_INIT = (TARGET_LOCKS_DIR,)


def lock_path(work: str | Path) -> Path:
    return Path(work) / LOCK_NAME


def stats_path(work: str | Path) -> Path:
    return Path(work) / STATS_NAME


def target_lock_path(work: str | Path, digest: str) -> Path:
    return Path(work) / TARGET_LOCKS_DIR / f"{digest}.lock"


def leftovers_pending(work: str | Path) -> bool:
    """Whether a dead worker left work in this home that only recovery may
    touch: a header rewrite's journal, an operation's temporary files."""
    for sub in (JOURNALS_DIR, TEMPS_DIR):
        try:
            with os.scandir(Path(work) / sub) as it:
                if any(it):
                    return True
        except (FileNotFoundError, NotADirectoryError):
            continue
    return False
