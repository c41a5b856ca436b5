"""Issue 19: what a member of the submit group (or an id it learnt) can do to
another member's request, as real unix accounts (``support.accounts``).

``spt_web`` is the victim, ``spt_web2`` the member who attacks it (it can
list ``active/`` and ``replies/``, write ``tmp/`` and ``new/``), ``spt_wrk``
the worker; root only runs what an operator runs and looks.  Races are made
deterministic with the ``hold`` test op (a request that runs until a file
exists), inotify and ordering facts of the worker's main loop, never sleeps.

Tests named ``test_issue19_*`` each failed on the code before the fixes
(commit 1be5468); ``test_found_*`` reproduce holes a review of the fixes
found in them (each failed until mended); ``test_attack_*`` are attacks on
the new code that it withstands.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import PROJECT
from support.accounts import (
    MEMBER,
    SHARED_ACCESS,
    WEB,
    WORKER,
    Deployment,
    errno_of,
    fits_file,
    gid,
    running_file,
    submit,
    uid,
    wait_reply,
)
from support.waiting import Lines, wait_for

pytestmark = pytest.mark.accounts


# -- helpers of these attacks (the shared ones live in support.accounts) -------------------










# a member's own request file under a chosen id: written in tmp/ and renamed
# into new/, exactly as a client publishes one
PLANT = """
import json, os, sys
root, rid, op, args = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
data = json.dumps({"version": 1, "id": rid, "op": op, "args": args}).encode()
staging = os.path.join(root, "tmp", rid + ".json")
fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
os.write(fd, data)
os.fchmod(fd, 0o640)
os.close(fd)
os.rename(staging, os.path.join(root, "new", rid + ".json"))
print(json.dumps("planted"))
"""


def plant(dep: Deployment, rid: str, op: str, args: dict) -> None:
    """As the member: publish its own request under ``rid``."""
    assert dep.py_json(MEMBER, PLANT, str(dep.root), rid, op, json.dumps(args)) == "planted"


def member_lists(dep: Deployment, folder: str) -> list[str]:
    return dep.py_json(MEMBER, "import json, os, sys\n"
                               "print(json.dumps(sorted(os.listdir(sys.argv[1]))))",
                       str(dep.root / folder))


# the member watches active/ (it may: 2750) and prints the first request id
# claimed there that is not one of those it was told to skip
WATCH_ACTIVE = """
import json, sys, time
from inotify_simple import INotify, flags
active, skip = sys.argv[1], set(sys.argv[2].split(","))
watch = INotify()
watch.add_watch(active, flags.MOVED_TO | flags.CREATE)
print("ready", flush=True)
end = time.monotonic() + 120
while time.monotonic() < end:
    for event in watch.read(timeout=1000):
        name = event.name
        if name.endswith(".json") and name[:-5] not in skip:
            print(json.dumps(name[:-5]), flush=True)
            sys.exit(0)
sys.exit(1)
"""


class ActiveWatcher:
    """A process of the member watching active/ for the next claimed id."""

    def __init__(self, dep: Deployment, skip: list[str]) -> None:
        self.proc = subprocess.Popen(
            ["runuser", "-u", MEMBER, "--", dep.accounts.python, "-c", WATCH_ACTIVE,
             str(dep.root / "active"), ",".join(skip)],
            env=dep.env(MEMBER), cwd="/", stdout=subprocess.PIPE, text=True)
        self.lines = Lines(self.proc.stdout)
        assert self.lines.next(time.monotonic() + 60) == "ready\n"

    def seen(self) -> str:
        line = self.lines.next(time.monotonic() + 60)
        assert line, "the member saw no request claimed in active/"
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(30)






def worker_file(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    os.chown(path, uid(WORKER), gid(WORKER))
    os.chmod(path, mode)
    return path


def worker_dir(path: Path, mode: int) -> Path:
    path.mkdir()
    os.chown(path, uid(WORKER), gid(WORKER))
    os.chmod(path, mode)
    return path


def stage(dep: Deployment, name: str, data: bytes) -> Path:
    """The web user writes an upload into upload_staging_dir."""
    path = dep.staging / name
    done = dep.py(WEB, "import sys\nopen(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))",
                  str(path), data.hex())
    assert done.returncode == 0, done.stderr
    return path




def barrier(dep: Deployment) -> None:
    """An echo answered: the worker's main loop has finished the pass that
    claimed what was claimed before it (a claim and its put-back happen in
    one pass; a request submitted later is claimed in a later one)."""
    done = dep.call(WEB, "echo", {"barrier": True})
    assert done.code == 0, done.stderr


@pytest.fixture
def make_deployment(accounts):
    """Deployments of this test's own, with [access] or [worker] changes."""
    made: list[Deployment] = []

    def make(access: dict[str, str] | None = None,
             worker: dict[str, str] | None = None) -> Deployment:
        dep = Deployment.create(accounts, access={**SHARED_ACCESS, **(access or {})},
                                worker=worker)
        made.append(dep)
        return dep

    yield make
    for dep in made:
        dep.close()


