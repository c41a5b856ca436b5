"""The janitor on the spool: which files it removes by age, which it keeps,
what it reports of them, exit codes.

Real trees, real worker processes, the real command line (``spoolops janitor``).
Ages are made with ``os.utime`` (files) and the janitor's injectable clock.
What it promises on every transport (a clean queue, replies and queued
requests aged by its clock, a live worker's running request, recovery with
no worker) is in ``contract/test_contract_janitor.py`` and
``contract/test_contract_recovery.py``.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from support.env import SpoolEnv
from support.waiting import wait_for

from spoolops.formats import encode_json
from spoolops.janitor import run_janitor

DAY = 86400.0


def janitor_cli(env: SpoolEnv, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spoolops", "janitor", *args],
                          check=False, capture_output=True, text=True, timeout=120,
                          env=env.env())


def age(path: Path, seconds: float) -> Path:
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp), follow_symlinks=False)
    return path


def put(path: Path, data: bytes = b"{}\n", ago: float = 0.0) -> Path:
    path.write_bytes(data)
    return age(path, ago) if ago else path


def request_bytes(rid: str, op: str = "echo", args: dict | None = None) -> bytes:
    return encode_json({"version": 1, "id": rid, "op": op, "args": args or {}})


def build_litter(env: SpoolEnv) -> dict[str, Path]:
    """Old and fresh files in every folder the janitor looks at (no worker)."""
    sp = env.spool
    (sp.work / "locks").mkdir(exist_ok=True)
    return {
        "tmp_old": put(sp.tmp / "a-old.json", ago=2 * 3600),
        "tmp_fresh": put(sp.tmp / "a-fresh.json"),
        "reply_old": put(sp.replies / "r-old.json", ago=2 * DAY),
        "reply_fresh": put(sp.replies / "r-fresh.json", ago=3600),
        "failed_old": put(sp.failed / "f-old.json", ago=40 * DAY),
        "failed_old_reason": put(sp.failed / "f-old.json.reason", b"x\n", ago=31 * DAY),
        "failed_fresh": put(sp.failed / "f-fresh.json", ago=40 * DAY),
        "failed_fresh_reason": put(sp.failed / "f-fresh.json.reason", b"x\n", ago=DAY),
        "reason_alone": put(sp.failed / "gone.json.reason", b"x\n", ago=31 * DAY),
        "work_tmp_old": put(sp.work / "x.reply.tmp", ago=2 * 3600),
        "work_tmp_fresh": put(sp.work / "y.reply.tmp"),
        "lock_old": put(sp.work / "locks" / "old.lock", b"", ago=2 * DAY),
        "lock_held": put(sp.work / "locks" / "held.lock", b"", ago=2 * DAY),
        "lock_fresh": put(sp.work / "locks" / "fresh.lock", b""),
        "worker_lock": put(sp.lock_path, b"", ago=40 * DAY),
        "stats": put(sp.work / "stats.json", ago=40 * DAY),
        "queued_old": put(sp.new / "q-old.json", request_bytes("q-old"), ago=3600),
        "queued_fresh": put(sp.new / "q-fresh.json", request_bytes("q-fresh")),
    }


# with no worker, every staging leftover in work/ is dead (recovery removes it)
REMOVED = {"tmp_old", "reply_old", "failed_old", "failed_old_reason", "reason_alone",
           "work_tmp_old", "work_tmp_fresh", "lock_old"}


def test_dry_run_changes_nothing_and_says_what_it_would_do(spool_env: SpoolEnv):
    files = build_litter(spool_env)
    before = {k: os.lstat(p) for k, p in files.items()}
    proc = janitor_cli(spool_env, "--dry-run", "--json")
    assert proc.returncode == 1, proc.stderr    # q-old is stuck
    report = json.loads(proc.stdout)
    assert report["dry_run"] is True and report["stuck"] is True
    would = {a["path"] for a in report["actions"] if a["action"] == "remove"}
    # nobody holds held.lock in this test, so it would go too
    assert would == {str(files[k]) for k in REMOVED | {"lock_held"}}
    assert not any(a["done"] for a in report["actions"])
    stuck = [f for f in report["findings"] if f["kind"] == "stuck"]
    assert [f["path"] for f in stuck] == [str(files["queued_old"])]
    for key, path in files.items():
        st = os.lstat(path)
        assert (st.st_ino, st.st_mtime_ns, st.st_size) == (
            before[key].st_ino, before[key].st_mtime_ns, before[key].st_size), key
    text = janitor_cli(spool_env, "--dry-run")
    assert text.returncode == 1
    assert "would remove" in text.stdout and "STUCK stuck" in text.stdout


def test_removes_by_age_only_and_keeps_what_is_needed(spool_env: SpoolEnv):
    files = build_litter(spool_env)
    fd = os.open(files["lock_held"], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)              # somebody holds this target lock
    try:
        proc = janitor_cli(spool_env, "--json")
    finally:
        os.close(fd)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert all(a["done"] and a["error"] is None for a in report["actions"]), report
    for key, path in files.items():
        assert os.path.lexists(path) == (key not in REMOVED), key
    # held.lock is free now, so the next pass takes it; then nothing is left
    again = run_janitor(spool_env.config)
    assert [Path(a.path).name for a in again.actions] == ["held.lock"]
    third = run_janitor(spool_env.config)
    assert third.actions == [] and [f.kind for f in third.findings] == ["stuck"]


def test_injected_clock_ages_the_tree(spool_env: SpoolEnv):
    sp = spool_env.spool
    put(sp.tmp / "t.json")
    put(sp.replies / "r.json")
    put(sp.new / "q.json", request_bytes("q"))
    soon = run_janitor(spool_env.config, dry_run=True, now=lambda: time.time() + 60)
    assert soon.actions == [] and not soon.stuck
    later = run_janitor(spool_env.config, now=lambda: time.time() + 2 * DAY)
    assert {Path(a.path).name for a in later.actions} == {"t.json", "r.json"}
    assert later.stuck and not (sp.tmp / "t.json").exists()


def test_live_worker_active_jobs_are_left_alone(running: SpoolEnv, tmp_path: Path):
    """Beside a live worker, a stale leftover of its (``stats.json.tmp``) may
    go; the running request's files in active/ stay.  (That the request is
    left running, and reported once it runs too long, is promised on every
    transport: ``contract/test_contract_janitor.py``.)"""
    sp = running.spool
    client = running.client()
    release = tmp_path / "release"
    rid = client.submit("hold", {"release": str(release), "tag": "busy"})
    wait_for(lambda: (sp.active / f"{rid}.json.run").exists(), what="hold to start")
    put(sp.work / "stats.json.tmp", ago=2 * 3600)          # leftover: may go
    report = run_janitor(running.config, now=lambda: time.time() + 60)
    assert report.worker["alive"] is True and not report.stuck
    assert (sp.active / f"{rid}.json").exists() and (sp.active / f"{rid}.json.run").exists()
    assert [Path(a.path).name for a in report.actions] == ["stats.json.tmp"]
    assert not (sp.work / "stats.json.tmp").exists()
    release.touch()
    assert client.wait(rid, timeout=60).ok


def test_orphans_without_worker_are_recovered_under_the_lock(spool_env: SpoolEnv):
    sp = spool_env.spool
    # idempotent and started; non-idempotent and started; non-idempotent, never started
    for rid, op in (("o-echo", "echo"), ("o-nonidem", "nonidem"), ("o-fresh", "nonidem")):
        put(sp.active / f"{rid}.json", request_bytes(rid, op), ago=600)
    for rid in ("o-echo", "o-nonidem"):
        put(sp.active / f"{rid}.json.run", b"{}\n", ago=600)
    mtime = os.stat(sp.active / "o-echo.json").st_mtime_ns
    dry = janitor_cli(spool_env, "--dry-run", "--json")
    assert dry.returncode == 1
    plan = {Path(a["path"]).name: a["action"] for a in json.loads(dry.stdout)["actions"]}
    assert plan == {"o-echo.json": "requeue", "o-nonidem.json": "interrupt",
                    "o-fresh.json": "requeue"}
    assert sorted(os.listdir(sp.active)) == ["o-echo.json", "o-echo.json.run",
                                             "o-fresh.json", "o-nonidem.json",
                                             "o-nonidem.json.run"]
    proc = janitor_cli(spool_env, "--json")
    assert proc.returncode == 1, proc.stderr       # orphans found: stuck work
    report = json.loads(proc.stdout)
    assert report["recovered"]["requeued"] == 2 and report["recovered"]["interrupted"] == 1
    # re-queued where they are: a claimed request never returns to new/,
    # where a member could swap it; the next worker serves them from active/
    assert sorted(os.listdir(sp.active)) == ["o-echo.json", "o-fresh.json"]
    assert os.listdir(sp.new) == []
    assert os.stat(sp.active / "o-echo.json").st_mtime_ns == mtime   # its place in line
    reply = json.loads((sp.replies / "o-nonidem.json").read_text())
    assert reply["error"]["type"] == "Interrupted"
    assert (sp.failed / "o-nonidem.json").exists()
    assert "Interrupted" in (sp.failed / "o-nonidem.json.reason").read_text()
    # the lock was released: a worker starts and serves the requeued requests
    spool_env.start_worker()
    wait_for(lambda: not os.listdir(sp.new) and not os.listdir(sp.active), timeout=60,
             what="requeued requests to run")
    wait_for(lambda: (sp.replies / "o-echo.json").exists(), what="echo reply")


def test_janitor_holding_the_lock_keeps_a_worker_out(spool_env: SpoolEnv):
    """While recovery runs under the janitor, a plain worker refuses to start."""
    from spoolops.transport.worklock import FlockWorkerLock as WorkerLock
    lock = WorkerLock(spool_env.spool.lock_path)
    lock.acquire()
    try:
        proc = spool_env.spoolops("worker", timeout=60)
        assert proc.returncode == 2 and "--standby" in proc.stderr
    finally:
        lock.release()
