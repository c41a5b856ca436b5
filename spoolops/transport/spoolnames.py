"""The spool's folders and file names, and the rules that map names to ids.

Only the modules of ``spoolops/transport`` that implement the filesystem
spool import this: no other code in spoolops builds a spool path or name.
"""

from __future__ import annotations

import hashlib
import os

from ..formats import valid_id

# name -> mode (owner: worker user, group: submit group)
DIR_MODES: dict[str, int] = {
    "tmp": 0o2730,
    "new": 0o2730,
    "active": 0o2750,
    "failed": 0o2750,
    "replies": 0o2770,
    # setgid like the rest, so that staged replies take the submit group
    # whatever the worker user's primary group (older trees: 0700)
    "work": 0o2700,
}
ROOT_MODE = 0o2755
# the state a request is in -> its folder
STATE_FOLDERS = {"queued": "new", "running": "active", "failed": "failed", "replies": "replies"}
REQUEST_SUFFIX = ".json"
RUN_SUFFIX = ".json.run"
REASON_SUFFIX = ".reason"
STAGED_REPLY_SUFFIX = ".reply"
WITHDRAWN_SUFFIX = ".withdrawn"   # tmp/ID.withdrawn: a cancelled request on its way out
LOCK_NAME = "worker.lock"
STATS_NAME = "stats.json"
LOCKS_DIR = "locks"               # work/locks/: the per-target locks


def id_from_name(name: str) -> str | None:
    """The request id a spool file name carries, or None if it carries none."""
    if name.endswith(REQUEST_SUFFIX):
        rid = name[: -len(REQUEST_SUFFIX)]
        if valid_id(rid):
            return rid
    return None


def reason_file_name(name: str) -> str:
    """``NAME.reason``; a name too long for the suffix is shortened with a hash."""
    full = name + REASON_SUFFIX
    if len(os.fsencode(full)) + len(".tmp") <= 255:
        return full
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    return os.fsdecode(os.fsencode(name)[:200]) + f"~{digest}" + REASON_SUFFIX