@pytest.fixture(scope="module", autouse=True)
def which_spoolops(accounts):
    """Say (pytest -s) which spoolops runs: this process's and the accounts'."""
    import spoolops
    done = subprocess.run(
        ["runuser", "-u", WEB, "--", accounts.python, "-c",
         "import spoolops; print(spoolops.__file__)"],
        env=accounts.env(Path("/nonexistent")), cwd="/", capture_output=True, text=True,
        check=False,
        timeout=120)
    print(f"\n[spoolops under test] project {PROJECT}; pytest imports {spoolops.__file__};"
          f" the accounts import {done.stdout.strip() or done.stderr.strip()}")


# -- finding 3: a member substitutes its own request ---------------------------------

def test_issue19_3a_a_put_back_request_cannot_be_swapped_by_a_member(make_deployment) -> None:
    """spt_web's update_headers of a file arrives in one batch with a
    ``hold`` on the same target (the worker was paused): both are claimed,
    the hold starts, the edit is put back -- held in active/ now, where the
    member sees it.  (A request that arrives while its target is busy is
    read ahead and stays unclaimed in new/, which members cannot list.)
    spt_web2, watching active/, learns its id and publishes its own request
    under that id in new/.  The web user's reply is its own, the file gets
    its value, and the member's file never runs as that id: it is refused
    while the genuine reply waits."""
    from astropy.io import fits
    dep = make_deployment(access={"update_headers": f"{WEB}, {MEMBER}"},
                          worker={"rescan_interval": "1s"})
    worker = dep.start_worker()
    path = fits_file(dep, "swap.fits")
    target = os.path.join(os.path.realpath(dep.storage), path.name)
    release = dep.base / "release-swap"
    os.kill(worker.pid, signal.SIGSTOP)
    first = submit(dep, WEB, "hold", {"release": str(release), "target": target,
                                      "tag": "first"})
    victim = submit(dep, WEB, "update_headers", {"filename": path.name,
                                                 "values": {"qa_state": "Fail"}})
    watcher = ActiveWatcher(dep, skip=[first])
    try:
        os.kill(worker.pid, signal.SIGCONT)
        assert watcher.seen() == victim            # the member saw it in active/
    finally:
        watcher.close()
    wait_for(running_file(dep, first).exists, what="the first request to start")
    barrier(dep)                                   # claimed and put back by now
    plant(dep, victim, "update_headers", {"filename": path.name,
                                          "values": {"qa_state": "Pass"}})
    release.touch()
    published = dep.root / "replies" / f"{victim}.json"
    wait_for(published.exists, timeout=60, what="the reply to the victim's request")
    reply = json.loads(published.read_text())      # root looks; nobody collected it yet
    assert reply["submitted_by"] == WEB, f"the member's request ran as {victim}: {reply}"
    assert reply["ok"] and reply["result"]["modified"] is True, reply
    # the member's file is refused while the genuine reply waits (rescan: 1 s)
    reason = dep.root / "failed" / f"{victim}.json.reason"
    wait_for(reason.exists, timeout=60, what="the member's request to be refused")
    assert os.lstat(dep.root / "failed" / f"{victim}.json").st_uid == uid(MEMBER)
    collected = wait_reply(dep, WEB, victim)
    assert collected["ok"] and collected["submitted_by"] == WEB, collected
    assert fits.getheader(path)["RAWGEMQA"] == "BAD"      # Fail, the victim's value
    log = dep.worker_logs()
    assert len(re.findall(rf"event=end id={re.escape(victim)} ", log)) == 1, log
    assert f"user={MEMBER} target={target}" not in log
    assert not published.exists()
    assert not list((dep.root / "failed").glob(f"{victim}.reply*"))
    assert wait_reply(dep, WEB, first)["ok"]


