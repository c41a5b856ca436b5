"""Operator actions on the tree: create or repair it, requeue, cancel; and
the identity they run under.

``init_tree`` gives every spool folder the owner, group and mode of the
design (setgid everywhere, so files take the submit group).  Run as root it
may hand the tree to any worker user; run as anyone else it only proceeds
when it can do everything itself (the worker user is the caller), and
otherwise refuses with a message saying so.

``become_worker_user``: a command that writes into the spool (worker,
janitor, cancel, requeue) and is started as root switches to the worker
user first, so that every file it creates has the owner, group and mode the
worker would give it (a root-owned ``work/worker.lock`` or a reply in group
root would lock the worker or the client out); so do the operator's views
(status, ls, show, tail), which read what others wrote and signal the
worker, so that root's privileges never serve a rigged file.

Trusts: the configuration and the caller's privileges -- not the tree,
which the worker account owns: owners and modes are changed through folder
descriptors (``files.ensure_tree``), never through a symbolic link, never
by name after a check.
"""

from __future__ import annotations

import grp
import os
import pwd
import time
from dataclasses import dataclass
from typing import Any

from .config import Config
from .dispatch import make_reply
from .errors import Cancelled, SpoolError, SpoolSetupError
from .files import ensure_dir
from .formats import parse_iso, valid_id
from .transport import open_transport
from .users import user_name

invoked_by: str | None = None   # the account this process was started as, once it switched
STORAGE_MODE = 0o2755
STAGING_MODE = 0o2770


@dataclass(frozen=True)
class Accounts:
    worker_user: str
    worker_uid: int
    group: str
    gid: int


def resolve_accounts(config: Config, worker_user: str | None = None,
                     group: str | None = None) -> Accounts:
    """The worker user and submit group: arguments, then config, then defaults
    (the calling user, and the worker user's primary group)."""
    user = worker_user or config.worker_user or pwd.getpwuid(os.getuid()).pw_name
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise SpoolSetupError(f"worker user {user!r} does not exist") from None
    group_name = group or config.group or grp.getgrgid(pw.pw_gid).gr_name
    try:
        gr = grp.getgrnam(group_name)
    except KeyError:
        raise SpoolSetupError(f"submit group {group_name!r} does not exist") from None
    if pw.pw_gid != gr.gr_gid and user not in gr.gr_mem:
        raise SpoolSetupError(f"worker user {user!r} is not a member of the submit group"
                              f" {group_name!r} (it reads requests through the group):"
                              f" usermod -aG {group_name} {user}")
    return Accounts(user, pw.pw_uid, group_name, gr.gr_gid)


def become_worker_user(config: Config) -> str | None:
    """Run the rest of this process as the worker user, if started as root.

    Returns the user switched to, or None (not root, or the worker user is
    root).  Irreversible: supplementary groups, gid and uid all change, as
    systemd's ``User=`` or ``runuser`` would set them.  ``SpoolSetupError``
    when the worker user cannot be told (no ``[spool] worker_user`` and no
    tree): the command then does nothing as root.
    """
    if os.geteuid() != 0:
        return None
    uid = open_transport(config).worker_uid()
    if uid == 0:
        return None
    pw = pwd.getpwuid(uid)
    global invoked_by
    invoked_by = invoked_by or user_name(os.getuid())
    os.initgroups(pw.pw_name, pw.pw_gid)
    os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
    os.setresuid(uid, uid, uid)
    os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    return pw.pw_name


def init_tree(config: Config, accounts: Accounts, **options: Any) -> list[str]:
    """Create or repair the spool (and the data folders, if missing); returns
    one line per change made.  ``options`` go to the transport (the
    PostgreSQL queue's administrator connection and login roles)."""
    if options.get("database_only"):
        return open_transport(config).create(accounts.worker_uid, accounts.gid, **options)
    is_root = os.geteuid() == 0
    if not is_root:
        if accounts.worker_uid != os.geteuid():
            raise SpoolSetupError(
                f"only root can give the spool to worker user {accounts.worker_user!r};"
                " run 'spoolops init' as root (or as that user)")
        if accounts.gid not in os.getgroups() and accounts.gid != os.getegid():
            raise SpoolSetupError(f"only root can give the spool to group {accounts.group!r}"
                                  " (you are not a member); run 'spoolops init' as root")
    changes = open_transport(config).create(accounts.worker_uid, accounts.gid, **options)
    for path, mode in ((config.storage_root, STORAGE_MODE),
                       (config.upload_staging_dir, STAGING_MODE)):
        if not os.path.lexists(path):
            ensure_dir(path, mode, accounts.worker_uid, accounts.gid, changes)
    return changes


def requeue(config: Config, rid: str) -> str:
    """Put ``rid`` back in line: from the failed ones, or (when no worker
    runs) from the orphans.  Where it came from; ``SpoolSetupError`` if not."""
    return open_transport(config).requeue(rid)


def cancel_request(config: Config, rid: str) -> bool:
    """Withdraw a queued request.  Run by root or the worker user, it also
    publishes a ``Cancelled`` reply so that a client waiting for it wakes up
    (``Client.cancel`` writes none: that client knows)."""
    transport = open_transport(config)
    if not valid_id(rid):
        return False
    answer = None
    # only the worker's identity writes replies a client trusts (root switched
    # to the worker user before calling this: see become_worker_user)
    if transport.may_answer():
        info = transport.describe(rid) or {}
        since = info.get("since")
        answer = make_reply(rid, op=None, user=info.get("owner") or "unknown",
                            queued_at=parse_iso(since) if since else time.time(),
                            error=Cancelled(f"withdrawn by {_invoker()} with 'spoolops cancel'"))
    return transport.withdraw(rid, answer)


def _invoker() -> str:
    """Who ran the command: the account behind sudo, the one that started this
    process (before become_worker_user), else this one."""
    return os.environ.get("SUDO_USER") or invoked_by or user_name(os.geteuid())


def poke_worker(config: Config) -> None:
    """Ask the running worker (if this process may signal it) to look at the
    queue now: a request was put back.  Harmless when none runs."""
    try:
        transport = open_transport(config)
        if transport.worker_alive()[0]:
            transport.load_stats(fresh=True)
    except (SpoolError, OSError):
        pass
