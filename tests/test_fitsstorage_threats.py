"""Issue 18's additions under attack, as real unix accounts (``support.accounts``).

``spt_web`` is the web user (and the victim where there is one), ``spt_web2``
another member of the submit group (the attacker), ``spt_wrk`` the worker
(whose account may be compromised where a test says so), ``spt_out`` an
outsider; root runs what an operator runs (``janitor``, ``status``,
``doctor``, each with a memory cap and a deadline).

What is attacked: ``pending/`` (mode 2770: members list and write it) and
the ``marker`` field that names a mark there; the ingest sidecar
``<filename>.json`` staged in ``upload_staging_dir`` (web-writable) and its
published copy; ``"reply": false``; the hook ledger in ``work/hooks/`` that
root's ``doctor`` and ``status`` read; the site's filename resolvers.

``test_attack_*``: an attack the code withstands (each asserts the precise
outcome, so a regression fails it).  ``test_found_*``: an attack that
succeeded against the first version of these additions (each failed until
the hole was mended), kept as its exact reproduction.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.accounts import (
    MEMBER,
    OUTSIDER,
    WEB,
    WORKER,
    Deployment,
    capped,
    errno_of,
    fits_file,
    gid,
    running_file,
    spoolops_as_root,
    submit,
    uid,
    wait_reply,
)
from support.waiting import wait_for

pytestmark = pytest.mark.accounts

DEADLINE_S = 30.0             # a command that takes longer hangs
TOKEN = "ROOT-ONLY-SECRET-18c4"
OLD = 2 * 3600                # older than the default tmp_ttl (1h)


# -- helpers ----------------------------------------------------------------------------

# root's commands fail the test when they take longer than DEADLINE_S
as_root = functools.partial(spoolops_as_root, timeout=DEADLINE_S)


def clean_exit(done: subprocess.CompletedProcess, *codes: int) -> str:
    out = done.stdout + done.stderr
    assert done.returncode in codes, (done.returncode, out)
    assert "Traceback" not in out and "MemoryError" not in out, out
    assert TOKEN not in out, f"the root-only secret leaked: {out}"
    return out


def as_user(dep: Deployment, user: str, code: str, *args: str) -> str:
    done = dep.py(user, code, *args)
    assert done.returncode == 0, f"as {user}: {done.stderr}"
    return done.stdout


def listing(dep: Deployment, user: str, folder: Path) -> list[str]:
    return dep.py_json(user, "import json, os, sys\n"
                             "print(json.dumps(sorted(os.listdir(sys.argv[1]))))", str(folder))


# a request file written as a client writes one (tmp/, then a rename into
# new/), but with whatever envelope the member likes
PLANT = """
import json, os, sys
root, rid, doc = sys.argv[1], sys.argv[2], sys.argv[3]
staging = os.path.join(root, "tmp", rid + ".json")
fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
os.write(fd, doc.encode())
os.fchmod(fd, 0o640)
os.close(fd)
os.rename(staging, os.path.join(root, "new", rid + ".json"))
"""


def plant(dep: Deployment, user: str, rid: str, envelope: dict) -> None:
    doc = json.dumps({"version": 1, "id": rid, **envelope})
    as_user(dep, user, PLANT, str(dep.root), rid, doc)


def handover(dep: Deployment, data: bytes) -> Path:
    """``data`` in a world-readable file (too large for a command line)."""
    path = dep.base / f"handover-{hashlib.sha256(data).hexdigest()[:12]}"
    path.write_bytes(data)
    os.chmod(path, 0o644)
    return path


def plant_bytes(dep: Deployment, user: str, rid: str, doc: bytes) -> None:
    as_user(dep, user, PLANT.replace("doc = sys.argv[1], sys.argv[2], sys.argv[3]",
                                     "doc = sys.argv[1], sys.argv[2], "
                                     "open(sys.argv[3]).read()"),
            str(dep.root), rid, str(handover(dep, doc)))


def published(dep: Deployment, rid: str, timeout: float = 60) -> dict:
    """The reply the worker published for ``rid`` (root looks; nobody collects)."""
    path = dep.root / "replies" / f"{rid}.json"
    wait_for(path.exists, timeout=timeout, what=f"the reply to {rid}")
    wait_for(lambda: path.stat().st_size > 0, timeout=timeout, what="a whole reply")
    return json.loads(path.read_text())


def worker_owned(path: Path, data: bytes | None = None, mode: int = 0o644) -> Path:
    if data is not None:
        path.write_bytes(data)
    os.chown(path, uid(WORKER), gid(WORKER), follow_symlinks=False)
    if not path.is_symlink():
        os.chmod(path, mode)
    return path


def stage(dep: Deployment, name: str, data: bytes, mode: int = 0o640) -> Path:
    """The web user writes ``name`` into upload_staging_dir."""
    path = dep.staging / name
    as_user(dep, WEB, "import os, sys\n"
                      "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)\n"
                      "os.write(fd, open(sys.argv[2], 'rb').read())\n"
                      "os.fchmod(fd, int(sys.argv[3], 8))\nos.close(fd)",
            str(path), str(handover(dep, data)), oct(mode))
    return path


def temps_in(folder: Path) -> list[str]:
    return [str(Path(d) / n) for d, _ds, files in os.walk(folder) for n in files
            if ".spoolops-tmp" in n]


def root_secret(dep: Deployment) -> Path:
    folder = dep.base / "rootonly"
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    secret = folder / "secret.json"
    secret.write_text(json.dumps({"id": TOKEN, "note": TOKEN}) + "\n")
    os.chmod(secret, 0o600)
    return secret


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def marks(dep: Deployment) -> list[str]:
    return sorted(os.listdir(dep.root / "pending"))


def hold(dep: Deployment, user: str, tag: str, batch: str | None = None
         ) -> tuple[str, Path]:
    """A request of ``user`` that runs until the test releases it."""
    release = dep.base / f"release-{tag}"
    args: dict = {"release": str(release), "tag": tag}
    if batch is not None:
        args["batch"] = batch
    rid = submit(dep, user, "hold", args)
    wait_for(running_file(dep, rid).exists, what=f"{tag} to start")
    return rid, release


# -- pending/: what an outsider and a member can do ----------------------------------------

def test_attack_outsider_cannot_list_or_write_pending(fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    pending = dep.root / "pending"
    st = os.lstat(pending)
    assert (st.st_mode & 0o7777, st.st_uid) == (0o2770, uid(WORKER))
    assert errno_of(dep, OUTSIDER, f"os.listdir({str(pending)!r})") == "EACCES"
    assert errno_of(dep, OUTSIDER, f"open({str(pending / 'x')!r}, 'w')") == "EACCES"
    assert errno_of(dep, OUTSIDER, f"os.lstat({str(pending / 'x')!r})") == "EACCES"
    # and the client's own calls do not list it for the outsider either
    done = dep.py(OUTSIDER, "from spoolops import Client\nprint(Client().queue_length())")
    assert done.returncode != 0 and "PermissionError" in done.stderr + done.stdout, done


def test_attack_a_members_marker_naming_a_victims_mark_is_a_deletion_nothing_more(
        fresh_deployment: Deployment) -> None:
    """The member lists pending/, takes the victim's mark and sends an echo
    carrying it.  When the echo is done the worker removes that mark -- as
    the member could by itself (2770) -- and nothing else: the victim's
    request runs on and is answered, no other file goes."""
    dep = fresh_deployment
    dep.start_worker()
    victim, release = hold(dep, WEB, "victim", batch="night-7")
    [mark] = listing(dep, MEMBER, dep.root / "pending")
    assert mark.endswith("~bmlnaHQtNw")                    # "night-7", no id in the name
    # the member could remove it itself: what the folder's mode allows
    probe = dep.root / "pending" / "0000000000000000"
    as_user(dep, WEB, f"open({str(probe)!r}, 'w').close()")
    assert errno_of(dep, MEMBER, f"os.unlink({str(probe)!r})") == "ok"
    decoy = worker_owned(dep.root / "pending" / (mark + "x"), b"")  # near-miss name
    plant(dep, MEMBER, "attack-marker-1", {"op": "echo", "args": {"x": 1}, "marker": mark})
    reply = published(dep, "attack-marker-1")
    assert reply["ok"] and reply["submitted_by"] == MEMBER, reply
    # a mark is released just after the answer is published (off the client's path)
    wait_for(lambda: mark not in marks(dep), what="the echo's mark to be released")
    assert marks(dep) == [decoy.name]                      # the victim's mark went, only it
    assert os.path.exists(running_file(dep, victim))       # the victim runs on
    release.touch()
    answer = wait_reply(dep, WEB, victim)
    assert answer["ok"] and answer["submitted_by"] == WEB, answer
    assert marks(dep) == [decoy.name]


ESCAPES = [
    "../replies/decoy",
    "../work/worker.lock",
    "0123456789abcdef/../../replies/decoy",
    "{ABS}",
    "0123456789abcdef.held",
    "0123456789abcdef~" + "A" * 201,                      # a batch too long for a mark
    "0123456789abcdef~" + "A" * 5000,
    "0123456789abcdef~a/b",
    "0123456789ABCDEF",
    "",
]


def test_attack_markers_that_would_leave_pending_are_refused(
        fresh_deployment: Deployment) -> None:
    """Markers with '/', '..', absolute, too long, ``.held``, upper-case or
    empty: every request carrying one is answered BadRequest and nothing
    is removed anywhere -- decoys stand where each marker would point."""
    dep = fresh_deployment
    dep.start_worker()
    absolute = worker_owned(dep.base / "abs-decoy", b"d")
    escapes = [m.replace("{ABS}", str(absolute)) for m in ESCAPES]
    decoys = [worker_owned(dep.root / "replies" / "decoy", b"d"), absolute,
              worker_owned(dep.root / "pending" / "0123456789abcdef.held", b""),
              worker_owned(dep.root / "pending" / "0123456789abcdef", b"")]
    for n, marker in enumerate(escapes):
        plant(dep, MEMBER, f"escape-{n}", {"op": "echo", "args": {}, "marker": marker})
    for n, marker in enumerate(escapes):
        reply = published(dep, f"escape-{n}")
        assert not reply["ok"], (marker, reply)
        assert reply["error"] == {"type": "BadRequest",
                                  "message": "'marker' is not a mark this spool makes"}
    assert (dep.root / "work" / "worker.lock").exists()
    for decoy in decoys:
        assert decoy.exists(), f"{decoy} was removed"


def test_attack_a_marker_ending_in_a_newline_stays_inside_pending(
        fresh_deployment: Deployment) -> None:
    """``"<16 hex>\\n"`` is no mark (the pattern must match whole: ``$``
    alone also matched before a final newline): refused, and neither the
    name with the newline nor the mark without it is touched."""
    dep = fresh_deployment
    dep.start_worker()
    token = "0123456789abcdef"
    other = worker_owned(dep.root / "pending" / token, b"")
    newline = dep.root / "pending" / (token + "\n")
    as_user(dep, MEMBER, f"open({str(newline)!r}, 'w').close()")
    plant(dep, MEMBER, "newline-marker", {"op": "echo", "args": {}, "marker": token + "\n"})
    reply = published(dep, "newline-marker")
    assert not reply["ok"] and reply["error"]["type"] == "BadRequest", reply
    assert "marker" in reply["error"]["message"]
    assert os.path.lexists(newline) and other.exists()


@pytest.mark.parametrize("kind", ["symlink", "held-symlink"])
def test_attack_a_mark_that_is_a_link_is_unlinked_not_followed(
        fresh_deployment: Deployment, kind: str) -> None:
    """The member's mark (or its ``.held`` name) is a symbolic link to a
    worker-owned file outside pending/: the worker removes the link, never
    the file it points at."""
    dep = fresh_deployment
    dep.start_worker()
    target = fits_file(dep, "linked.fits")
    before = target.read_bytes()
    token = "fedcba9876543210~Yg"
    name = token + (".held" if kind == "held-symlink" else "")
    link = dep.root / "pending" / name
    as_user(dep, MEMBER, f"import os\nos.symlink({str(target)!r}, {str(link)!r})")
    plant(dep, MEMBER, f"link-mark-{kind}", {"op": "echo", "args": {}, "marker": token})
    assert published(dep, f"link-mark-{kind}")["ok"]
    # (released just after the answer is published, off the client's path)
    wait_for(lambda: not os.path.lexists(link), what="the linked mark to be removed")
    assert target.read_bytes() == before
    assert os.stat(target).st_uid == uid(WORKER)


@pytest.mark.parametrize("kind", ["held-dir", "mark-dir"])
def test_found_a_directory_under_a_victims_mark_withholds_its_reply(
        fresh_deployment: Deployment, kind: str) -> None:
    dep = fresh_deployment
    dep.start_worker()
    victim, release = hold(dep, WEB, f"victim-{kind}", batch="night-8")
    [mark] = listing(dep, MEMBER, dep.root / "pending")
    pending = dep.root / "pending"
    # the member knows no id: the mark is all it sees, and all it needs
    as_user(dep, MEMBER, "import os, sys\n"
                         "pending, mark, kind = sys.argv[1:]\n"
                         "if kind == 'mark-dir':\n"
                         "    os.unlink(os.path.join(pending, mark))\n"
                         "    d = os.path.join(pending, mark)\n"
                         "else:\n"
                         "    d = os.path.join(pending, mark + '.held')\n"
                         "os.mkdir(d, 0o700)\n"
                         "open(os.path.join(d, 'keep'), 'w').close()\n",
            str(pending), mark, kind)
    release.touch()
    answer = wait_reply(dep, WEB, victim, timeout=20)
    failures = [line for line in dep.worker_logs().splitlines() if "event=reply_failed" in line]
    assert answer.get("ok") is True, f"the victim's reply was withheld: {answer} {failures}"


# -- pending/: a flood of hostile names against the readers ---------------------------------

FLOOD = """
import os, sys
pending, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    os.close(os.open(os.path.join(pending, "%016x" % i), os.O_CREAT | os.O_WRONLY, 0o600))
b = os.fsencode(pending)
odd = [b"\\xff" * 16 + b"~QQ",                           # not UTF-8 (decodes as batch 'A')
       b"0123456789abcdef~" + b"Q" * 238,                 # 255 bytes: too long for a batch
       b"0123456789abcdef~YmF0Y2gtMQ.held",               # held: batch-1, not counted
       b"0123456789abcdef~_w",                            # a batch that is not UTF-8
       b"0123456789abcdef~\\xc3",                         # not UTF-8 in the name
       b"0123456789abcde\\n~YQ",
       b"0123456789abcdef~YQ\\n"]                         # '$' accepts a final newline: 'a'