COMPAT_ADD = """
import json
from spoolops.compat.fitsstorage import FileopsQueue, FileOpsRequest
entry = FileopsQueue().add(FileOpsRequest("echo", {"echo": "genuine"}), response_required=True)
print(json.dumps(entry.id))
"""

COMPAT_POLL = """
import json, sys
from spoolops.compat.fitsstorage import FileopsQueue
response = FileopsQueue().poll_for_response(sys.argv[1], timeout=30)
print(json.dumps(None if response is None else
                 {"ok": response.ok, "value": response.value, "error": response.error}))
"""


def _reuse_answered_id(dep: Deployment, rid: str) -> None:
    """The member finds ``rid`` among the uncollected replies and publishes
    its own request with that id; returns once the worker dealt with it."""
    published = dep.root / "replies" / f"{rid}.json"
    wait_for(published.exists, timeout=60, what="the genuine reply")
    assert f"{rid}.json" in member_lists(dep, "replies")
    offset = len(dep.worker_logs())
    plant(dep, rid, "echo", {"echo": "forged"})
    # quarantined (now), or run (before): either way the worker has dealt with it
    wait_for(lambda: f"name='{rid}.json'" in dep.worker_logs()[offset:] or
             f"event=end id={rid} " in dep.worker_logs()[offset:], timeout=60,
             what="the worker to deal with the member's request")


def test_issue19_3b_a_member_reusing_an_answered_id_is_quarantined(deployment) -> None:
    """A member reads the id of an uncollected reply in replies/ and submits
    its own request with it: FitsStorage's poll_for_response and Client.wait
    still return the genuine answer; the member's request is kept in failed/
    with a reason and never answered."""
    dep = deployment
    # FileopsQueue.poll_for_response
    rid = dep.py_json(WEB, COMPAT_ADD)
    _reuse_answered_id(dep, rid)
    response = dep.py_json(WEB, COMPAT_POLL, rid)
    assert response is not None and response["ok"], response
    # their value for echo is its 'echo' argument (before this commit: the result)
    assert response["value"] in ("genuine", {"echo": "genuine"}), response
    # Client.wait
    rid2 = submit(dep, WEB, "echo", {"echo": "genuine"})
    _reuse_answered_id(dep, rid2)
    reply = wait_reply(dep, WEB, rid2)
    assert reply.get("result") == {"echo": "genuine"} and reply["submitted_by"] == WEB, reply
    for one in (rid, rid2):
        kept = dep.root / "failed" / f"{one}.json"
        assert os.lstat(kept).st_uid == uid(MEMBER)
        assert "in use" in (dep.root / "failed" / f"{one}.json.reason").read_text()
        assert not (dep.root / "replies" / f"{one}.json").exists()      # never answered
        assert not list((dep.root / "failed").glob(f"{one}.reply*"))
        kept.unlink()
        (dep.root / "failed" / f"{one}.json.reason").unlink()


# -- finding 4: root's cancel of a running id ----------------------------------------

def test_issue19_4_cancel_of_a_duplicate_never_touches_the_running_request(
        make_deployment) -> None:
    """spt_web's ``hold`` runs (concurrency 1, so anything else stays queued);
    spt_web2 plants new/<its id>.json; root runs ``spoolops cancel ID``: the
    duplicate is withdrawn, but active/ is untouched and no Cancelled reply
    is published; released, the request gets exactly one reply, its own."""
    dep = make_deployment(worker={"concurrency": "1"})
    dep.start_worker()
    release = dep.base / "release-cancel"
    rid = submit(dep, WEB, "hold", {"release": str(release), "tag": "victim"})
    run = running_file(dep, rid)
    wait_for(run.exists, what="the victim's request to start")
    assert f"{rid}.json" in member_lists(dep, "active")
    plant(dep, rid, "echo", {"tag": "duplicate"})
    request = dep.root / "active" / f"{rid}.json"
    before = (os.lstat(request).st_ino, os.lstat(run).st_ino)
    dep.spoolops("cancel", rid)
    assert request.exists() and run.exists(), "cancel removed the running request"
    assert (os.lstat(request).st_ino, os.lstat(run).st_ino) == before
    assert not (dep.root / "replies" / f"{rid}.json").exists(), "a reply while it runs"
    assert not (dep.root / "new" / f"{rid}.json").exists()      # the duplicate: withdrawn
    release.touch()
    reply = wait_reply(dep, WEB, rid)
    assert reply.get("ok") and reply["result"]["tag"] == "victim", reply
    assert reply["submitted_by"] == WEB
    barrier(dep)                       # the worker is past anything it had to do
    assert not (dep.root / "replies" / f"{rid}.json").exists()  # no second reply
    assert not list((dep.root / "failed").glob(f"{rid}.reply*"))
    assert len(re.findall(rf"event=end id={re.escape(rid)} ", dep.worker_logs())) == 1


