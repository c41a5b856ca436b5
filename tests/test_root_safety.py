"""Root's commands against a spool that the worker account or a member has rigged.

Issue 19 (filesystem spool hardening).  Root runs ``spoolops status``,
``ls``, ``show``, ``tail`` and ``init`` on a tree that others can write
into; each test here plants what such an account can plant, as that real
unix account (``tests/support/accounts.py``), and checks that root's command does
not do the attacker's bidding:

- finding 1 (a compromised worker account): ``work/worker.lock`` and
  ``work/stats.json`` naming a root process, ``-1`` or ``0`` must not get a
  SIGUSR1 from root's ``status`` (the ``-1``/``0`` cases run in a PID
  namespace of their own, so that a regression signals nothing outside
  it); a symbolic link or a FIFO in their place must neither hang ``status``
  nor leak what the link points at;
- finding 2 (a member): symbolic links (to a root-only file, to
  ``/dev/zero``) and FIFOs named like replies or requests must not make
  root's ``ls``, ``show`` or ``tail`` print a secret, hang, or run out of
  memory -- nor a link named ``Z.reason`` that the worker itself moves into
  ``failed/``;
- finding 5 (a compromised worker account): a spool folder replaced by a
  symbolic link -- before ``init`` runs, or at the very moment ``init``
  first touches that folder by name -- must not make root's ``init``
  change the owner or mode of what the link points at.

Root's commands run with a cap on their address space (``/dev/zero`` must
not take the machine's memory) and a deadline (a FIFO must not hang the
suite); a command that misses its deadline fails the test.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from support.accounts import GROUP, WEB, WORKER, Deployment, capped, spoolops_as_root
from support.requires import unavailable
from support.waiting import Lines, wait_for

pytestmark = pytest.mark.accounts

DEADLINE_S = 20.0            # a command that takes longer hangs
TOKEN = "ROOT-ONLY-SECRET-7c1e"


# root's commands fail the test when they take longer than DEADLINE_S
as_root = functools.partial(spoolops_as_root, timeout=DEADLINE_S)


def assert_clean(done: subprocess.CompletedProcess, *codes: int) -> None:
    """Exited with one of ``codes``, no traceback, no secret."""
    out = done.stdout + done.stderr
    assert done.returncode in codes, (done.returncode, out)
    assert "Traceback" not in out and "MemoryError" not in out, out
    assert TOKEN not in out, f"the root-only secret leaked: {out}"


def root_secret(dep: Deployment) -> Path:
    """A root-only file (0600 in a 0700 folder), JSON so that every reader
    that parses it would show it."""
    folder = dep.base / "rootonly"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    secret = folder / "secret.json"
    secret.write_text(json.dumps({"version": 1, "id": TOKEN, "op": TOKEN, "ok": True,
                                  "submitted_by": TOKEN, "served": TOKEN,
                                  "started_ts": 0, "args": {"filename": TOKEN},
                                  "outcomes": {TOKEN: {"ok": 1}}}) + "\n")
    os.chmod(secret, 0o600)
    return secret


def as_account(dep: Deployment, user: str, code: str, *args: str) -> None:
    done = dep.py(user, code, *args)
    assert done.returncode == 0, f"as {user}: {done.stderr}"


def sleeper(*prefix: str) -> subprocess.Popen:
    """A process whose death by SIGUSR1 (sleep's default) shows it was signalled."""
    return subprocess.Popen([*prefix, "sleep", "600"], stdin=subprocess.DEVNULL,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


# -- finding 1: root's status signals whatever the worker account names ----------------

HOLDER = """
import fcntl, json, os, sys, time
work, pid_text, stats_pid = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
fd = os.open(os.path.join(work, "worker.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, (pid_text.replace("self", str(os.getpid())) + "\\n").encode(), 0)
if stats_pid is not None:
    stats = {"pid": stats_pid, "started_ts": time.time() - 60, "served": 7,
             "outcomes": {}, "buckets": [], "histograms": {}}
    with open(os.path.join(work, "stats.json.tmp"), "w") as f:
        json.dump(stats, f)
    os.rename(os.path.join(work, "stats.json.tmp"), os.path.join(work, "stats.json"))
print("holding", flush=True)
sys.stdin.read()
"""


def hold_lock(dep: Deployment, pid_text: str, stats_pid: int | None) -> subprocess.Popen:
    """A process of the worker account holding ``work/worker.lock`` with
    ``pid_text`` in it (``self``: its own pid) and, unless ``stats_pid`` is
    None, a ``work/stats.json`` claiming that pid -- what a compromised worker
    account can write."""
    holder = subprocess.Popen(["runuser", "-u", WORKER, "--", dep.accounts.python, "-c",
                               HOLDER, str(dep.root / "work"), pid_text,
                               json.dumps(stats_pid)],
                              env=dep.env(WORKER), cwd="/", stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = Lines(holder.stdout).next(time.monotonic() + 60)
    assert line == "holding\n", holder.stderr.read() if holder.poll() is not None else line
    return holder


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    holder.wait(30)


def test_status_never_signals_a_root_process_the_worker_account_names(
        fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    victim = sleeper()                                     # root's
    bystander = sleeper("setpriv", f"--reuid={WORKER}", f"--regid={WORKER}",
                        "--clear-groups", "--")            # the worker's, not named
    holder = hold_lock(dep, str(victim.pid), victim.pid)
    try:
        for extra in ((), ("--json",), ("--prometheus",)):
            done = as_root(dep, "status", *extra)
            assert_clean(done, 0, 1)
            assert victim.poll() is None, f"root's status signalled root's pid {victim.pid}"
        assert bystander.poll() is None and holder.poll() is None
    finally:
        release(holder)
        stop(victim)
        stop(bystander)


NAMESPACE_DRIVER = """
import json, subprocess, sys
python, worker = sys.argv[1], sys.argv[2]
canaries = {
    "root": subprocess.Popen(["sleep", "600"]),
    "worker": subprocess.Popen(["setpriv", "--reuid=" + worker, "--regid=" + worker,
                                "--clear-groups", "--", "sleep", "600"]),
}
results = []
for extra in ([], ["--json"], ["--prometheus"]):
    try:
        done = subprocess.run([python, "-m", "spoolops", "status", *extra],
                              capture_output=True, text=True, timeout=20,
                              start_new_session=True)
        results.append([done.returncode, done.stdout + done.stderr])
    except subprocess.TimeoutExpired:
        results.append(["hung", ""])
alive = {name: proc.poll() is None for name, proc in canaries.items()}
for proc in canaries.values():
    proc.kill()
    proc.wait()
print(json.dumps({"results": results, "alive": alive}))
"""


@pytest.mark.parametrize("planted", ["-1", "0"])
def test_status_never_signals_every_process(fresh_deployment: Deployment,
                                            planted: str) -> None:
    """``kill(-1)`` as root is every process of the host, ``kill(0)`` the
    caller's process group: root's ``status`` runs in a PID namespace of its
    own here (and in a session of its own), beside two canaries, so that
    whatever it signals, it signals nothing outside."""
    dep = fresh_deployment
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--", "true"],
                           check=False, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        unavailable(f"cannot make a PID namespace to run this in: {probe.stderr.strip()}")
    holder = hold_lock(dep, planted, int(planted))
    try:
        done = subprocess.run([*capped(), "unshare", "--pid", "--fork", "--mount-proc", "--",
                               dep.accounts.python, "-c", NAMESPACE_DRIVER,
                               dep.accounts.python, WORKER],
                              check=False, env=dep.env(None), cwd="/", capture_output=True,
                              text=True, timeout=240, start_new_session=True)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        for code, out in report["results"]:
            assert code in (0, 1), f"status ended with {code} (a signal?): {out}"
            assert "Traceback" not in out, out
        assert report["alive"] == {"root": True, "worker": True}, report
        assert holder.poll() is None
    finally:
        release(holder)


@pytest.mark.parametrize("kind", ["stats-symlink", "stats-fifo", "lock-fifo"])
def test_status_with_a_link_or_fifo_for_stats_or_lock(fresh_deployment: Deployment,
                                                      kind: str) -> None:
    dep = fresh_deployment
    secret = root_secret(dep)
    work = dep.root / "work"
    holder = None
    if kind.startswith("stats"):
        holder = hold_lock(dep, "self", None)         # a live lock: status reads stats
        plant = (f"os.symlink({str(secret)!r}, {str(work / 'stats.json')!r})"
                 if kind == "stats-symlink" else f"os.mkfifo({str(work / 'stats.json')!r})")
    else:
        plant = (f"os.unlink({str(work / 'worker.lock')!r}) if os.path.lexists("
                 f"{str(work / 'worker.lock')!r}) else None\n"
                 f"os.mkfifo({str(work / 'worker.lock')!r})")
    as_account(dep, WORKER, "import os\n" + plant)
    try:
        for extra in ((), ("--json",), ("--prometheus",)):
            start = time.monotonic()
            done = as_root(dep, "status", *extra, timeout=10)
            assert_clean(done, 0, 1)
            assert time.monotonic() - start < 10
    finally:
        if holder is not None:
            release(holder)


# -- finding 2: root's ls, show and tail read what members planted --------------------

def plant_entries(dep: Deployment, folder: str, secret: Path, tag: str) -> dict[str, str]:
    """As a member: in ``folder`` a link to the root-only secret, a FIFO and a
    link to /dev/zero, each named like a request or reply; their ids."""
    ids = {"secret": f"plant-{tag}-secret", "fifo": f"plant-{tag}-fifo",
           "zero": f"plant-{tag}-zero"}
    where = dep.root / folder
    as_account(dep, WEB, f"""
import os
import re
where = {str(where)!r}
os.symlink({str(secret)!r}, os.path.join(where, {ids['secret'] + '.json'!r}))
os.mkfifo(os.path.join(where, {ids['fifo'] + '.json'!r}))
os.symlink("/dev/zero", os.path.join(where, {ids['zero'] + '.json'!r}))
""")
    return ids


@pytest.mark.parametrize("folder", ["replies", "new"])
def test_ls_and_show_do_not_follow_what_a_member_planted(fresh_deployment: Deployment,
                                                         folder: str) -> None:
    dep = fresh_deployment                              # no worker: new/ keeps them
    ids = plant_entries(dep, folder, root_secret(dep), folder)
    for args in (("ls", folder), ("ls",), ("ls", folder, "--json"), ("status", "--json")):
        assert_clean(as_root(dep, *args), 0, 1)
    for rid in ids.values():
        for extra in ((), ("--json",)):
            done = as_root(dep, "show", rid, *extra)
            assert_clean(done, 0)
            assert rid in done.stdout


def test_tail_does_not_follow_what_a_member_renames_into_replies(
        fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    secret = root_secret(dep)
    replies = dep.root / "replies"
    tail = subprocess.Popen([*capped(), dep.accounts.python, "-m", "spoolops", "tail",
                             "--json"], env=dep.env(None), cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = Lines(tail.stdout)
    seen: list[str] = []
    rename_in = """
import os, sys
replies, kind, target, name = sys.argv[1:]
staged = os.path.join(replies, "." + name)
if kind == "fifo":
    os.mkfifo(staged)
else:
    os.symlink(target, staged)
os.rename(staged, os.path.join(replies, name))
"""
    try:
        deadline = time.monotonic() + 60
        n = 0
        # tail has set its watches once it reports an event: plant until it does
        while not seen:
            assert time.monotonic() < deadline, "tail never reported an event"
            assert tail.poll() is None, tail.stderr.read()
            n += 1
            as_account(dep, WEB, rename_in, str(replies), "link", str(secret),
                       f"tail-secret-{n}.json")
            line = lines.next(time.monotonic() + 1.0)
            if line is not None:
                seen.append(line)
        for kind, target in (("fifo", ""), ("link", "/dev/zero"), ("link", str(secret))):
            n += 1
            as_account(dep, WEB, rename_in, str(replies), kind, target, f"tail-{kind}-{n}.json")
            line = lines.next(time.monotonic() + DEADLINE_S)
            assert line is not None, (f"tail stopped reporting after a planted {kind}"
                                      f" ({tail.poll()}): {seen}")
            seen.append(line)
        assert tail.poll() is None, "tail died"
    finally:
        tail.send_signal(signal.SIGTERM)
        try:
            tail.wait(30)
        except subprocess.TimeoutExpired:
            tail.kill()
            tail.wait(30)
    err = tail.stderr.read()
    assert TOKEN not in "".join(seen) + err, f"the root-only secret leaked: {seen}"
    assert "Traceback" not in err and "MemoryError" not in err, err


def test_a_link_named_like_a_reason_moved_to_failed_by_the_worker(
        fresh_deployment: Deployment) -> None:
    """The persistent form: ``Z.reason`` (a link to a root-only file) renamed
    into ``new/`` is moved to ``failed/`` by the worker -- where it reads as
    the reason of an entry ``Z``."""
    dep = fresh_deployment
    secret = root_secret(dep)
    dep.start_worker()
    as_account(dep, WEB, f"""
import os
import re
os.symlink({str(secret)!r}, {str(dep.root / 'tmp' / 'Z.reason')!r})
os.rename({str(dep.root / 'tmp' / 'Z.reason')!r}, {str(dep.root / 'new' / 'Z.reason')!r})
""")
    failed = dep.root / "failed"
    wait_for(lambda: (failed / "Z.reason.reason").exists(), timeout=60,
             what="the worker to move Z.reason into failed/")
    assert os.path.islink(failed / "Z.reason")
    for args in (("ls", "failed"), ("ls", "failed", "--json"), ("ls",), ("show", "Z"),
                 ("show", "Z", "--json"), ("show", "Z.reason"), ("show", "Z.reason", "--json"),
                 ("status",)):
        assert_clean(as_root(dep, *args), 0, 1)


# -- finding 5: root's init changes what a swapped folder points at --------------------

INIT_ARGS = ("init", "--worker-user", WORKER, "--group", GROUP)


def target_of(dep: Deployment, kind: str) -> tuple[Path, Path]:
    """(what the link will point at, the file whose mode and owner must stay)."""
    secret = root_secret(dep)
    return (secret if kind == "file" else secret.parent), secret


def snapshot(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_init_refuses_a_link_in_place_of_a_folder(fresh_deployment: Deployment,
                                                  kind: str) -> None:
    dep = fresh_deployment
    target, secret = target_of(dep, kind)
    before = {p: snapshot(p) for p in (target, secret)}
    replies = dep.root / "replies"
    as_account(dep, WORKER, f"""
import os
import re
os.rename({str(replies)!r}, {str(replies) + '.moved'!r})
os.symlink({str(target)!r}, {str(replies)!r})
""")
    done = as_root(dep, "--config", str(dep.config_path), *INIT_ARGS)
    assert {p: snapshot(p) for p in (target, secret)} == before
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(replies) in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "link" in done.stderr, done.stderr


INIT_WITH_SWAP = """
import os, subprocess, sys
python, worker, replies, target = sys.argv[1:5]
argv = sys.argv[5:]
state = {"swapped": False, "busy": False, "by_name": []}
MUTATING = {"os.chmod", "os.chown", "os.mkdir", "open"}

def names_replies(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        text = os.fsdecode(os.fspath(path))
        return text == "replies" or text == replies
    return False

def hook(event, args):
    if state["busy"] or event not in MUTATING or not args:
        return
    path = args[0]
    if event in ("os.chmod", "os.chown") and isinstance(path, (str, bytes, os.PathLike)):
        state["by_name"].append([event, os.fsdecode(os.fspath(path))])
    if state["swapped"] or not names_replies(path):
        return
    # the worker account swaps the folder for a link at the very moment init
    # first touches it by name, after whatever it checked with lstat
    state["busy"] = True
    try:
        code = ("import os, sys\\n"
                "os.rename(sys.argv[1], sys.argv[1] + '.moved')\\n"
                "os.symlink(sys.argv[2], sys.argv[1])\\n")
        subprocess.run(["runuser", "-u", worker, "--", python, "-c", code, replies, target],
                       check=True)
        state["swapped"] = True
    finally:
        state["busy"] = False

sys.addaudithook(hook)
from spoolops.cli.main import main
code = main(argv)
print("SWAPPED" if state["swapped"] else "NOT-SWAPPED")
print("BY-NAME " + repr(state["by_name"]))
sys.exit(code)
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_init_never_changes_what_a_folder_swapped_during_init_points_at(
        fresh_deployment: Deployment, kind: str) -> None:
    """Deterministic, not timing-based: an audit hook in root's ``init``
    process has the worker account swap ``replies/`` for a link at the first
    system call that names it (after any ``lstat``: Python audits no stat),
    and records every chmod/chown made by name."""
    dep = fresh_deployment
    target, secret = target_of(dep, kind)
    before = {p: snapshot(p) for p in (target, secret)}
    replies = dep.root / "replies"
    as_account(dep, WORKER, f"import os\nos.chmod({str(replies)!r}, 0o777)")  # to repair
    try:
        done = subprocess.run([dep.accounts.python, "-c", INIT_WITH_SWAP,
                               dep.accounts.python, WORKER, str(replies), str(target),
                               "--config", str(dep.config_path), *INIT_ARGS],
                              check=False, env=dep.env(None), cwd="/", capture_output=True,
                              text=True, timeout=120, start_new_session=True)
    finally:
        after = {p: snapshot(p) for p in (target, secret)}
        for path, (mode, uid, gid) in before.items():   # undo, so cleanup can proceed
            os.chown(path, uid, gid)
            os.chmod(path, stat.S_IMODE(mode))
    assert "SWAPPED" in done.stdout.splitlines(), done.stdout + done.stderr
    assert after == before, (f"init changed {target} through the swapped link:"
                             f" {before} -> {after}")
    by_name = [line for line in done.stdout.splitlines() if line.startswith("BY-NAME")]
    assert by_name == ["BY-NAME []"], f"chmod/chown by name after the check: {by_name}"
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(replies) in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_lock_pid_must_be_a_positive_integer_above_one(tmp_path: Path) -> None:
    from spoolops.transport.worklock import read_lock_pid
    lock = tmp_path / "worker.lock"
    for text in ("-1\n", "0\n", "1\n", "+42\n", "4_2\n", "42 43\n", "0x2a\n", " \n", "",
                 "99999999999999999999\n", "٤٢\n"):
        lock.write_text(text)
        assert read_lock_pid(lock) is None, repr(text)
    lock.write_text("4242\n")
    assert read_lock_pid(lock) == 4242


# -- found by the audit of the fixes ----------------------------------------------------

def test_status_with_no_worker_user_never_takes_a_link_for_active(
        fresh_deployment: Deployment) -> None:
    """With ``[spool] worker_user`` empty (the default), the worker user is
    the owner of ``active/``.  The worker account owns the spool's root: it
    puts a link to a root-owned folder in place of ``active/``.  Root's
    ``status`` must neither take root for the worker user (and so signal a
    root pid the lock names) nor follow the link: it refuses, naming the
    setting.  (Root's status killed the root process before.)"""
    dep = fresh_deployment
    text = dep.config_path.read_text()
    dep.config_path.write_text(re.sub(r"(?m)^worker_user\s*=.*$", "worker_user =", text))
    rootdir = dep.base / "rootowned"
    rootdir.mkdir(mode=0o700)
    active = dep.root / "active"
    as_account(dep, WORKER, "import os, sys\nos.rename(sys.argv[1], sys.argv[1] + '.x')\n"
                            "os.symlink(sys.argv[2], sys.argv[1])", str(active), str(rootdir))
    victim = sleeper()
    holder = hold_lock(dep, str(victim.pid), victim.pid)
    try:
        for extra in ((), ("--prometheus",), ("--json",)):
            done = as_root(dep, "status", *extra)
            assert victim.poll() is None, f"root's status signalled root's pid {victim.pid}"
            assert "Traceback" not in done.stdout + done.stderr, done.stderr
        assert done.returncode != 0 and "worker_user" in done.stderr, done.stderr
    finally:
        release(holder)
        stop(victim)


PLANT_RUN_FIFO = """
import os, sys, time
new, active = sys.argv[1], sys.argv[2]
end = time.monotonic() + 60
while time.monotonic() < end:
    names = [n for n in os.listdir(new) if n.endswith('.json')]
    if names:
        os.rename(os.path.join(new, names[0]), os.path.join(active, names[0]))
        os.mkfifo(os.path.join(active, names[0] + '.run'))
        print('planted', flush=True)
        break
    time.sleep(0.01)
"""


def test_roots_call_never_opens_a_run_record_the_worker_account_planted(
        fresh_deployment: Deployment) -> None:
    """Root's ``spoolops call`` (a client) reads its request's progress from
    ``active/ID.json.run``.  The worker account plays the worker: it claims
    the request and puts a FIFO there.  The call must end at its timeout
    (it hung for good before: a FIFO opened by name, read to its end)."""
    dep = fresh_deployment
    planter = subprocess.Popen(["runuser", "-u", WORKER, "--", dep.accounts.python, "-c",
                                PLANT_RUN_FIFO, str(dep.root / "new"), str(dep.root / "active")],
                               env=dep.env(WORKER), cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        done = as_root(dep, "call", "echo", "--timeout", "3")
        assert time.monotonic() - start < 3 + 10
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert planter.stdout.read().strip() == "planted"
    finally:
        stop(planter)


def test_roots_views_read_as_the_worker_user(fresh_deployment: Deployment) -> None:
    """Root's ``ls`` and ``show`` read the spool as the worker user, not as
    root: a file in ``replies/`` that root alone may read (the test puts it
    there as root; it stands for any way such a file could come to be in a
    folder others write) is not shown to root."""
    dep = fresh_deployment
    secret = dep.root / "replies" / "rootonly-1.json"
    secret.write_bytes(root_secret(dep).read_bytes())
    os.chmod(secret, 0o600)
    for args in (("show", "rootonly-1"), ("show", "rootonly-1", "--json"),
                 ("ls", "replies", "--json")):
        done = as_root(dep, *args)
        assert_clean(done, 0, 1)