for name in odd:
    os.close(os.open(b + b"/" + name, os.O_CREAT | os.O_WRONLY, 0o600))
os.mkfifo(b + b"/fedcba9876543210~YQ")                   # batch a: a FIFO, never opened
os.mkdir(b + b"/fedcba9876543211~Yg")                    # batch b: a directory
os.symlink("/dev/zero", b + b"/fedcba9876543212~Yw")     # batch c: a link to /dev/zero
print("planted")
"""

READ_MARKS = """
import json, time
from spoolops import Client
client = Client()
start = time.monotonic()
batches, length = client.pending_batches(), client.queue_length()
print(json.dumps({"batches": sorted(batches), "length": length,
                  "seconds": time.monotonic() - start}))
"""


def test_attack_a_flood_of_hostile_marks_neither_hangs_nor_crashes_the_readers(
        fresh_deployment: Deployment) -> None:
    """100,000 marks, non-UTF-8 names, 255-byte names, ``.held`` names, a
    FIFO, a directory and a link to /dev/zero planted by the member:
    pending_batches()/queue_length() (the web user's, memory capped)
    answer from the names alone, quickly (the janitor's side:
    ``test_attack_janitor_reaps_hostile_marks_without_following_them``)."""
    dep = fresh_deployment
    count = 100_000
    done = dep.py(MEMBER, FLOOD, str(dep.root / "pending"), str(count), timeout=300)
    assert done.returncode == 0 and "planted" in done.stdout, done.stderr
    start = time.monotonic()
    read = subprocess.run([*capped(), "runuser", "-u", WEB, "--", dep.accounts.python, "-c",
                           READ_MARKS], env=dep.env(WEB), cwd="/", capture_output=True,
                          text=True, timeout=120, check=False)
    assert read.returncode == 0, read.stderr
    result = json.loads(read.stdout.strip().splitlines()[-1])
    assert time.monotonic() - start < 60
    # names only: the flood, the odd names that look like marks, fifo/dir/link
    assert result["batches"] == ["A", "a", "b", "batch-1", "c"], result
    # queue_length: the flood, six odd names (a 16-character prefix and '~'
    # suffice: '0123456789abcde\\n~YQ' counts, and is batch 'a'), fifo/dir/link
    assert result["length"] == count + 6 + 3, result
    assert result["seconds"] < 10, result


# -- the janitor and the marks a member plants -------------------------------------------------

JANITOR_PLANT = """
import os, sys, time
pending, decoy, folder = sys.argv[1:]
old = time.time() - {OLD}
b = os.fsencode(pending)
def age(path):
    os.utime(path, (old, old), follow_symlinks=False)
os.symlink(decoy, os.path.join(pending, "1111111111111111"))
os.mkfifo(os.path.join(pending, "2222222222222222"))
d = os.path.join(pending, "3333333333333333")
os.mkdir(d)
os.symlink(folder, os.path.join(d, "storage"))            # the worker's own folder
open(os.path.join(d, "f"), "w").close()
os.close(os.open(b + b"/\\xff\\xfe~QQ", os.O_CREAT | os.O_WRONLY, 0o600))
os.close(os.open(b + b"/" + b"9" * 255, os.O_CREAT | os.O_WRONLY, 0o600))
for name in (b"1111111111111111", b"2222222222222222", b"3333333333333333/storage",
             b"3333333333333333/f", b"3333333333333333", b"\\xff\\xfe~QQ", b"9" * 255):
    age(b + b"/" + name)
print("planted")
""".replace("{OLD}", str(OLD))


def test_attack_janitor_reaps_hostile_marks_without_following_them(
        fresh_deployment: Deployment) -> None:
    """Old marks that are a link to an archive file, a FIFO, a directory
    holding a link to storage_root, a non-UTF-8 and a 255-byte name: root's
    janitor (as the worker) removes each it can, follows none, hangs on
    none; the archive is intact.  The member's own folder (0755: the
    worker may not empty it) stays, its removal reported as failed."""
    dep = fresh_deployment
    archived = fits_file(dep, "kept.fits")
    before = archived.read_bytes()
    out = as_user(dep, MEMBER, JANITOR_PLANT, str(dep.root / "pending"), str(archived),
                  str(dep.storage))
    assert "planted" in out
    done = as_root(dep, "janitor", "--json")
    clean_exit(done, 0, 1)
    report = json.loads(done.stdout)
    assert os.listdir(dep.root / "pending") == ["3333333333333333"]
    assert sorted(os.listdir(dep.root / "pending" / "3333333333333333")) == ["f", "storage"]
    [folder] = [a for a in report["actions"] if a["path"].endswith("/3333333333333333")]
    assert folder["done"] is False and folder["error"] == "Permission denied", folder
    removed = {a["path"].rsplit("/", 1)[1] for a in report["actions"] if a["done"]}
    assert {"1111111111111111", "2222222222222222", "9" * 255} <= removed, report
    assert archived.read_bytes() == before
    assert sorted(os.listdir(dep.storage)) == ["kept.fits"]


@pytest.mark.parametrize("doc", [
    b'{"version": 1, "id": "bad-marker", "op": "echo", "marker": ["x"]}',
    b'{"version": 1, "id": "bad-marker", "op": "echo", "marker": {"a": 1}}',
    b'{"version": 1, "id": "bad-marker", "op": "echo", "args": ' + b"[" * 100_000 +
    b"]" * 100_000 + b"}",
], ids=["list", "object", "deep"])
def test_found_a_members_request_crashes_the_janitors_mark_sweep(
        fresh_deployment: Deployment, doc: bytes) -> None:
    dep = fresh_deployment                                   # no worker: new/ keeps it
    mark = dep.root / "pending" / "4444444444444444"
    as_user(dep, MEMBER, "import os, sys, time\nopen(sys.argv[1], 'w').close()\n"
                         f"t = time.time() - {OLD}\nos.utime(sys.argv[1], (t, t))",
            str(mark))
    plant_bytes(dep, MEMBER, "bad-marker", doc)
    done = as_root(dep, "janitor", "--json")
    clean_exit(done, 0, 1)
    assert not mark.exists()                                 # the old mark was reaped


# -- "reply": false and "reply" of other types ------------------------------------------------

@pytest.mark.parametrize("value", ["no", 0, 1, None, [], {}, "false"])
def test_attack_reply_of_another_type_is_a_bad_request(fresh_deployment: Deployment,
                                                       value: object) -> None:
    dep = fresh_deployment
    dep.start_worker()
    plant(dep, MEMBER, "odd-reply", {"op": "echo", "args": {"x": 1}, "reply": value})
    reply = published(dep, "odd-reply")
    assert reply["error"] == {"type": "BadRequest", "message": "'reply' must be true or false"}
    assert reply["submitted_by"] == MEMBER
    assert dep.call(WEB, "echo", {"after": True}).code == 0     # the worker lives on


def test_attack_reply_false_under_a_victims_id_takes_nothing_from_it(
        fresh_deployment: Deployment) -> None:
    """The member sees the victim's id in active/ and sends ``"reply":
    false`` under it, while the request runs and again while its reply
    waits uncollected: both duplicates are quarantined unanswered; the
    victim's reply arrives and is its own."""
    dep = fresh_deployment
    dep.start_worker()
    victim, release = hold(dep, WEB, "victim-rf")
    assert f"{victim}.json" in listing(dep, MEMBER, dep.root / "active")
    plant(dep, MEMBER, victim, {"op": "echo", "args": {"mine": 1}, "reply": False})
    reason = dep.root / "failed" / f"{victim}.json.reason"
    wait_for(reason.exists, what="the running-id duplicate to be quarantined")
    release.touch()
    waiting = published(dep, victim)
    assert waiting["submitted_by"] == WEB and waiting["ok"], waiting
    plant(dep, MEMBER, victim, {"op": "echo", "args": {"mine": 2}, "reply": False})
    wait_for(lambda: os.path.exists(dep.root / "failed" / f"{victim}.json~2.reason"),
             what="the answered-id duplicate to be quarantined")
    answer = wait_reply(dep, WEB, victim)
    assert answer["ok"] and answer["submitted_by"] == WEB
    assert answer["result"]["tag"] == "victim-rf"
    for name in (f"{victim}.json", f"{victim}.json~2"):
        assert os.lstat(dep.root / "failed" / name).st_uid == uid(MEMBER)
    assert not os.path.exists(dep.root / "replies" / f"{victim}.json")


