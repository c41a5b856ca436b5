"""The real deployment: distinct unix accounts and the config ``spoolops init`` writes.

Every client-facing path runs here the way a host runs it (see
``tests/support/accounts.py``): the worker as ``spt_wrk``, whose primary group is
its own; the web application as ``spt_web``, a member of the submit group
``spt_sub``; a second member ``spt_web2`` that ``[access]`` keeps from some
ops; an outsider ``spt_out``.  ``durable = yes``.  Root only inspects, and
runs the admin commands an operator would run as root.

Tests named ``test_issue11_*`` each failed on the code before the deployment
fixes (the item number is in the name).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from support.accounts import (
    GROUP,
    MEMBER,
    OUTSIDER,
    WAIT,
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

















# -- the accounts and the config are the real thing ----------------------------

def test_worker_primary_group_is_not_the_submit_group(deployment: Deployment) -> None:
    assert pwd.getpwnam(WORKER).pw_gid != gid(GROUP)
    assert WORKER in grp.getgrnam(GROUP).gr_mem
    text = deployment.config_path.read_text()
    assert "durable = yes" in text and f"worker_user = {WORKER}" in text


def test_init_sets_owners_modes_and_setgid(deployment: Deployment) -> None:
    expected = {"tmp": 0o2730, "new": 0o2730, "active": 0o2750, "failed": 0o2750,
                "replies": 0o2770, "work": 0o2700}
    for name, mode in expected.items():
        st = os.lstat(deployment.root / name)
        assert stat.S_IMODE(st.st_mode) == mode, name
        assert (st.st_uid, st.st_gid) == (uid(WORKER), gid(GROUP)), name
    st = os.lstat(deployment.storage)
    assert st.st_uid == uid(WORKER) and stat.S_IMODE(st.st_mode) & 0o022 == 0


def test_init_is_idempotent_and_repairs(deployment: Deployment) -> None:
    again = deployment.spoolops("init")
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout and "mode of" not in again.stdout
    new = deployment.root / "new"
    os.chmod(new, 0o777)
    repaired = deployment.spoolops("init")
    assert repaired.returncode == 0, repaired.stderr
    assert f"mode of {new} set to 2730" in repaired.stdout
    assert stat.S_IMODE(os.stat(new).st_mode) == 0o2730


def test_init_refuses_a_member_who_cannot_chown(deployment: Deployment) -> None:
    done = deployment.spoolops("init", user=WEB)
    assert done.returncode == 2
    assert "root" in done.stderr and "Traceback" not in done.stderr


# -- the web user: submit, wait, call, cancel (durable = yes) -----------------------

def test_issue11_1_web_user_calls_echo_with_the_cli(deployment: Deployment) -> None:
    """Item 1: the durable submit needs no read access to new/ (mode 2730)."""
    done = deployment.call(WEB, "echo", {"x": 1})
    assert done.code == 0, done.stderr
    assert done.reply["ok"] and done.reply["result"] == {"x": 1}
    assert done.reply["submitted_by"] == WEB
    assert not os.listdir(deployment.root / "tmp")


def test_issue11_1_client_call_submit_wait_from_python(deployment: Deployment) -> None:
    code = """
