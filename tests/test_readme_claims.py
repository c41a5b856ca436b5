"""What README.rst promises, each promise checked by a test that fails if it breaks.

One test per claim, its docstring quoting the claim.  Everything runs
through the public surface: the ``spoolops`` command, ``Client``, the
worker's log lines and the on-disk layout the design documents.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.env import SpoolEnv, make_spool_env
from support.waiting import Lines, wait_for

from spoolops import Cancelled, Interrupted, PermissionDenied, Timeout
from spoolops.cli.main import build_parser


def _queued_ids(env: SpoolEnv) -> list[str]:
    return sorted(p.name[:-5] for p in env.spool.new.glob("*.json"))


def _running(env: SpoolEnv) -> list[Path]:
    return sorted(env.spool.active.glob("*.json.run"))


def test_call_gives_the_request_a_deadline_equal_to_its_timeout(spool_env: SpoolEnv) -> None:
    """README: "call() gives the request a deadline equal to its timeout ...
    and withdraws the request if it is still queued when the wait times out"."""
    client = spool_env.client()
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            client.call("echo", {}, timeout=3)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)
    thread = threading.Thread(target=call)
    started = time.time()
    thread.start()
    rid = wait_for(lambda: _queued_ids(spool_env) and _queued_ids(spool_env)[0],
                   what="the request to be queued")
    request = json.loads((spool_env.spool.new / f"{rid}.json").read_text())
    from spoolops.formats import parse_iso
    deadline = parse_iso(request["deadline"])
    assert started + 3 - 1 <= deadline <= time.time() + 3
    thread.join(60)
    assert isinstance(outcome[0], Timeout)
    assert _queued_ids(spool_env) == []               # withdrawn


def test_the_target_lock_keeps_out_of_a_file_another_process_holds(
        running: SpoolEnv, tmp_path: Path) -> None:
    """README: "While an operation runs, the worker holds a filelock lock per
    target in work/locks/<sha256 of the real path>.lock
    (spoolops.dispatch.target_lock_path), so other archive processes that take
    the same lock never see a file mid-edit" -- and the worker, likewise,
    waits while another process holds it."""
    from astropy.io import fits
    from support import fitsfiles
    src = fitsfiles.simple_image(tmp_path / "locked.fits")
    target = running.config.storage_root / "locked.fits"
    target.write_bytes(src.read_bytes())
    holder = subprocess.Popen([sys.executable, "-c", """
import sys, filelock
from spoolops.dispatch import target_lock_path
lock = filelock.FileLock(target_lock_path(sys.argv[1], sys.argv[2]))
with lock:
    print("held", flush=True)
    sys.stdin.readline()
""", str(running.spool.work), os.path.realpath(target)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, env=running.env())
    try:
        assert holder.stdout.readline().strip() == "held"
        client = running.client()
        rid = client.submit("update_headers", {"filename": "locked.fits",
                                               "values": {"qa_state": "Pass"}})
        wait_for(lambda: (running.spool.active / f"{rid}.json.run").exists(),
                 what="the edit to start")
        assert client.call("echo", {"meanwhile": 1}, timeout=30) == {"meanwhile": 1}
        with pytest.raises(Timeout):                       # it waits for the lock...
            client.wait(rid, timeout=3)
        assert target.read_bytes() == src.read_bytes()     # ...and has not touched it
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(30) == 0
        assert client.wait(rid, timeout=60).result["modified"] is True
        assert fits.getheader(target)["RAWGEMQA"] == "USABLE"
    finally:
        holder.kill()


def test_in_place_edit_cut_off_by_a_crash_is_rolled_back_at_start(tmp_path: Path) -> None:
    """README: "plain files of 4 MiB or more ... are edited in place,
    protected by a rollback journal in work/journals/ ...; a worker that finds
    a journal at start-up rolls the header back" (the recover(ctx) hook), at
    the real threshold, through a real worker killed mid-write."""
    from astropy.io import fits
    from support import fitsfiles
    env = make_spool_env(tmp_path / "tree", durable=True)
    try:
        src = fitsfiles.simple_image(tmp_path / "big.fits", shape=(1100, 1100), dtype=">f4")
        assert src.stat().st_size >= 4 * 1024 * 1024
        target = env.config.storage_root / "big.fits"
        target.write_bytes(src.read_bytes())
        original = target.read_bytes()
        # the journal (its JSON, a newline, the 2880-byte old header, a digest)
        # is written first; 4380 bytes in, the new header is half written
        first = env.start_worker(SPOOLOPS_FAULT="write:4380")
        client = env.client()
        rid = client.submit("update_headers", {"filename": "big.fits",
                                               "values": {"qa_state": "Pass"}})
        assert first.wait(60) == -signal.SIGKILL
        assert target.read_bytes() != original            # torn: half a new header
        assert list((env.spool.work / "journals").iterdir())
        second = env.start_worker()
        log = second.log_path.read_text()
        assert re.search(r"event=recovered op=update_headers action='rolled back", log), log
        reply = client.wait(rid, timeout=60)              # then re-run: idempotent
        assert reply.ok and reply.result["modified"] is True
        assert fits.getheader(target)["RAWGEMQA"] == "USABLE"
        assert fitsfiles.data_units(target) == fitsfiles.data_units(src)
        assert not list((env.spool.work / "journals").iterdir())
    finally:
        env.close()


def test_the_concurrency_cap(tmp_path: Path) -> None:
    """README: "others run in parallel, up to [worker] concurrency"."""
    env = make_spool_env(tmp_path / "tree", durable=False)
    env.config_path.write_text(env.config_path.read_text().replace(
        "concurrency = 4", "concurrency = 2"))
    try:
        env.start_worker()
        client = env.client()
        release = tmp_path / "release"
        ids = [client.submit("hold", {"release": str(release), "tag": n}) for n in range(5)]
        wait_for(lambda: len(_running(env)) == 2, what="two running")
        assert len(_running(env)) == 2 and len(_queued_ids(env)) == 3
        release.touch()
        assert [client.wait(rid, timeout=60).result["tag"] for rid in ids] == list(range(5))
    finally:
        env.close()


def test_call_shows_progress_while_it_waits(running: SpoolEnv, tmp_path: Path) -> None:
    """README: "spoolops call, which shows progress while it waits"."""
    release = tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-m", "spoolops", "call", "hold", "--arg",
                             f"release={release}", "--timeout", "60"], env=running.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = Lines(proc.stderr).next(time.monotonic() + 60)
        assert line, "no progress line"
        assert "50.0%" in line and "[###############" in line, line
        release.touch()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and json.loads(out)["ok"] is True


