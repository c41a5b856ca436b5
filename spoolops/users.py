"""Account names for uids and gids, as the system databases give them.

Cached briefly: ``getpwuid`` may read /etc/passwd on every call, and the
worker names the submitter of every request.  Trusts the user and group
databases.
"""

from __future__ import annotations

import grp
import pwd
import time

from .errors import SpoolSetupError

USER_CACHE_S = 60.0  # a renamed account is seen within a minute
_USER_CACHE: dict[int, tuple[float, str]] = {}


def user_name(uid: int) -> str:
    """The account name of ``uid`` (``uidN`` if it has none)."""
    now = time.monotonic()
    hit = _USER_CACHE.get(uid)
    if hit is not None and now - hit[0] < USER_CACHE_S:
        return hit[1]
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid{uid}"
    _USER_CACHE[uid] = (now, name)
    return name


def worker_uid_of(name: str) -> int:
    """The uid of the worker user a configuration names (``[spool]
    worker_user``): the one place a transport turns the name into the
    account whose replies clients trust.  ``SpoolSetupError`` if there is
    no such account here."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise SpoolSetupError(f"[spool] worker_user {name!r} is not a user on this"
                              " machine") from None


def group_name(gid: int) -> str:
    """The name of group ``gid`` (the number if it has none)."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
