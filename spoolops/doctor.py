"""``spoolops doctor``: check a deployment, report what is wrong and how to fix it.

Checks that the configuration parses; that the worker user and submit group
exist, the worker user is not root and is in the group; that every spool
folder has the owner, group and mode of docs/design.rst (setgid included) and that
they all sit on one filesystem (every move in the spool is a rename); that
the spool, ``storage_root`` and ``upload_staging_dir`` are on local
filesystems (inotify does not see changes made by other hosts on NFS/CIFS);
that ``storage_root`` is not writable by the group or others; and what the
transport checks of itself (the spool: the kernel's inotify limits;
PostgreSQL: schema, roles, row-level security, workers).

Library only: returns ``Finding`` objects, never prints.  Trusts the
configuration file it is given; reads /proc and the user/group databases;
changes nothing.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ALL_USERS, Config, load_config
from .errors import ConfigError, SpoolSetupError
from .transport import Transport, open_transport, transport_class

# where the durable submit and cancel are known to be durable without
# reading new/ (an fsync of a renamed file commits the rename's transaction)
ORDERED_FS = frozenset({"ext4", "xfs"})
# filesystems whose changes made on another host inotify never reports
NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "ceph", "glusterfs",
    "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.ceph", "lustre", "gpfs", "9p",
    "beegfs", "ocfs2", "gfs2", "davfs", "fuse.rclone", "virtiofs"})


@dataclass(frozen=True)
class Finding:
    """One check: ``ok`` or a problem with the fix an operator should apply."""

    check: str
    ok: bool
    message: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok       {self.check}: {self.message}"
        return f"PROBLEM  {self.check}: {self.message}" + (f" -- fix: {self.fix}"
                                                          if self.fix else "")


def run_checks(config_path: str | os.PathLike | None = None,
               root: str | os.PathLike | None = None) -> list[Finding]:
    """Every check, in order; a config that does not parse stops the rest."""
    try:
        config = load_config(config_path, root=root)
    except ConfigError as exc:
        return [Finding("config", False, str(exc),
                        "correct the file (see etc/spoolops.conf for a sample)")]
    source = config.source or "defaults (no config file found)"
    findings = [Finding("config", True, f"parsed {source}")]
    try:
        folders = transport_class(config).submit_group_folders
    except SpoolSetupError as exc:
        return findings + [Finding("transport", False, str(exc), "install what it names")]
    # web users reach the queue through the submit group's folders (their
    # members), or through the transport's own identities; what else it
    # knows to check it says itself (``diagnose``: inotify's limits; the
    # database's roles, grants, row-level security)
    findings += check_accounts(config, groups=folders)
    findings += check_tree(config)
    if folders:
        findings += check_groups(config)
    findings += check_filesystems(config)
    findings += check_transport(config)
    findings += check_hooks(config)
    return findings


def check_hooks(config: Config) -> list[Finding]:
    """Follow-up hook calls that failed (kept in the worker's folder), read
    as the worker user: the folder is the worker account's."""
    if os.geteuid() == 0 and config.worker_user:
        return _in_worker_child(config, lambda: [[f.check, f.ok, f.message, f.fix] for f
                                                 in _hook_findings(config)],
                                ["hooks", "run 'spoolops hooks' as the worker user"])
    return _hook_findings(config)


def _hook_findings(config: Config) -> list[Finding]:
    from .status import hook_counts
    try:
        counts = hook_counts(open_transport(config).work_dir, config.durable)
    except (SpoolSetupError, OSError):
        return []
    if counts is None:
        return []
    pending, failed = counts["pending"], counts["failed"]
    if failed:
        return [Finding("hooks", False, f"{failed} follow-up hook call(s) keep failing"
                        f" ({pending} more pending)", "see 'spoolops hooks'; mend the"
                        " cause (e.g. the archive's database), then 'spoolops hooks retry"
                        " --all'")]
    return [Finding("hooks", True, f"{pending} follow-up hook call(s) wait for a retry"
                    if pending else "no follow-up hook call waits for a retry")]


def check_transport(config: Config) -> list[Finding]:
    """What the transport knows to check about itself (the spool: the host's
    inotify limits; PostgreSQL: the database's schema, roles and row-level
    security), asked as the worker user."""
    if os.geteuid() == 0 and config.worker_user:
        return _as_worker_user(config)
    try:
        transport = open_transport(config)
        return [Finding(*item) for item in transport.diagnose()]
    except (SpoolSetupError, OSError) as exc:
        return [Finding("queue", False, str(exc), "see README, 'Deployment'")]


def _as_worker_user(config: Config) -> list[Finding]:
    """Root has no database role: ask as the worker user (its peer role), in a
    child process, since switching users cannot be undone."""
    return _in_worker_child(config, lambda: [list(item) for item in
                                             open_transport(config).diagnose()],
                            ["queue", "see README, 'Deployment'"])


def _in_worker_child(config: Config, check: Callable[[], list[list[Any]]],
                     failed: list[str]) -> list[Finding]:
    """Run ``check`` as the worker user in a child process (switching users
    cannot be undone): root reads nothing the worker account could plant."""
    import json
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child's result comes back by the pipe
        os.close(read)
        try:
            from .admin import become_worker_user
            become_worker_user(config)
            items = check()
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            items = [[failed[0], False, str(exc), failed[1]]]
        os.write(write, json.dumps(items).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    try:
        return [Finding(*item) for item in json.loads(data)]
    except (ValueError, TypeError):
        return [Finding(failed[0], False, "the check as the worker user failed")]


def _names(config: Config) -> tuple[str | None, str | None]:
    """The worker user and group the config names, else what the tree says."""
    user, group = config.worker_user or None, config.group or None
    if user is None:
        try:
            user = pwd.getpwuid(open_transport(config).worker_uid()).pw_name
        except (SpoolSetupError, KeyError):
            pass
    if group is None:
        try:
            group = grp.getgrgid(open_transport(config).submit_gid()).gr_name
        except (OSError, KeyError):
            pass
    return user, group


def check_accounts(config: Config, groups: bool = True) -> list[Finding]:
    user, group = _names(config)
    out: list[Finding] = []
    if user is None:
        return [Finding("worker user", False, "not set and no spool to learn it from",
                        "set [spool] worker_user and run 'spoolops init'")]
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return [Finding("worker user", False, f"user {user!r} does not exist",
                        f"useradd --system {user}")]
    if pw.pw_uid == 0:
        out.append(Finding("worker user", False, f"{user!r} is root: a hostile request would"
                           " be handled with every privilege",
                           "create a dedicated user (e.g. fitsdata), set [spool] worker_user"
                           " and run 'spoolops init'"))
    else:
        out.append(Finding("worker user", True, f"{user} (uid {pw.pw_uid})"))
    if not groups:
        return out
    if group is None:
        out.append(Finding("submit group", False, "not set and no spool to learn it from",
                           "set [spool] group and run 'spoolops init'"))
        return out
    try:
        gr = grp.getgrnam(group)
    except KeyError:
        out.append(Finding("submit group", False, f"group {group!r} does not exist",
                           f"groupadd --system {group}"))
        return out
    if pw.pw_gid != gr.gr_gid and user not in gr.gr_mem:
        out.append(Finding("submit group", False, f"worker user {user!r} is not a member of"
                           f" {group!r} (it reads requests through the group)",
                           f"usermod -aG {group} {user}"))
    else:
        members = sorted(set(gr.gr_mem) - {user})
        out.append(Finding("submit group", True, f"{group} (gid {gr.gr_gid}), members:"
                           f" {', '.join(members) or 'none besides the worker user'}"))
    return out


def _expect_dir(path: Path, modes: tuple[int, ...], uid: int | None, gid: int | None,
                check: str) -> Finding:
    fix = "run 'spoolops init' as root"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Finding(check, False, f"{path} is missing", fix)
    except OSError as exc:
        return Finding(check, False, f"cannot inspect {path}: {exc.strerror}", fix)
    if not stat.S_ISDIR(st.st_mode):
        return Finding(check, False, f"{path} is not a directory (or is a symbolic link)",
                       f"move it away, then {fix}")
    problems = []
    mode = stat.S_IMODE(st.st_mode)
    if mode not in modes:
        problems.append(f"mode {mode:04o}, expected {modes[0]:04o}")
    if uid is not None and st.st_uid != uid:
        problems.append(f"owner uid {st.st_uid}, expected {uid}")
    if gid is not None and st.st_gid != gid:
        problems.append(f"group gid {st.st_gid}, expected {gid}")
    if problems:
        return Finding(check, False, f"{path}: {'; '.join(problems)}", fix)
    return Finding(check, True, f"{path} {mode:04o}")


def check_tree(config: Config) -> list[Finding]:
    user, group = _names(config)
    try:
        uid = pwd.getpwnam(user).pw_uid if user else None
    except KeyError:
        uid = None
    try:
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        gid = None
    out = []
    devices = set()
    for label, path, modes in open_transport(config).layout():
        out.append(_expect_dir(path, modes, uid, gid, label))
        try:
            devices.add(os.lstat(path).st_dev)
        except OSError:
            pass
    if len(devices) > 1:
        out.append(Finding("spool filesystem", False, "the spool folders are on more than"
                           " one filesystem: renames between them fail (EXDEV)",
                           "keep the whole spool tree on one filesystem"))
    try:
        st = os.stat(config.storage_root)
    except OSError as exc:
        out.append(Finding("storage_root", False, f"{config.storage_root}: {exc.strerror}",
                           "create it, owned by the worker user ('spoolops init' does)"))
    else:
        if uid is not None and st.st_uid != uid:
            out.append(Finding("storage_root", False, f"{config.storage_root} is owned by"
                               f" uid {st.st_uid}, not the worker user",
                               f"chown {user} {config.storage_root}"))
        elif stat.S_IMODE(st.st_mode) & 0o022:
            out.append(Finding("storage_root", False, f"{config.storage_root} is writable by"
                               f" its group or others (mode {stat.S_IMODE(st.st_mode):04o}):"
                               " submitters could change data directly",
                               f"chmod go-w {config.storage_root}"))
        else:
            out.append(Finding("storage_root", True, f"{config.storage_root}"))
    if not config.upload_staging_dir.is_dir():
        out.append(Finding("upload_staging_dir", False, f"{config.upload_staging_dir} is"
                           " missing", "create it (group-writable by the submit group)"))
    return out


def check_groups(config: Config) -> list[Finding]:
    """Can each side read what the other writes?  Requests are read by the
    worker through the submit group; replies by the clients through it."""
    user, group = _names(config)
    try:
        pw = pwd.getpwnam(user) if user else None
        gr = grp.getgrnam(group) if group else None
    except KeyError:
        return []          # check_accounts has said so
    if pw is None or gr is None:
        return []
    out: list[Finding] = []
    transport = open_transport(config)
    try:
        work = os.lstat(transport.work_dir)
    except OSError:
        work = None
    if work is not None:
        reply_gid = work.st_gid if work.st_mode & stat.S_ISGID else pw.pw_gid
        if reply_gid != gr.gr_gid:
            out.append(Finding(
                "reply group", False, f"replies staged in {transport.work_dir} would take"
                f" group {_group_name(reply_gid)}, not the submit group {group}: clients"
                " could not read them (the worker then sets each reply's group itself)",
                "run 'spoolops init' as root (work/ becomes 2700, group "
                f"{group})"))
        else:
            out.append(Finding("reply group", True, f"replies take group {group}"))
    out += _check_running_worker(transport, pw, gr)
    for op, users in sorted(config.access.items()) + [("default", config.access_default)]:
        for name in users:
            if name == ALL_USERS:
                continue
            try:
                member = pwd.getpwnam(name)
            except KeyError:
                out.append(Finding("access", False, f"[access] {op} names {name!r}, who is"
                                   " not a user here", f"useradd {name}, or correct [access]"))
                continue
            if member.pw_gid != gr.gr_gid and name not in gr.gr_mem:
                out.append(Finding("access", False, f"[access] {op} allows {name!r}, who is"
                                   f" not in the submit group {group}: they cannot submit",
                                   f"usermod -aG {group} {name}"))
    return out


def _check_running_worker(transport: Transport, pw: pwd.struct_passwd,
                          gr: grp.struct_group) -> list[Finding]:
    """The running worker's process must carry the submit group: a membership
    added after it started (usermod -aG) takes effect only on restart."""
    alive, pid = transport.worker_alive()
    if not alive or pid is None:
        return []
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return []
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = int(fields.get("Uid", "-1").split()[1])
    gids = {int(g) for g in fields.get("Groups", "").split()} | {
        int(fields.get("Gid", "-1").split()[1])}
    if uid != pw.pw_uid and uid != 0:
        return [Finding("worker process", False, f"the running worker (pid {pid}) runs as uid"
                        f" {uid}, not the worker user {pw.pw_name}: clients will not trust"
                        " its replies", "restart it as the worker user")]
    if uid != 0 and gr.gr_gid not in gids:
        return [Finding("worker process", False, f"the running worker (pid {pid}) is not in"
                        f" the submit group {gr.gr_name} (its groups: {sorted(gids)}): it"
                        " started without that membership", "restart the worker"
                        " (systemctl restart spoolops-worker)")]
    return [Finding("worker process", True, f"pid {pid}, uid {uid}, in group {gr.gr_name}")]


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def mount_of(path: Path, mountinfo: str | None = None) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding ``path``."""
    if mountinfo is None:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            mountinfo = f.read()
    real = os.path.realpath(path)
    best = ("/", "unknown")
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        point = fields[4].encode().decode("unicode_escape")  # \040 for spaces
        fstype = fields[fields.index("-") + 1]
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype)
    return best


def check_filesystems(config: Config) -> list[Finding]:
    out = []
    for label, path in (("spool", config.root), ("storage_root", config.storage_root),
                        ("upload_staging_dir", config.upload_staging_dir)):
        if label == "spool" and config.transport != "spool":
            continue
        try:
            point, fstype = mount_of(path)
        except OSError as exc:
            out.append(Finding(f"{label} filesystem", False, f"cannot read mounts: {exc}"))
            continue
        if fstype in NETWORK_FS or fstype.startswith("nfs"):
            out.append(Finding(f"{label} filesystem", False,
                               f"{path} is on {fstype} ({point}): inotify does not see"
                               " changes made by other hosts",
                               "use a local filesystem on the data host (clients on other"
                               " hosts need the PostgreSQL transport)"))
        elif label == "spool" and config.durable and fstype not in ORDERED_FS:
            out.append(Finding(f"{label} filesystem", False,
                               f"{path} is on {fstype} ({point}): with durable = yes, a"
                               " submit or cancel is known to survive a power cut only on"
                               f" {' or '.join(sorted(ORDERED_FS))}",
                               "put the spool on ext4 or xfs (or accept the risk)"))
        else:
            out.append(Finding(f"{label} filesystem", True, f"{path} on {fstype} ({point})"))
    return out