# -- the ingest sidecar <filename>.json -------------------------------------------------------

SIDECAR_KINDS = ["symlink", "fifo", "hardlink", "directory", "oversize"]


@pytest.mark.parametrize("kind", SIDECAR_KINDS)
def test_attack_a_hostile_staged_sidecar_is_refused_and_nothing_published(
        fresh_deployment: Deployment, kind: str) -> None:
    """The web user stages a sidecar that is a link (to a root-only file), a
    FIFO, a hard link, a directory or larger than 1 MiB: BadRequest before
    anything is published, no temp left, the worker does not hang, the
    upload stays staged."""
    dep = fresh_deployment
    dep.start_worker()
    secret = root_secret(dep)
    data = b"SIMPLE  = T" + os.urandom(2000)
    staged = stage(dep, "up.fits", data)
    sidecar = dep.staging / "up.fits.json"
    plant_code = {
        "symlink": f"os.symlink({str(secret)!r}, {str(sidecar)!r})",
        "fifo": f"os.mkfifo({str(sidecar)!r})",
        "hardlink": f"open({str(dep.staging / 'other')!r}, 'w').write('{{}}')\n"
                    f"os.link({str(dep.staging / 'other')!r}, {str(sidecar)!r})",
        "directory": f"os.mkdir({str(sidecar)!r})",
        "oversize": f"open({str(sidecar)!r}, 'wb').write(b' ' * ((1 << 20) + 1))",
    }[kind]
    as_user(dep, WEB, "import os\n" + plant_code)
    done = dep.call(WEB, "ingest_upload", {"filename": "up.fits", "md5": md5(data)},
                    timeout=30)
    assert done.code == 1 and done.reply is not None, done
    assert done.reply["error"]["type"] == "BadRequest", done.reply
    assert sorted(os.listdir(dep.storage)) == []
    assert temps_in(dep.storage) == []
    assert staged.read_bytes() == data
    assert os.path.lexists(sidecar)
    assert TOKEN not in json.dumps(done.reply)