# -- finding 6: unbounded metric labels -----------------------------------------------

UNKNOWN_OPS = """
import json, sys
from spoolops import Client
client, tag, count = Client(), sys.argv[1], int(sys.argv[2])
ids = [client.submit(f"nosuchop_{tag}_{n}", {}) for n in range(count)]
types = []
for rid in ids:
    reply = client.wait(rid, timeout=60)
    types.append(reply.error["type"] if reply.error else "ok")
print(json.dumps(types))
"""


def test_issue19_6_unknown_op_names_mint_no_metric_series(make_deployment) -> None:
    dep = make_deployment()
    dep.start_worker()
    tag = f"t{time.time_ns()}"
    assert dep.py_json(MEMBER, UNKNOWN_OPS, tag, "50", timeout=300) == ["UnknownOp"] * 50
    want = 'spoolops_served_total{op="-",outcome="UnknownOp"} 50'

    def metrics() -> str | None:
        done = dep.spoolops("status", "--prometheus")
        text = done.stdout
        return text if want in text or "nosuchop_" in text else None

    text = wait_for(metrics, timeout=60, interval=0.5, what="the counters in the metrics")
    assert "nosuchop_" not in text, [line for line in text.splitlines() if "nosuchop_" in line][:5]
    assert want in text
    assert len(text.splitlines()) < 100, f"{len(text.splitlines())} lines of metrics"


# -- finding 7: 'already' as an oracle for an unreadable file ---------------------------

def test_issue19_7_already_is_no_oracle_for_a_file_the_web_user_cannot_read(
        deployment) -> None:
    dep = deployment
    tag = time.time_ns()
    folder = worker_dir(dep.storage / f"secret-{tag}", 0o755)
    name = f"x-{tag}.fits"
    secret = os.urandom(5760)
    target = worker_file(folder / name, secret, 0o600)
    assert errno_of(dep, WEB, f"open({str(target)!r}, 'rb')") == "EACCES"
    args = {"filename": name, "path": folder.name}      # our shape: no overwrite
    answers = []
    for guess in (secret, bytes(len(secret)), b"short"):   # right, wrong, wrong size
        stage(dep, name, guess)
        done = dep.call(WEB, "ingest_upload", args)
        assert done.reply is not None, done.stderr
        answers.append(done.reply)
    for reply in answers:
        assert reply["ok"] is False and reply["error"]["type"] == "Conflict", answers
    assert len({reply["error"]["message"] for reply in answers}) == 1, answers
    assert target.read_bytes() == secret
    # a target the web user may read: the same bytes are 'already' there
    os.chmod(target, 0o644)
    stage(dep, name, secret)
    done = dep.call(WEB, "ingest_upload", args)
    assert done.code == 0, (done.stderr, done.reply)
    assert done.reply["result"]["already"] is True
    assert done.reply["result"]["md5"] == hashlib.md5(secret).hexdigest()
    assert not (dep.staging / name).exists()


# -- memos keyed by request, not by id ------------------------------------------------

PLANT_MEMO = """
import json, os, sys
memos, rid, note = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
os.makedirs(memos, mode=0o700, exist_ok=True)
with open(os.path.join(memos, rid + ".json"), "x") as f:
    json.dump(note, f)
print(json.dumps("noted"))
"""