import json
from spoolops import Client
c = Client()
a = c.call("echo", {"y": 2}, timeout=30)
rid = c.submit("echo", {"z": 3})
b = c.wait(rid, timeout=30)
print(json.dumps([a, b.result, b.submitted_by]))
"""
    assert deployment.py_json(WEB, code) == [{"y": 2}, {"z": 3}, WEB]


def test_issue11_1_durable_cancel_as_a_member(deployment: Deployment) -> None:
    """Item 1: Client.cancel of a queued request (kept queued behind a busy
    target) needs no read access to new/ either, and the request never runs."""
    target = f"cancel-{time.time_ns()}"
    busy = submit(deployment, WEB, "sleep", {"seconds": 2, "target": target, "tag": "busy"})
    wait_for(running_file(deployment, busy).exists, what="the busy request to start")
    queued = submit(deployment, WEB, "sleep", {"seconds": 0, "target": target,
                                               "tag": "cancelled"})
    code = ("import json, sys\nfrom spoolops import Client\n"
            "print(json.dumps(Client().cancel(sys.argv[1])))\n")
    assert deployment.py_json(WEB, code, queued) is True
    assert deployment.py_json(WEB, code, queued) is False       # gone: nothing to withdraw
    after = submit(deployment, WEB, "sleep", {"seconds": 0, "target": target, "tag": "after"})
    assert wait_reply(deployment, WEB, busy)["ok"]
    assert wait_reply(deployment, WEB, after)["result"]["tag"] == "after"
    assert "timeout" in wait_reply(deployment, WEB, queued, timeout=0.5)
    log = deployment.workers[0].log_path.read_text()
    assert queued not in log                                     # it never ran
    assert not [n for n in os.listdir(deployment.root / "tmp")]  # nothing left aside


def test_issue11_2_reply_carries_the_submit_group(deployment: Deployment) -> None:
    """Item 2: the worker's primary group is its own, yet its replies are in
    the submit group, 0640, owned by the worker: the client reads them."""
    done = deployment.spoolops("call", "echo", "--arg", "g=1", "--no-wait", user=WEB)
    assert done.returncode == 0, done.stderr
    rid = done.stdout.strip()
    reply = deployment.root / "replies" / f"{rid}.json"
    wait_for(reply.exists, what="the reply")
    st = os.lstat(reply)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid(WORKER), gid(GROUP), 0o640)
    assert wait_reply(deployment, WEB, rid)["result"] == {"g": "1"}


def test_a_web_server_umask_of_077_does_not_hide_requests(deployment: Deployment) -> None:
    code = """
import json, os
os.umask(0o077)
from spoolops import Client
print(json.dumps(Client().call("echo", {"umask": "077"}, timeout=30)))
"""
    assert deployment.py_json(WEB, code) == {"umask": "077"}


def test_call_without_a_worker_times_out_and_withdraws(fresh_deployment: Deployment) -> None:
    done = fresh_deployment.call(WEB, "echo", {"x": 1}, timeout=1)
    assert done.code == 3 and "no reply" in done.stderr
    assert os.listdir(fresh_deployment.root / "new") == []
    assert os.listdir(fresh_deployment.root / "tmp") == []


def test_deadline_passed_is_expired(deployment: Deployment) -> None:
    rid = submit(deployment, WEB, "echo", {"late": True}, deadline=time.time() - 5)
    reply = wait_reply(deployment, WEB, rid)
    assert reply["ok"] is False and reply["error"]["type"] == "Expired"


def test_failures_come_back_as_typed_errors(deployment: Deployment) -> None:
    code = """
import json
from spoolops import Client, UnknownOp, OpFailed
c = Client()
out = []
for op in ("no_such_op", "crash"):
    try:
        c.call(op, {}, timeout=30)
    except (UnknownOp, OpFailed) as exc:
        out.append([type(exc).__name__, isinstance(exc, OSError)])
