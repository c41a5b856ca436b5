"""The spool's folders and file names, and the rules that map names to ids.

Only the modules of ``spoolops/transport`` that implement the filesystem
spool import this: no other code in spoolops builds a spool path or name.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets

from ...formats import valid_id

# name -> mode (owner: worker user, group: submit group)
DIR_MODES: dict[str, int] = {
    "tmp": 0o2730,
    "new": 0o2730,
    "active": 0o2750,
    "failed": 0o2750,
    "replies": 0o2770,
    # one empty mark per queued or running request (and per answered one whose
    # follow-up hooks wait for a retry), named by a random token and its batch:
    # members list it (FitsStorage's reducer: pending_batches, queue_length);
    # ids are not in the names, so it tells no one what new/ holds
    "pending": 0o2770,
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
FAILING_SUFFIX = ".failing"      # work/ID.failing: the reason of a fail under way
WITHDRAWN_SUFFIX = ".withdrawn"   # tmp/ID.withdrawn: a cancelled request on its way out
MAX_REPLY_BYTES = 16 * 1024 * 1024   # the largest reply anyone reads
# the largest run record a client reads for its progress (the record's
# targets come from a request of at most max_request_bytes)
MAX_RUN_RECORD_BYTES = 16 * 1024 * 1024
# (work/'s own names -- the lock, the counters, target locks -- are the
# worker's home's: ``spoolops.workhome``)


_MARKER_RE = re.compile(r"^[0-9a-f]{16}(~[A-Za-z0-9_-]{1,200})?$")
MAX_BATCH_BYTES = 150            # its base64url must fit a file name with the token
HELD_SUFFIX = ".held"            # answered, follow-up hooks to retry: the batch waits


def marker_name(batch: str | None) -> str:
    """A new mark for a request of ``batch``: ``<16 hex>[~<batch, base64url>]``."""
    token = secrets.token_hex(8)
    if batch is None:
        return token
    raw = batch.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_BATCH_BYTES:
        raise ValueError(f"batch is {len(raw)} bytes, more than {MAX_BATCH_BYTES}")
    return token + "~" + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def valid_marker(name: object) -> bool:
    return isinstance(name, str) and bool(_MARKER_RE.fullmatch(name))


def batch_of_marker(name: str) -> str | None:
    """The batch a mark names (None: none, or a name that is no mark)."""
    if not valid_marker(name) or "~" not in name:
        return None
    encoded = name.split("~", 1)[1]
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode(
            "utf-8", "surrogatepass")
    except (ValueError, UnicodeDecodeError):
        return None


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