def test_issue19_memo_a_request_never_takes_notes_left_under_its_id(
        fresh_deployment) -> None:
    """Notes left in work/memos/ under an id (as an earlier request with that
    id would have left them: "published, with this md5") are not the notes
    of a later request that reuses the id: that request staged nothing, and
    is answered NotFound -- not 'already published'."""
    dep = fresh_deployment
    worker_dir(dep.storage / "up", 0o755)
    name = f"m-{time.time_ns()}.fits"
    data = os.urandom(2880)
    worker_file(dep.storage / "up" / name, data, 0o644)
    rid = submit(dep, WEB, "ingest_upload", {"filename": name, "path": "up"})  # queued
    note = {"published": {"path": f"up/{name}", "size": len(data),
                          "md5": hashlib.md5(data).hexdigest(), "place": "up",
                          "sidecar": None}}
    assert dep.py_json(WORKER, PLANT_MEMO, str(dep.root / "work" / "memos"), rid,
                       json.dumps(note)) == "noted"
    dep.start_worker()
    reply = wait_reply(dep, WEB, rid)
    assert reply.get("ok") is False, f"it took the notes left under its id: {reply}"
    assert reply["error"]["type"] == "NotFound", reply
    assert "staged file not found" in reply["error"]["message"]


# -- the withdrawn request's name in tmp/ ---------------------------------------------