print(json.dumps(out))
"""
    assert deployment.py_json(WEB, code) == [["UnknownOp", False], ["OpFailed", False]]


def test_fits_operations_as_the_web_user(deployment: Deployment) -> None:
    from astropy.io import fits
    path = fits_file(deployment, f"deploy-{time.time_ns()}.fits")
    done = deployment.call(WEB, "update_headers", {"filename": path.name,
                                                   "values": {"qa_state": "Pass"}})
    assert done.code == 0, (done.stderr, done.reply)
    assert done.reply["result"]["modified"] is True
    assert fits.getheader(path)["RAWGEMQA"] == "USABLE"
    st = os.stat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid(WORKER), 0o644)
    # an upload staged by the web user, ingested by the worker
    staged = deployment.staging / f"up-{time.time_ns()}.fits"
    deployment.py(WEB, f"open({str(staged)!r}, 'wb').write(open({str(path)!r}, 'rb').read())")
    done = deployment.call(WEB, "ingest_upload", {"filename": staged.name, "path": "uploads"})
    assert done.code == 0, (done.stderr, done.reply)
    stored = deployment.storage / "uploads" / staged.name
    assert stored.read_bytes() == path.read_bytes() and not staged.exists()
    assert os.stat(stored).st_uid == uid(WORKER)


def test_member_not_allowed_by_access_is_refused(deployment: Deployment) -> None:
    path = fits_file(deployment, f"member-{time.time_ns()}.fits")
    before = path.read_bytes()
    done = deployment.call(MEMBER, "update_headers", {"filename": path.name,
                                                      "values": {"qa_state": "Fail"}})
    assert done.code == 1 and done.reply["error"]["type"] == "PermissionDenied"
    assert done.reply["submitted_by"] == MEMBER
    assert path.read_bytes() == before
    whoami = deployment.call(MEMBER, "whoami")
    assert whoami.code == 0 and whoami.reply["result"] == {"user": MEMBER}


def test_outsider_can_neither_submit_nor_read(deployment: Deployment) -> None:
    for d in ("tmp", "new", "replies", "active", "failed", "work"):
        path = deployment.root / d / "intruder.json"
        assert errno_of(deployment, OUTSIDER, f"open({str(path)!r}, 'x')") == "EACCES", d
    done = deployment.call(OUTSIDER, "echo", {"x": 1}, timeout=5)
    assert done.code == 2 and "permission denied" in done.stderr.lower()
    assert errno_of(deployment, OUTSIDER,
                    f"os.listdir({str(deployment.root / 'replies')!r})") == "EACCES"


def test_web_user_cannot_touch_storage_or_active(deployment: Deployment) -> None:
    path = fits_file(deployment, f"guard-{time.time_ns()}.fits")
    assert errno_of(deployment, WEB, f"open({str(path)!r}, 'r+b')") == "EACCES"
    assert errno_of(deployment, WEB, f"os.unlink({str(path)!r})") == "EACCES"
    assert errno_of(deployment, WEB,
                    f"open({str(deployment.storage / 'new.fits')!r}, 'xb')") == "EACCES"
    victim = deployment.root / "active" / "someone-elses.json"
    victim.write_text("{}")
    os.chown(victim, uid(WORKER), gid(GROUP))
    try:
        assert errno_of(deployment, WEB, f"os.unlink({str(victim)!r})") == "EACCES"
        assert errno_of(deployment, WEB, f"os.rename({str(victim)!r},"
                        f" {str(deployment.root / 'new' / 'stolen.json')!r})") == "EACCES"
    finally:
        victim.unlink()


def test_forged_reply_is_ignored_by_the_client(deployment: Deployment) -> None:
    code = """
import json, os
from spoolops import Client
c = Client()
rid = c.submit("sleep", {"seconds": 1, "tag": "real"})
with open(os.path.join(c.config.root, "replies", rid + ".json"), "x") as f:
    json.dump({"version": 1, "id": rid, "ok": True, "result": {"tag": "forged"}}, f)
print(json.dumps(c.wait(rid, timeout=60).result["tag"]))
"""
    assert deployment.py_json(MEMBER, code) == "real"


def test_issue11_10_what_a_member_can_see_is_what_the_threat_model_says(
        deployment: Deployment) -> None:
    """Item 10: members can list active/ and replies/ (the reply watch needs
    it), not tmp/, new/ or work/; docs/threat-model.rst says exactly that."""
    root = deployment.root
    for name, expected in (("active", "ok"), ("replies", "ok"), ("new", "EACCES"),
                           ("tmp", "EACCES"), ("work", "EACCES")):
        assert errno_of(deployment, WEB, f"os.listdir({str(root / name)!r})") == expected, name
    doc = (Path(__file__).resolve().parent.parent / "docs" / "threat-model.rst").read_text()
    text = " ".join(doc.split())
    assert "can list ``active/`` and ``replies/``" in text
    assert "cannot list ``tmp/``, ``new/`` or ``work/``" in text


# -- admin commands run as root (item 3) -------------------------------------------

def test_issue11_3_root_cancel_wakes_the_waiting_web_client(
        fresh_deployment: Deployment) -> None:
    """A Cancelled reply published by root's 'spoolops cancel' is the worker
    user's, in the submit group: the waiting client reads it at once."""
    dep = fresh_deployment
    rid = submit(dep, WEB, "echo", {"n": 1})
    waiter = subprocess.Popen(
        ["runuser", "-u", WEB, "--", dep.accounts.python, "-c", WAIT, rid, "60"],
        env=dep.env(WEB), cwd="/", stdout=subprocess.PIPE, text=True)
    try:
        done = dep.spoolops("cancel", rid)
        assert done.returncode == 0, done.stderr
        out, _ = waiter.communicate(timeout=90)
    finally:
        waiter.kill()
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["ok"] is False and reply["error"]["type"] == "Cancelled"
    assert "withdrawn by root" in reply["error"]["message"]
    # and without a waiter, the reply as it lies in replies/
    rid = submit(dep, WEB, "echo", {"n": 2})
    assert dep.spoolops("cancel", rid).returncode == 0
    st = os.lstat(dep.root / "replies" / f"{rid}.json")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid(WORKER), gid(GROUP), 0o640)