def test_site_ops_entry_points(running: SpoolEnv) -> None:
    """README: "an entry point names a spoolops.ops.Operation or a callable
    returning some"; a broken entry point is logged and skipped."""
    client = running.client()
    assert client.call("single", {}, timeout=30) == {"single": True}      # an Operation
    assert client.call("whoami", {}, timeout=30)["user"]                  # a callable's
    log = running.workers[0].log_path.read_text()
    assert "event=entry_point_failed entry_point=broken" in log


def test_spoolops_demo_runs_and_status_is_current(tmp_path: Path) -> None:
    """README: "scripts/demo ... a worker on a local tree, real requests, their
    replies, status" -- and the status it prints counts the six requests."""
    done = subprocess.run([sys.executable, "-m", "spoolops", "demo", "--dir",
                           str(tmp_path / "demo")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo finished: all replies as expected" in done.stdout
    assert re.search(r"worker +running, pid \d+, up [\d.]+s, served 6", done.stdout), done.stdout


def test_help_of_every_subcommand() -> None:
    """README: "--help on each" subcommand."""
    parser = build_parser()
    names = sorted(parser._subparsers._group_actions[0].choices)   # what main() accepts
    assert {"init", "worker", "call", "status", "show", "ls", "tail", "cancel", "requeue",
            "janitor", "doctor", "demo"} <= set(names)
    for name in names:
        done = subprocess.run([sys.executable, "-m", "spoolops", name, "--help"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and f"usage: spoolops {name}" in done.stdout, name


def test_doctor_all_and_json(spool_env: SpoolEnv) -> None:
    """README: "doctor [--all] [--json]"."""
    every = spool_env.spoolops("doctor", "--all")
    lines = every.stdout.splitlines()
    assert any(line.startswith("ok       config:") for line in lines), every.stdout
    assert any(line.startswith("ok       new/:") for line in lines), every.stdout
    body = json.loads(spool_env.spoolops("doctor", "--json").stdout)
    assert {"check", "ok", "message", "fix"} <= set(body[0])
    assert len(body) == len([line for line in lines if line.startswith(("ok", "PROBLEM"))])


def test_call_priority(spool_env: SpoolEnv) -> None:
    """README: "call OP ... [--priority N]": higher runs first."""
    low = spool_env.spoolops("call", "sleep", "--arg", "tag=low", "--no-wait")
    high = spool_env.spoolops("call", "sleep", "--arg", "tag=high", "--priority", "7",
                              "--no-wait")
    rid_low, rid_high = low.stdout.strip(), high.stdout.strip()
    assert json.loads((spool_env.spool.new / f"{rid_high}.json").read_text())["priority"] == 7
    text = spool_env.config_path.read_text().replace("concurrency = 4", "concurrency = 1")
    spool_env.config_path.write_text(text)
    proc = spool_env.start_worker("--once", wait=False)
    assert proc.wait(60) == 0
    client = spool_env.client()
    starts = {tag: client.wait(rid, timeout=10).result["start"]
              for tag, rid in (("low", rid_low), ("high", rid_high))}
    assert starts["high"] < starts["low"]


def test_status_shows_uptime_and_requests_served(running: SpoolEnv) -> None:
    """README: "spoolops status the counts, oldest ages, worker pid, uptime,
    requests served and problems" -- counted as of the moment it is asked."""
    client = running.client()
    for n in range(3):
        client.call("echo", {"n": n}, timeout=30)
    body = json.loads(running.spoolops("status", "--json").stdout)
    assert body["worker"]["served"] == 3 and body["worker"]["uptime_s"] >= 0
    text = running.spoolops("status").stdout
    assert re.search(r"worker +running, pid \d+, up [\d.]+s, served 3", text), text


def test_key_value_log_lines(running: SpoolEnv) -> None:
    """README: "The worker logs one key=value line when a request starts and one
    when it ends (event=end id=... op=... user=... target=... outcome=ok
    duration=...)"."""
    client = running.client()
    rid = client.submit("sleep", {"seconds": 0, "target": "t", "tag": "logged"})
    client.wait(rid, timeout=30)
    log = running.wait_log(running.workers[0], f"event=end id={rid}")
    start = re.search(rf"level=INFO event=start id={rid} op=sleep user=(\S+) target=t$", log,
                      re.MULTILINE)
    end = re.search(rf"level=INFO event=end id={rid} op=sleep user=(\S+) target=t"
                    r" outcome=ok duration=(\d+\.\d+)$", log, re.MULTILINE)
    assert start and end, log
    pairs = dict(kv.split("=", 1) for kv in end.group(0).split()[1:])
    assert pairs["event"] == "end" and pairs["outcome"] == "ok" and float(pairs["duration"]) >= 0


def test_client_raises_permission_denied_cancelled_and_interrupted(spool_env: SpoolEnv
                                                                   ) -> None:
    """README: "Failures raise OpError subclasses named like the reply's error
    type (... PermissionDenied ... Interrupted, Cancelled ...)"."""
    client = spool_env.client()
    caught: dict[str, BaseException] = {}

    def call(key: str, op: str, args: dict) -> None:
        try:
            client.call(op, args, timeout=120)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            caught[key] = exc

    # Cancelled: 'spoolops cancel' (here by the tree's owner) wakes the caller
    waiter = threading.Thread(target=call, args=("cancel", "echo", {}))
    waiter.start()
    rid = wait_for(lambda: _queued_ids(spool_env) and _queued_ids(spool_env)[0],
                   what="the request to be queued")
    assert spool_env.spoolops("cancel", rid).returncode == 0
    waiter.join(60)
    assert isinstance(caught["cancel"], Cancelled)
    worker = spool_env.start_worker()
    with pytest.raises(PermissionDenied):
        client.call("restricted", {}, timeout=30)
    # Interrupted: a non-idempotent op cut off by a crash
    waiter = threading.Thread(target=call, args=("cut", "nonidem", {"seconds": 30}))
    waiter.start()
    wait_for(lambda: _running(spool_env), what="nonidem to start")
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    spool_env.start_worker()
    waiter.join(60)
    assert isinstance(caught["cut"], Interrupted)