CANCEL = """
import json, os, sys, time
from spoolops import Client
rid, moved, go = sys.argv[1:4]
if moved != "-":
    # the member wins the race: it acts between the move aside and the open
    real_rename = os.rename
    def rename(src, dst, *args, **kwargs):
        real_rename(src, dst, *args, **kwargs)
        if str(dst).endswith(".withdrawn"):
            open(moved, "w").close()
            end = time.monotonic() + 60
            while not os.path.exists(go) and time.monotonic() < end:
                time.sleep(0.01)
    os.rename = rename
try:
    result = Client().cancel(rid)
except Exception as exc:
    result = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""

SWAP_FIFO = """
import json, os, sys
tmp, rid = sys.argv[1], sys.argv[2]
fifo = os.path.join(tmp, rid + ".member-fifo")
os.mkfifo(fifo, 0o666)
os.rename(fifo, os.path.join(tmp, rid + ".withdrawn"))
print(json.dumps("swapped"))
"""


@pytest.mark.parametrize("plant_kind", ["fifo-swapped-in", "directory-beforehand"])
def test_issue19_withdraw_a_member_cannot_spoil_the_aside_name(fresh_deployment,
                                                               plant_kind: str) -> None:
    """spt_web's durable Client.cancel moves new/ID.json aside into tmp/ and
    opens it there; spt_web2 (who may create entries in tmp/) puts a FIFO
    under tmp/ID.withdrawn right after the move (a race the member can win;
    made certain here by pausing the victim after its rename) or a folder
    there beforehand.  The cancel returns True at once and the request is
    gone.  (A FIFO put there *before* the cancel is replaced by the rename
    and never mattered.)"""
    dep = fresh_deployment                          # no worker: the request stays queued
    rid = submit(dep, WEB, "echo", {"withdraw": plant_kind})
    aside = dep.root / "tmp" / f"{rid}.withdrawn"
    home = dep.home(WEB)
    moved, go = home / "moved", home / "go"
    if plant_kind == "directory-beforehand":
        assert errno_of(dep, MEMBER, f"os.mkdir({str(aside)!r})") == "ok"
        victim = subprocess.Popen(
            ["runuser", "-u", WEB, "--", dep.accounts.python, "-c", CANCEL, rid, "-", "-"],
            env=dep.env(WEB), cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    else:
        victim = subprocess.Popen(
            ["runuser", "-u", WEB, "--", dep.accounts.python, "-c", CANCEL, rid, str(moved),
             str(go)], env=dep.env(WEB), cwd="/", stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            wait_for(moved.exists, timeout=60, what="the victim to move its request aside")
            assert dep.py_json(MEMBER, SWAP_FIFO, str(dep.root / "tmp"), rid) == "swapped"
        finally:
            go.touch()
    try:
        out, err = victim.communicate(timeout=30)
    finally:
        victim.kill()
    assert json.loads(out.strip().splitlines()[-1]) is True, (out, err)
    assert not (dep.root / "new" / f"{rid}.json").exists()
    # nothing of the victim's left in tmp/ (the member's plant is its own)
    left = [p for p in (dep.root / "tmp").iterdir() if p.name.startswith(rid)]
    assert [p.name for p in left if os.lstat(p).st_uid == uid(WEB)] == []
    for path in left:
        path.rmdir() if path.is_dir() else path.unlink()
    dep.start_worker()
    barrier(dep)
    assert rid not in dep.worker_logs()                   # it never ran
    assert "timeout" in wait_reply(dep, WEB, rid, timeout=0.5)


# -- attacks on the new code ----------------------------------------------------------

def test_attack_a_planted_reply_file_is_removed_and_the_genuine_one_published(
        deployment) -> None:
    """A member who sees a running id plants replies/<id>.json (a plain file
    of its own, a forged answer): the worker removes it and publishes the
    genuine reply, which the client takes."""
    dep = deployment
    release = dep.base / f"release-plant-{time.time_ns()}"
    rid = submit(dep, WEB, "hold", {"release": str(release), "tag": "genuine"})
    wait_for(running_file(dep, rid).exists, what="the request to start")
    assert f"{rid}.json" in member_lists(dep, "active")
    forged = dep.root / "replies" / f"{rid}.json"
    code = ("import json, sys\nwith open(sys.argv[1], 'x') as f:\n"
            "    json.dump({'version': 1, 'id': sys.argv[2], 'ok': True,"
            " 'result': {'tag': 'forged'}}, f)\nprint(json.dumps('planted'))")
    assert dep.py_json(MEMBER, code, str(forged), rid) == "planted"
    release.touch()
    wait_for(lambda: forged.exists() and os.lstat(forged).st_uid == uid(WORKER),
             timeout=60, what="the worker's reply in place of the plant")
    reply = wait_reply(dep, WEB, rid)
    assert reply.get("ok") and reply["result"]["tag"] == "genuine", reply
    assert not list((dep.root / "failed").glob(f"{rid}.reply*"))


def test_found_a_planted_directory_blocks_the_reply(make_deployment) -> None:
    dep = make_deployment()
    dep.start_worker()
    release = dep.base / "release-dir"
    rid = submit(dep, WEB, "hold", {"release": str(release), "tag": "genuine"})
    wait_for(running_file(dep, rid).exists, what="the request to start")
    assert f"{rid}.json" in member_lists(dep, "active")
    assert errno_of(dep, MEMBER, f"os.mkdir({str(dep.root / 'replies' / (rid + '.json'))!r})"
                    ) == "ok"
    release.touch()
    reply = wait_reply(dep, WEB, rid, timeout=15)
    assert reply.get("ok") and reply["result"]["tag"] == "genuine", (
        reply, [line for line in dep.worker_logs().splitlines() if rid in line][-3:])


def test_found_a_planted_directory_keeps_the_worker_from_starting(make_deployment) -> None:
    dep = make_deployment()
    worker = dep.start_worker()
    release = dep.base / "release-dir-restart"
    rid = submit(dep, WEB, "hold", {"release": str(release), "tag": "genuine"})
    wait_for(running_file(dep, rid).exists, what="the request to start")
    assert errno_of(dep, MEMBER, f"os.mkdir({str(dep.root / 'replies' / (rid + '.json'))!r})"
                    ) == "ok"
    release.touch()
    # the plant is moved aside (the janitor reaps it) and the reply published
    published = dep.root / "replies" / f"{rid}.json"
    wait_for(published.is_file, timeout=60, what="the genuine reply over the plant")
    assert wait_reply(dep, WEB, rid)["submitted_by"] == WEB
    assert [n for n in os.listdir(dep.root / "replies") if n.startswith(".planted-")]
    dep.stop_worker(worker)
    again = dep.start_worker(wait=False)
    try:
        dep.wait_log(again, f"event=worker_ready pid={again.pid}", timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"the worker does not start again: {str(exc)[-600:]}") from None
    assert dep.call(WEB, "echo", {"after": "restart"}).code == 0


def test_found_a_member_makes_cancel_of_a_put_back_request_lie(make_deployment) -> None:
    """A request held in active/ (claimed in one batch with another of its
    target) cannot be withdrawn; a member's file planted under its id in
    new/ must not make its client's cancel say it was."""
    dep = make_deployment()
    worker = dep.start_worker()
    target = f"lie-{time.time_ns()}"
    release = dep.base / "release-lie"
    os.kill(worker.pid, signal.SIGSTOP)
    first = submit(dep, WEB, "hold", {"release": str(release), "target": target,
                                      "tag": "first"})
    # no deadline: a request queued by submit(), withdrawn later by its client
    victim = submit(dep, WEB, "sleep", {"seconds": 0, "target": target, "tag": "victim"})
    watcher = ActiveWatcher(dep, skip=[first])
    try:
        os.kill(worker.pid, signal.SIGCONT)
        assert watcher.seen() == victim
    finally:
        watcher.close()
    barrier(dep)                                   # put back by now
    plant(dep, victim, "echo", {"tag": "member"})
    cancelled = dep.py_json(WEB, "import json, sys\nfrom spoolops import Client\n"
                                 "print(json.dumps(Client().cancel(sys.argv[1])))", victim)
    release.touch()
    assert wait_reply(dep, WEB, first)["ok"]
    reply = wait_reply(dep, WEB, victim, timeout=10)
    ran = "timeout" not in reply
    assert not (cancelled and ran), f"cancel said True, and the request ran: {reply}"