def test_issue11_3_root_requeue_leaves_a_tree_the_worker_can_use(
        fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    worker = dep.start_worker()
    rid = submit(dep, WEB, "nonidem", {"seconds": 30, "tag": "cut"})
    wait_for(running_file(dep, rid).exists, what="nonidem to start")
    dep.stop_worker(worker, signal.SIGKILL)
    (dep.root / "work" / "worker.lock").unlink()       # as on a tree never served
    done = dep.spoolops("requeue", rid)
    assert done.returncode == 0 and "active" in done.stdout, done.stderr
    for path in [dep.root / "work" / "worker.lock", dep.root / "active" / f"{rid}.json"]:
        assert os.lstat(path).st_uid in (uid(WORKER), uid(WEB)), path
    assert os.lstat(dep.root / "work" / "worker.lock").st_uid == uid(WORKER)
    # requeued where it is (never through new/): claimed, so not withdrawable
    assert not running_file(dep, rid).exists()
    assert dep.spoolops("cancel", rid).returncode == 1
    dep.start_worker()                                  # opens the lock as itself
    assert dep.call(WEB, "echo", {"after": "requeue"}).code == 0


def test_issue11_3_root_janitor_recovery_answers_in_the_submit_group(
        fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    worker = dep.start_worker()
    rid = submit(dep, WEB, "nonidem", {"seconds": 30, "tag": "cut"})
    wait_for(running_file(dep, rid).exists, what="nonidem to start")
    dep.stop_worker(worker, signal.SIGKILL)
    done = dep.spoolops("janitor", "--json")
    assert done.returncode == 1, done.stderr                # an orphan: stuck work
    report = json.loads(done.stdout)
    assert report["recovered"]["interrupted"] == 1
    for path in (dep.root / "replies" / f"{rid}.json",
                 dep.root / "failed" / f"{rid}.json.reason"):
        assert os.lstat(path).st_uid == uid(WORKER), path
    assert os.lstat(dep.root / "replies" / f"{rid}.json").st_gid == gid(GROUP)
    reply = wait_reply(dep, WEB, rid)
    assert reply["error"]["type"] == "Interrupted"


# -- the worker's bookkeeping (items 4, 5, 6, 7) -------------------------------------

def test_issue11_4_missing_target_behind_a_backlog_gets_its_reply(
        fresh_deployment: Deployment) -> None:
    """Concurrency 1, twenty echoes queued and one update_headers of a file
    that does not exist: the last gets NotFound (an op error is never taken
    for a vanished request file).  The periodic rescan, which hid the bug
    by re-finding the request a minute later, is put an hour away."""
    import re
    dep = fresh_deployment
    text = dep.config_path.read_text().replace("concurrency = 4", "concurrency = 1")
    text = re.sub(r"(?m)^rescan_interval = .*$", "rescan_interval = 1h", text)
    dep.config_path.write_text(text)
    code = """
import json
from spoolops import Client
c = Client()
ids = [c.submit("echo", {"n": n}) for n in range(20)]
ids.append(c.submit("update_headers", {"filename": "missing/none.fits",
                                       "values": {"qa_state": "Pass"}}))
print(json.dumps(ids))
"""
    ids = dep.py_json(WEB, code)
    dep.start_worker()
    replies = [wait_reply(dep, WEB, rid, timeout=60) for rid in ids]
    assert all(r.get("ok") for r in replies[:20]), replies[:20]
    assert replies[20].get("error", {}).get("type") == "NotFound", replies[20]


def test_issue11_5_a_duplicate_id_never_touches_the_running_request(
        fresh_deployment: Deployment) -> None:
    """A member drops new/<running id>.json: it is quarantined, and the
    running request keeps its run file -- so after a crash it is answered
    Interrupted (it started) instead of being run a second time."""
    dep = fresh_deployment
    worker = dep.start_worker()
    rid = submit(dep, WEB, "nonidem", {"seconds": 20, "tag": "once"})
    run_file = running_file(dep, rid)
    wait_for(run_file.exists, what="nonidem to start")
    plant = (f"import json\nopen({str(dep.root / 'new' / (rid + '.json'))!r}, 'w').write("
             f"json.dumps({{'version': 1, 'id': {rid!r}, 'op': 'echo', 'args': {{}}}}))")
    assert dep.py(MEMBER, plant).returncode == 0
    reason = dep.root / "failed" / f"{rid}.json.reason"
    wait_for(reason.exists, what="the duplicate to be quarantined")
    assert "already running" in reason.read_text()
    assert run_file.exists()
    dep.stop_worker(worker, signal.SIGKILL)
    dep.start_worker()
    reply = wait_reply(dep, WEB, rid, timeout=60)
    assert reply.get("error", {}).get("type") == "Interrupted", reply


def test_issue11_6_a_planted_reply_does_not_make_an_orphan_vanish(
        fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    worker = dep.start_worker()
    rid = submit(dep, WEB, "nonidem", {"seconds": 20, "tag": "real"})
    wait_for(running_file(dep, rid).exists, what="nonidem to start")
    dep.stop_worker(worker, signal.SIGKILL)
    forged = dep.root / "replies" / f"{rid}.json"
    plant = (f"import json\nopen({str(forged)!r}, 'w').write(json.dumps({{'version': 1,"
             f" 'id': {rid!r}, 'ok': True, 'result': {{'tag': 'forged'}}}}))")
    assert dep.py(MEMBER, plant).returncode == 0
    dep.start_worker()
    reply = wait_reply(dep, WEB, rid, timeout=60)
    assert reply.get("error", {}).get("type") == "Interrupted", reply


def test_issue11_7_the_janitor_reports_only_what_it_did(fresh_deployment: Deployment) -> None:
    """Orphans of an op the janitor does not know (the site package is not on
    its path): it recovers nothing and says so, and claims no action done."""
    dep = fresh_deployment
    worker = dep.start_worker()
    rid = submit(dep, WEB, "nonidem", {"seconds": 30, "tag": "x"})
    wait_for(running_file(dep, rid).exists, what="nonidem to start")
    dep.stop_worker(worker, signal.SIGKILL)
    env = dep.env(WORKER)
    env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep)
                                        if not p.endswith("siteops"))
    done = dep.run_as(WORKER, dep.accounts.python, "-m", "spoolops", "janitor", "--json",
                      env=env)
    report = json.loads(done.stdout)
    assert done.returncode == 1, done.stderr
    assert not [a for a in report["actions"] if a["done"] and rid in a["path"]], report
    orphan = [f for f in report["findings"] if rid in f["path"]]
    assert orphan and "left for the worker" in orphan[0]["why"], report
    assert report["recovered"] is None
    assert (dep.root / "active" / f"{rid}.json").exists()


# -- operator views as the accounts that run them ------------------------------------

def test_operator_views_as_root_the_worker_user_and_a_member(deployment: Deployment) -> None:
    # running until the views are done, however slow the host (no sleep stands in)
    release = deployment.base / "release-views"
    rid = submit(deployment, WEB, "hold", {"release": str(release), "target": "views",
                                            "timeout": 120})
    wait_for(running_file(deployment, rid).exists, what="the request to start")
    for user in (None, WORKER):
        status = deployment.spoolops("status", "--json", user=user)
        assert status.returncode == 0, (user, status.stdout, status.stderr)
        body = json.loads(status.stdout)
        assert body["worker"]["alive"] is True and body["running"]["count"] >= 1
        show = deployment.spoolops("show", rid, "--json", user=user)
        assert show.returncode == 0 and json.loads(show.stdout)["state"] == "running"
        listing = deployment.spoolops("ls", "active", user=user)
        assert rid in listing.stdout, (user, listing.stdout, listing.stderr)
    member = deployment.spoolops("status", "--json", user=WEB)
    assert member.returncode == 1
    assert any("cannot list new/" in p for p in json.loads(member.stdout)["problems"])
    release.touch()
    assert wait_reply(deployment, WEB, rid)["ok"]


def test_tail_as_the_worker_user_follows_a_web_request(deployment: Deployment) -> None:
    tail = subprocess.Popen(["setpriv", f"--reuid={WORKER}", f"--regid={WORKER}",
                             "--init-groups", "--", deployment.accounts.python,
                             "-m", "spoolops", "tail", "--json"],
                            env=deployment.env(WORKER), cwd="/", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    lines = Lines(tail.stdout)

    def next_event(until: float) -> dict | None:
        line = lines.next(until)
        return json.loads(line) if line else None

    try:
        deadline = time.monotonic() + 60
        # tail has set its watches once it reports something: probe until it
        # does (an event, not a sleep, says it is ready)
        while next_event(time.monotonic() + 1.0) is None:
            assert time.monotonic() < deadline, "tail never reported an event"
            deployment.call(WEB, "echo", {"probe": 1})
        rid = submit(deployment, WEB, "sleep", {"seconds": 0.2, "tag": "tailed"})
        seen = []
        while not seen or seen[-1]["event"] != "finished":
            event = next_event(deadline)
            assert event is not None, f"tail stopped short: {seen}"
            if event.get("id") == rid:
                seen.append(event)
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(30) == 0, tail.stderr.read()
    finally:
        tail.kill()
    assert [e["event"] for e in seen] == ["queued", "started", "finished"], seen
    assert seen[-1]["ok"] is True and seen[1]["user"] == WEB
    assert wait_reply(deployment, WEB, rid)["ok"]


# -- hostile entries and doctor ------------------------------------------------------

def test_hostile_entries_from_a_member(deployment: Deployment) -> None:
    new = deployment.root / "new"
    tag = time.time_ns()
    code = f"""
import os
new = {str(new)!r}
os.symlink("/etc/shadow", os.path.join(new, "acct-symlink-{tag}.json"))
os.mkfifo(os.path.join(new, "acct-fifo-{tag}.json"))
os.mkdir(os.path.join(new, "acct-dir-{tag}.json"), 0o755)
fd = os.open(os.path.join(new, "acct-unreadable-{tag}.json"), os.O_CREAT | os.O_WRONLY, 0o600)
os.write(fd, b'{{"version": 1, "id": "acct-unreadable-{tag}", "op": "echo"}}')
os.close(fd)
with open(os.path.join(new, "acct-badjson-{tag}.json"), "w") as f:
    f.write("{{not json")
"""
    done = deployment.py(MEMBER, code)
    assert done.returncode == 0, done.stderr
    failed = deployment.root / "failed"
    for name, phrase in ((f"acct-symlink-{tag}.json", "symbolic link"),
                         (f"acct-fifo-{tag}.json", "FIFO"),
                         (f"acct-dir-{tag}.json", "directory")):
        reason = failed / f"{name}.reason"
        wait_for(reason.exists, timeout=60, what=f"reason for {name}")
        assert phrase in reason.read_text(), (name, reason.read_text())
    assert (new / f"acct-dir-{tag}.json").is_dir()        # not movable: left, skipped
    # attributable to an id: answered, to the member, naming what is wrong
    for name, phrase in ((f"acct-badjson-{tag}", "not valid JSON"),
                         (f"acct-unreadable-{tag}", "may not read the request file")):
        reply = wait_reply(deployment, MEMBER, name)
        assert reply["error"]["type"] == "BadRequest" and phrase in reply["error"]["message"]
    assert deployment.workers[0].poll() is None
    assert deployment.call(WEB, "echo", {"after": 1}).code == 0
    os.rmdir(new / f"acct-dir-{tag}.json")
    for name in os.listdir(failed):
        if str(tag) in name:
            os.unlink(failed / name)


def test_doctor_accepts_the_deployment_and_flags_what_breaks_it(
        fresh_deployment: Deployment) -> None:
    dep = fresh_deployment
    worker = dep.start_worker()
    good = dep.spoolops("doctor")
    assert good.returncode == 0, good.stdout + good.stderr
    # replies would take the worker's own group: work/ not setgid (an old tree)
    os.chmod(dep.root / "work", 0o700)
    bad = dep.spoolops("doctor")
    assert bad.returncode == 1
    assert "reply group" in bad.stdout and "spoolops init" in bad.stdout, bad.stdout
    os.chmod(dep.root / "work", 0o2700)
    # a worker started without its supplementary groups
    dep.stop_worker(worker)
    loner = subprocess.Popen(["setpriv", f"--reuid={WORKER}", f"--regid={WORKER}",
                              "--clear-groups", "--", dep.accounts.python, "-m", "spoolops",
                              "worker"], env=dep.env(WORKER), cwd="/",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = loner.communicate(timeout=60)
    assert loner.returncode == 2 and "not in the submit group" in err, err
    # a member named in [access] who is not in the group
    text = dep.config_path.read_text() + f"echo = {OUTSIDER}\n"
    dep.config_path.write_text(text)
    bad = dep.spoolops("doctor")
    assert bad.returncode == 1 and f"usermod -aG {GROUP} {OUTSIDER}" in bad.stdout


# -- many threads, one client (item 11) ----------------------------------------------

THREADS = """
import json, sys, threading, time
import spoolops.client
spoolops.client.BACKSTOP_POLL_S = 60.0   # a missed wake-up now shows as a stall to timeout
from spoolops import Client
client = Client()
threads, calls, rounds = (int(a) for a in sys.argv[1:4])
slowest = 0.0

def run(n):
    global slowest
    for i in range(calls):
        t0 = time.monotonic()
        rid = client.submit("echo", {"n": n, "i": i})
        assert client.wait(rid, timeout=10).result == {"n": n, "i": i}
        slowest = max(slowest, time.monotonic() - t0)

# rounds of short-lived threads: every thread's last call is where a reader
# that leaves must hand the reading to a waiter still waiting
for _ in range(rounds):
    pool = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if slowest > 5:
        break
print(json.dumps({"slowest": slowest}))
"""


def test_issue11_11_threads_sharing_one_client_lose_no_wake_up(deployment: Deployment) -> None:
    """Rounds of sixteen threads of one web process sharing one Client: every
    reply wakes its waiter.  (A missed wake-up waited for the 2 s backstop
    poll; the backstop is a minute here, so one shows as a 10 s stall.)"""
    out = deployment.py_json(WEB, THREADS, "16", "5", "20", timeout=900)
    assert out["slowest"] < 5, f"a call stalled {out['slowest']:.1f} s: a lost wake-up"


APP = """
import json, time
import spoolops.client
spoolops.client.BACKSTOP_POLL_S = 60.0
from spoolops import Client
client = Client()            # made before gunicorn forks (--preload)

def app(environ, start_response):
    t0 = time.monotonic()
    result = client.call("echo", {"q": environ.get("QUERY_STRING", "")}, timeout=10)
    body = json.dumps({"result": result, "seconds": time.monotonic() - t0}).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]
"""


def test_issue11_11_echo_through_a_threaded_web_server(deployment: Deployment) -> None:
    """gunicorn --preload, 3 workers x 8 threads, as the web user: 25 bursts
    of 24 concurrent echo calls (each burst's end leaves threads idle, where
    a lost wake-up shows), none anywhere near the backstop."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    app = deployment.base / "spoolapp.py"
    app.write_text(APP)
    app.chmod(0o644)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["setpriv", f"--reuid={WEB}", f"--regid={WEB}", "--init-groups", "--",
         deployment.accounts.python, "-m", "gunicorn", "--preload", "-w", "3", "--threads",
         "8", "-b", f"127.0.0.1:{port}", "--chdir", str(deployment.base), "spoolapp:app"],
        env=deployment.env(WEB), cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"

    def get(n: int) -> dict:
        with urllib.request.urlopen(f"{url}?{n}", timeout=60) as response:
            return json.loads(response.read())

    answers: list[dict] = []
    try:
        def up() -> bool:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                return get(-1)["result"] == {"q": "-1"}
            except OSError:
                return False
        wait_for(up, timeout=60, interval=0.1, what="gunicorn to serve")
        with ThreadPoolExecutor(24) as pool:
            for burst in range(25):
                answers += pool.map(get, range(burst * 24, burst * 24 + 24))
                if max(a["seconds"] for a in answers) > 5:
                    break
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    slowest = max(a["seconds"] for a in answers)
    assert slowest < 5, f"an echo took {slowest:.1f} s: a wake-up was lost"
    assert [a["result"] for a in answers] == [{"q": str(n)} for n in range(600)]


# -- FitsStorage's web handlers, emulated as the web user ---------------------------

def _readme_block(label: str) -> str:
    """The code block after '.. test: LABEL' in README.rst, dedented."""
    import re
    text = (Path(__file__).resolve().parent.parent / "README.rst").read_text()
    match = re.search(rf"^\.\. test: {label}\n\n\.\. code-block:: python\n\n((?:    .*\n|\n)+)",
                      text, re.MULTILINE)
    assert match, label
    return "\n".join(line[4:] for line in match.group(1).splitlines()).strip() + "\n"