def test_attack_the_published_sidecar_has_file_mode_and_the_workers_owner(
        fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    dep.start_worker()
    data = b"%PDF-1.4 notes" * 10
    meta = json.dumps({"filename": "notes.pdf", "is_misc": "True"}).encode()
    stage(dep, "miscfile_notes.pdf", data, mode=0o640)
    stage(dep, "miscfile_notes.pdf.json", meta, mode=0o660)  # group-writable as staged
    done = dep.call(WEB, "ingest_upload", {"filename": "miscfile_notes.pdf",
                                           "fileuploadlog_id": 3, "processed_cal": False,
                                           "path": ""})
    assert done.code == 0, json.dumps(done.reply["error"])
    assert done.reply["result"]["sidecar"] == "miscfile_notes.pdf.json"
    stored, side = dep.storage / "miscfile_notes.pdf", dep.storage / "miscfile_notes.pdf.json"
    assert side.read_bytes() == meta
    for path in (stored, side):
        st = os.lstat(path)
        assert (st.st_uid, st.st_mode & 0o7777, st.st_nlink) == (uid(WORKER), 0o644, 1), path
    assert os.lstat(side).st_gid == os.lstat(stored).st_gid
    assert os.listdir(dep.staging) == []
    assert temps_in(dep.storage) == []


def test_attack_a_sidecar_in_another_folder_is_not_taken(
        fresh_deployment: Deployment) -> None:
    """The upload is staged at the top of upload_staging_dir (FitsStorage's
    older code) for ``path`` 2026; a ``.json`` of its name waits in
    ``staging/2026/`` (another folder): only a sidecar beside the staged
    file travels with it -- the other one is neither published nor
    removed."""
    dep = fresh_deployment
    dep.start_worker()
    data = b"SIMPLE  = T" + os.urandom(500)
    stage(dep, "top.fits", data)
    as_user(dep, WEB, f"import os\nos.mkdir({str(dep.staging / '2026')!r})")
    elsewhere = stage(dep, "2026/top.fits.json", b'{"other": "folder"}')
    done = dep.call(WEB, "ingest_upload", {"filename": "top.fits", "path": "2026",
                                           "md5": md5(data)})
    assert done.code == 0, json.dumps(done.reply)
    assert done.reply["result"]["path"] == "2026/top.fits"
    assert "sidecar" not in done.reply["result"]
    assert sorted(os.listdir(dep.storage / "2026")) == ["top.fits"]
    assert elsewhere.read_bytes() == b'{"other": "folder"}'


@pytest.mark.parametrize("kind", ["symlink", "directory"])
def test_attack_a_link_or_folder_at_the_sidecars_target_is_a_conflict(
        fresh_deployment: Deployment, kind: str) -> None:
    """Only the worker account can put something in storage_root: were it a
    link at ``storage/<filename>.json`` (to another archive file) or a
    folder, the ingest is a Conflict, the link's target is untouched and
    nothing is published."""
    dep = fresh_deployment
    dep.start_worker()
    other = fits_file(dep, "other.fits")
    before = other.read_bytes()
    target = dep.storage / "up2.fits.json"
    if kind == "symlink":
        target.symlink_to(other)
    else:
        target.mkdir()
    worker_owned(target, mode=0o755)
    data = b"SIMPLE  = T" + os.urandom(1000)
    stage(dep, "up2.fits", data)
    stage(dep, "up2.fits.json", b'{"forged": true}')
    done = dep.call(WEB, "ingest_upload", {"filename": "up2.fits", "md5": md5(data)})
    assert done.code == 1 and done.reply["error"]["type"] == "Conflict", done
    assert "up2.fits.json exists and is not a regular file" in done.reply["error"]["message"]
    assert other.read_bytes() == before
    assert os.path.islink(target) if kind == "symlink" else os.listdir(target) == []
    assert not os.path.lexists(dep.storage / "up2.fits")
    assert temps_in(dep.storage) == []


@pytest.mark.parametrize("case", ["other-bytes", "md5-mismatch"])
def test_found_a_refused_upload_still_replaces_the_stored_sidecar(
        fresh_deployment: Deployment, case: str) -> None:
    dep = fresh_deployment
    dep.start_worker()
    archived = b"SIMPLE  = T archived" + b" " * 500
    original_meta = json.dumps({"program": "GN-2026B-Q-1", "release": "2027-01-01"}).encode()
    if case == "other-bytes":
        worker_owned(dep.storage / "kept.fits", archived)
    worker_owned(dep.storage / "kept.fits.json", original_meta)
    upload = b"SIMPLE  = T forged" + b" " * 900
    stage(dep, "kept.fits", upload)
    stage(dep, "kept.fits.json", json.dumps({"program": "forged", "release": "2000-01-01"})
          .encode())
    args = {"filename": "kept.fits"}
    if case == "md5-mismatch":
        args["md5"] = md5(b"what the uploader meant")
    done = dep.call(WEB, "ingest_upload", args)
    assert done.code == 1 and done.reply["error"]["type"] == "Conflict", done
    if case == "other-bytes":
        assert (dep.storage / "kept.fits").read_bytes() == archived
    else:
        assert not os.path.lexists(dep.storage / "kept.fits")
    assert (dep.storage / "kept.fits.json").read_bytes() == original_meta, \
        "a refused upload replaced the archived file's metadata"


@pytest.mark.parametrize("point", ["ingest.before_publish:1", "ingest.after_publish:1",
                                   "ingest.after_staged_unlink:1"])
def test_attack_a_crash_with_a_sidecar_leaves_no_half_sidecar(
        fresh_deployment: Deployment, point: str) -> None:
    """The worker is SIGKILLed mid-ingest with a sidecar staged: the next
    worker re-runs the request to completion -- the file and its sidecar
    published whole with file_mode, both staged copies gone, no temporary
    file anywhere, exactly one reply."""
    dep = fresh_deployment
    first = dep.start_worker(SPOOLOPS_FAULT=point)
    data = os.urandom(300_000)
    meta = json.dumps({"filename": "crash.fits", "x": "y" * 1000}).encode()
    stage(dep, "crash.fits", data)
    stage(dep, "crash.fits.json", meta)
    rid = submit(dep, WEB, "ingest_upload", {"filename": "crash.fits", "path": "2026",
                                             "md5": md5(data)})
    assert first.wait(60) == -signal.SIGKILL
    if point != "ingest.after_staged_unlink:1":
        # killed after the sidecar was published: its copy is whole already
        assert (dep.storage / "2026" / "crash.fits.json").read_bytes() == meta
    dep.start_worker()
    answer = wait_reply(dep, WEB, rid)
    assert answer["ok"], answer
    assert answer["result"]["sidecar"] == "2026/crash.fits.json"
    assert (dep.storage / "2026" / "crash.fits").read_bytes() == data
    side = dep.storage / "2026" / "crash.fits.json"
    assert side.read_bytes() == meta
    st = os.lstat(side)
    assert (st.st_uid, st.st_mode & 0o7777) == (uid(WORKER), 0o644)
    assert os.listdir(dep.staging) == []
    assert temps_in(dep.storage) == []
    assert sorted(os.listdir(dep.storage / "2026")) == ["crash.fits", "crash.fits.json"]


# -- the hook ledger (work/hooks/) and root's doctor and status -------------------------------

def hook_call(**overrides: object) -> dict:
    call = {"id": "r1", "key": "k", "hook": "record", "op": "update_headers", "args": {},
            "result": {}, "user": WEB, "targets": [], "tries": 9,
            "first_failed": "2026-01-01T00:00:00.000Z", "last_error": "e", "next_at": 0.0,
            "marker": None}
    call.update(overrides)
    return call


def plant_ledger(dep: Deployment, files: dict[str, bytes]) -> None:
    """As the (compromised) worker account: files in work/hooks/."""
    hooks = dep.root / "work" / "hooks"
    as_user(dep, WORKER, "import json, os, sys\n"
                         "hooks, files = sys.argv[1], json.load(open(sys.argv[2]))\n"
                         "os.makedirs(hooks, mode=0o700, exist_ok=True)\n"
                         "for name, hexdata in files.items():\n"
                         "    open(os.path.join(hooks, name), 'wb').write("
                         "bytes.fromhex(hexdata))\n",
            str(hooks), str(handover(dep, json.dumps({k: v.hex() for k, v in files.items()})
                                     .encode())))


def test_attack_links_fifos_and_giants_in_the_ledger_neither_hang_nor_leak(
        fresh_deployment: Deployment) -> None:
    """The worker account plants in work/hooks/ a link to a root-only file,
    a link to /dev/zero, a FIFO and a 17 MiB file, each named ``*.json``:
    root's doctor and status finish, count none of them, print no secret."""
    dep = fresh_deployment
    secret = root_secret(dep)
    hooks = dep.root / "work" / "hooks"
    as_user(dep, WORKER, f"""
import os
os.makedirs({str(hooks)!r}, mode=0o700, exist_ok=True)
os.symlink({str(secret)!r}, {str(hooks / 'a.json')!r})
os.symlink("/dev/zero", {str(hooks / 'b.json')!r})
os.mkfifo({str(hooks / 'c.json')!r})
with open({str(hooks / 'd.json')!r}, "wb") as f:
    f.truncate(17 * 1024 * 1024)
""")
    for args in (("doctor", "--all"), ("status",), ("status", "--json")):
        start = time.monotonic()
        out = clean_exit(as_root(dep, *args), 0, 1)
        assert time.monotonic() - start < DEADLINE_S
        if args[0] == "doctor":
            assert "no follow-up hook call waits for a retry" in out, out
    status = json.loads(as_root(dep, "status", "--json").stdout)
    assert status["hooks"] == {"pending": 0, "failed": 0}


def test_found_doctor_follows_a_link_in_place_of_the_ledger(
        fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    rootonly = dep.base / "rootonly-ledger"
    rootonly.mkdir(mode=0o700)
    (rootonly / "call.json").write_text(json.dumps(hook_call(id=TOKEN)))
    os.chmod(rootonly / "call.json", 0o600)
    hooks = dep.root / "work" / "hooks"
    as_user(dep, WORKER, f"import os\nos.symlink({str(rootonly)!r}, {str(hooks)!r})")
    out = clean_exit(as_root(dep, "doctor", "--all"), 0, 1)
    assert "keep failing" not in out, f"root's doctor read the root-only folder: {out}"


@pytest.mark.parametrize("command", ["doctor", "status"])
@pytest.mark.parametrize("planted", ["tries-text", "mixed-sort", "deep"])
def test_found_a_planted_ledger_entry_crashes_doctor_and_status(
        fresh_deployment: Deployment, planted: str, command: str) -> None:
    dep = fresh_deployment
    files = {
        "tries-text": {"a.json": json.dumps(hook_call(tries="many")).encode()},
        "mixed-sort": {"a.json": json.dumps(hook_call(first_failed=1)).encode(),
                       "b.json": json.dumps(hook_call(id="r2")).encode()},
        "deep": {"a.json": b"[" * 100_000 + b"]" * 100_000},
    }[planted]
    plant_ledger(dep, files)
    clean_exit(as_root(dep, command), 0, 1)


# -- the site's filename / data_label resolvers ----------------------------------------------

def test_attack_a_resolvers_answer_is_confined_in_process(ctx, tmp_path: Path) -> None:
    from spoolops.errors import BadRequest
    from spoolops.ops.headers import UPDATE_HEADERS
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.fits").write_bytes(b"x" * 2880)
    (ctx.config.storage_root / "lnk").symlink_to(outside)
    answers = ["../outside/victim.fits", str(outside / "victim.fits"),
               "lnk/victim.fits", "a/../victim.fits", "./victim.fits", "a//victim.fits"]
    for kind in ("filename", "data_label"):
        for answer in answers:
            ctx.resolvers = {kind: lambda name, c, answer=answer: answer}
            with pytest.raises(BadRequest):
                UPDATE_HEADERS.validate({kind: "N1.fits", "qa_state": "Pass"}, ctx)


def test_attack_a_resolvers_answer_is_confined_as_the_worker_sees_it(
        fresh_deployment: Deployment) -> None:
    """The test site's data_label resolver (a JSON map the worker reads)
    answers '../x', an absolute path and a path through a link in storage
    (placed by the worker account): each BadRequest, the outside file
    untouched; a fair answer still works."""
    dep = fresh_deployment
    outside = dep.base / "outside"
    outside.mkdir()
    os.chown(outside, uid(WORKER), gid(WORKER))
    fits = fits_file(dep, "fair.fits")
    shutil.copy(fits, outside / "victim.fits")
    victim = worker_owned(outside / "victim.fits")
    before = victim.read_bytes()
    link = dep.storage / "lnk"
    link.symlink_to(outside)
    worker_owned(link)
    labels = dep.base / "labels.json"
    labels.write_text(json.dumps({"up": "../outside/victim.fits",
                                  "abs": str(victim),
                                  "link": "lnk/victim.fits",
                                  "fair": "fair.fits"}))
    os.chmod(labels, 0o644)
    dep.start_worker(SPOOLOPS_TEST_LABELS=str(labels))
    for label in ("up", "abs", "link"):
        done = dep.call(WEB, "update_headers", {"data_label": label, "qa_state": "Fail"})
        assert done.code == 1 and done.reply["error"]["type"] == "BadRequest", (label, done)
    assert victim.read_bytes() == before
    done = dep.call(WEB, "update_headers", {"data_label": "fair", "qa_state": "Fail"})
    assert done.code == 0 and done.reply["result"]["modified"] is True, done
