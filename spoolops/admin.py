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
root would lock the worker or the client out).

Trusts: the configuration and the caller's privileges.  Never follows a
symbolic link when changing owners or modes.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .dispatch import Dispatcher, Request, user_name
from .errors import Cancelled, SpoolSetupError
from .ops import Registry
from .spool import DIR_MODES, REQUEST_SUFFIX, Spool, valid_id

ROOT_MODE = 0o2755
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
    systemd's ``User=`` or ``runuser`` would set them.
    """
    if os.geteuid() != 0:
        return None
    uid = Spool(config.root).worker_uid(config.worker_user)
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


def init_tree(config: Config, accounts: Accounts) -> list[str]:
    """Create or repair the spool tree; returns one line per change made."""
    is_root = os.geteuid() == 0
    if not is_root:
        if accounts.worker_uid != os.geteuid():
            raise SpoolSetupError(
                f"only root can give the spool to worker user {accounts.worker_user!r};"
                " run 'spoolops init' as root (or as that user)")
        if accounts.gid not in os.getgroups() and accounts.gid != os.getegid():
            raise SpoolSetupError(f"only root can give the spool to group {accounts.group!r}"
                                  " (you are not a member); run 'spoolops init' as root")
    changes: list[str] = []
    _ensure_dir(config.root, ROOT_MODE, accounts.worker_uid, accounts.gid, changes)
    for name, mode in DIR_MODES.items():
        _ensure_dir(config.root / name, mode, accounts.worker_uid, accounts.gid, changes)
    _ensure_dir(config.root / "work" / "locks", DIR_MODES["work"], accounts.worker_uid,
                accounts.gid,
                changes)
    for path, mode in ((config.storage_root, STORAGE_MODE),
                       (config.upload_staging_dir, STAGING_MODE),
                       (config.upload_staging_dir / "processed_cals", STAGING_MODE)):
        if not os.path.lexists(path):
            _ensure_dir(path, mode, accounts.worker_uid, accounts.gid, changes)
    return changes


def _ensure_dir(path: Path, mode: int, uid: int, gid: int, changes: list[str]) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(path.parent, exist_ok=True)
        os.mkdir(path, 0o700)  # widened below, after the owner is right
        st = os.lstat(path)
        changes.append(f"created {path}")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SpoolSetupError(f"{path} exists and is not a directory (or is a link);"
                              " move it away and run 'spoolops init' again")
    if (st.st_uid, st.st_gid) != (uid, gid):
        try:
            os.chown(path, uid, gid, follow_symlinks=False)
        except PermissionError:
            raise SpoolSetupError(f"cannot chown {path} to {user_name(uid)}:{gid}:"
                                  " run 'spoolops init' as root") from None
        changes.append(f"owner of {path} set to {user_name(uid)}:{_group_name(gid)}")
    if stat.S_IMODE(st.st_mode) != mode or (st.st_uid, st.st_gid) != (uid, gid):
        os.chmod(path, mode)  # chown clears setgid: always re-apply the mode
        if stat.S_IMODE(st.st_mode) != mode:
            changes.append(f"mode of {path} set to {mode:04o}")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def requeue(spool: Spool, rid: str) -> str:
    """Put ``rid`` back in ``new/`` from ``failed/``, or from ``active/`` when no
    worker holds the lock.  Returns where it came from; raises SpoolSetupError."""
    name = rid + REQUEST_SUFFIX
    if spool.requeue_failed(name):
        return "failed"
    if not os.path.lexists(spool.active / name):
        raise SpoolSetupError(f"{rid} is neither in failed/ nor in active/")
    fd = os.open(spool.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpoolSetupError(f"{rid} is running under a live worker; it recovers"
                                  " its own orphans when restarted") from None
        if spool.staged_reply(rid) is not None:
            raise SpoolSetupError(f"{rid} finished: its reply waits in work/ and the"
                                  " worker publishes it when it starts") from None
        spool.unclaim_request(name)
        return "active"
    finally:
        os.close(fd)


def cancel_request(config: Config, rid: str) -> bool:
    """Withdraw a queued request.  Run by root or the worker user, it also
    publishes a ``Cancelled`` reply so that a client waiting for it wakes up
    (``Client.cancel`` writes none: that client knows)."""
    spool = Spool(config.root, config.durable, config.max_request_bytes)
    if not valid_id(rid):
        return False
    path = spool.new / (rid + REQUEST_SUFFIX)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, PermissionError):
        st = None
    if not spool.withdraw_request(rid):
        return False
    try:
        # only the worker user writes replies a client trusts (root switched
        # to it before calling this: see become_worker_user)
        if os.geteuid() == spool.worker_uid(config.worker_user):
            request = Request(id=rid, op="", args=None, uid=st.st_uid if st else -1,
                              user=user_name(st.st_uid) if st else "unknown",
                              queued_at=st.st_mtime if st else time.time())
            reply = Dispatcher(Registry(), config, spool.work).reply(
                request, op=None, error=Cancelled(
                    f"withdrawn by {_invoker()} with 'spoolops cancel'"))
            spool.stage_reply(rid, reply, in_place=False)
            spool.publish_reply(rid)
    except OSError:
        pass  # the cancel itself succeeded; the courtesy reply is best effort
    return True


def _invoker() -> str:
    """Who ran the command: the account behind sudo, the one that started this
    process (before become_worker_user), else this one."""
    return os.environ.get("SUDO_USER") or invoked_by or user_name(os.geteuid())