def test_found_an_operator_requeue_puts_a_claimed_request_where_a_member_swaps_it(
        make_deployment) -> None:
    dep = make_deployment()
    worker = dep.start_worker()
    release = dep.base / "release-requeue"
    rid = submit(dep, WEB, "hold", {"release": str(release), "tag": "victim"})
    wait_for(running_file(dep, rid).exists, what="the request to start")
    assert f"{rid}.json" in member_lists(dep, "active")      # the member knows the id
    dep.stop_worker(worker, signal.SIGKILL)
    done = dep.spoolops("requeue", rid)
    assert done.returncode == 0 and "active" in done.stdout, (done.stdout, done.stderr)
    plant(dep, rid, "echo", {"tag": "member"})
    release.touch()
    dep.start_worker()
    reply = wait_reply(dep, WEB, rid, timeout=20)
    assert reply.get("submitted_by") == WEB and reply["result"]["tag"] == "victim", (
        reply, [line for line in dep.worker_logs().splitlines() if rid in line],
        {d: os.listdir(dep.root / d) for d in ("new", "active", "failed", "replies")})


def test_found_already_is_an_oracle_for_a_file_in_an_unsearchable_folder(deployment) -> None:
    dep = deployment
    tag = time.time_ns()
    folder = worker_dir(dep.storage / f"private-{tag}", 0o700)
    name = f"p-{tag}.fits"
    secret = os.urandom(2880)
    target = worker_file(folder / name, secret, 0o644)
    assert errno_of(dep, WEB, f"open({str(target)!r}, 'rb')") == "EACCES"
    answers = []
    for guess in (secret, bytes(len(secret))):
        stage(dep, name, guess)
        done = dep.call(WEB, "ingest_upload", {"filename": name, "path": folder.name})
        answers.append(done.reply)
    (dep.staging / name).unlink(missing_ok=True)
    assert [a["ok"] for a in answers] == [False, False], answers
    assert len({a["error"]["message"] for a in answers}) == 1, answers


def test_found_a_member_removes_an_uncollected_reply_and_reuses_its_id(deployment) -> None:
    """Audit of the fixes: ``replies/`` is group-writable, so a member may
    remove a reply its client has not collected yet; the id is then no
    longer in use, and the member's own request under it runs and is
    answered by the worker.  The victim's client must not take that answer
    for its own (it answers the member's request: ``submitted_by``).  Only
    the client's own check stands here; without it the victim's
    ``wait`` returned the member's result."""
    dep = deployment
    rid = submit(dep, WEB, "echo", {"who": "victim"})
    published = dep.root / "replies" / f"{rid}.json"
    wait_for(published.exists, timeout=60, what="the genuine reply")
    done = dep.py(MEMBER, "import os, sys\nos.unlink(sys.argv[1])", str(published))
    assert done.returncode == 0, done.stderr
    plant(dep, rid, "echo", {"who": "member"})
    wait_for(lambda: published.exists() and os.lstat(published).st_uid == uid(WORKER),
             timeout=60, what="the worker's answer to the member's request")
    assert json.loads(published.read_text())["submitted_by"] == MEMBER
    got = wait_reply(dep, WEB, rid, timeout=3)
    assert (got.get("result") or {}).get("who") != "member", got
    assert "timeout" in got, got           # the victim's answer is gone: not replaced
