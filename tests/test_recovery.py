"""Recovery on the spool: hot standby, orphans after SIGKILL (what is left
in its folders), staged replies, requeue, and a full disk.

Real worker processes killed with SIGKILL, real requests, and (as root) a
real small tmpfs filled to the last byte.  Timing figures are printed (run
with ``-s``) but assertions only bound them generously: the machine is shared.
What every transport promises after a killed worker (re-run or
``Interrupted``, the janitor's recovery with no worker, requeue) is in
``contract/test_contract_recovery.py``, one worker per home and the
standby's takeover in ``contract/test_contract_lifecycle.py``; these tests
add where the spool keeps things (the lock file's pid, a request's mtime,
its run record, ``failed/`` and its reason file, ``new/`` never used to
put a request back).
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.env import SpoolEnv, make_spool_env, stage_reply
from support.requires import is_root
from support.waiting import wait_for

from spoolops.transport.worklock import read_lock_pid, worker_alive


def _no_second_reply(client, spool) -> None:
    """Nothing more is published: a round trip through the same worker comes
    back (it served everything before it), and replies/ is empty."""
    assert client.call("echo", {"sync": True}, timeout=60) == {"sync": True}
    assert os.listdir(spool.replies) == [] and os.listdir(spool.active) == []


def lock_pid(env: SpoolEnv) -> int | None:
    alive, pid = worker_alive(env.spool.lock_path)
    return pid if alive else None


def started(env: SpoolEnv, rid: str) -> bool:
    return (env.spool.active / f"{rid}.json.run").exists()


# -- singleton and hot standby ------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_standby_takes_over_when_the_worker_dies(spool_env: SpoolEnv, sig: int):
    first = spool_env.start_worker()
    standby = spool_env.start_worker("--standby", wait=False)
    # it logs this line, then waits for the lock: from here it must take nothing
    spool_env.wait_log(standby, "event=standby")
    client = spool_env.client()
    assert client.call("echo", {"n": 1}) == {"n": 1}
    assert standby.poll() is None and lock_pid(spool_env) == first.pid
    rid = client.submit("sleep", {"seconds": 1.5, "tag": "cut"})
    wait_for(lambda: started(spool_env, rid), what="sleep to start")
    first.send_signal(sig)
    wait_for(lambda: lock_pid(spool_env) == standby.pid, timeout=60, interval=0.005,
             what="standby to take the lock")
    reply = client.wait(rid, timeout=60)    # SIGKILL: re-run (idempotent); TERM: finished
    assert reply.ok and reply.result["tag"] == "cut"
    assert client.call("echo", {"n": 2}, timeout=60) == {"n": 2}
    assert json.loads(json.dumps(reply.raw))["worker"]["pid"] in (first.pid, standby.pid)
    spool_env.stop_worker(standby)
    assert os.listdir(spool_env.spool.active) == []


# -- orphans ---------------------------------------------------------------------

def test_orphans_after_sigkill(spool_env: SpoolEnv):
    """Idempotent: requeued with its mtime (its place in line, held in
    active/ where no member can swap it) and re-run.
    Non-idempotent and started: Interrupted reply, moved to failed/ with a reason.
    Non-idempotent, claimed but never started: requeued and run."""
    sp = spool_env.spool
    worker = spool_env.start_worker()
    client = spool_env.client()
    idem = client.submit("sleep", {"seconds": 30, "target": "a", "tag": "idem"})
    nonidem = client.submit("nonidem", {"seconds": 30, "target": "b", "tag": "non"})
    waiting = client.submit("nonidem", {"seconds": 0, "target": "b", "tag": "waiting"})
    wait_for(lambda: started(spool_env, idem) and started(spool_env, nonidem),
             what="both ops to start")
    idem_mtime = os.stat(sp.active / f"{idem}.json").st_mtime_ns
    spool_env.stop_worker(worker, signal.SIGKILL)
    # a claimed but never started request (the worker died between claim and run)
    if (sp.new / f"{waiting}.json").exists():
        os.rename(sp.new / f"{waiting}.json", sp.active / f"{waiting}.json")
    # recover without serving: the janitor runs the same recovery under the lock
    # (as a command, so that it sees the site ops, as the worker does)
    proc = spool_env.spoolops("janitor", "--json")
    assert proc.returncode == 1, proc.stderr
    recovered = json.loads(proc.stdout)["recovered"]
    assert recovered["requeued"] == 2 and recovered["interrupted"] == 1
    assert os.stat(sp.active / f"{idem}.json").st_mtime_ns == idem_mtime
    assert not (sp.active / f"{idem}.json.run").exists()
    assert (sp.active / f"{waiting}.json").exists()
    assert (sp.failed / f"{nonidem}.json").exists()
    reason = (sp.failed / f"{nonidem}.json.reason").read_text()
    assert "Interrupted" in reason and "requeue" in reason
    cut = client.wait(nonidem, timeout=5)
    assert cut.error["type"] == "Interrupted"
    assert "may or may not have completed" in cut.error["message"]
    spool_env.start_worker()
    assert client.wait(waiting, timeout=60).result["tag"] == "waiting"
    # the re-run is the 30 s sleep: cancel it by killing is not needed; just see it run
    wait_for(lambda: started(spool_env, idem), timeout=60, what="idempotent re-run")
    assert not list(sp.replies.iterdir())


def test_staged_reply_is_published_and_answered_orphan_cleared(spool_env: SpoolEnv):
    """A reply staged in work/ is published exactly once; an orphan whose reply is
    already published is only cleared."""
    sp = spool_env.spool
    from spoolops.dispatch import Dispatcher, Request
    from spoolops.formats import encode_json
    from spoolops.ops import Registry
    disp = Dispatcher(Registry(), spool_env.config, sp.work)
    for rid in ("staged", "answered"):
        request = {"version": 1, "id": rid, "op": "echo", "args": {"x": rid}}
        (sp.active / f"{rid}.json").write_bytes(encode_json(request))
        (sp.active / f"{rid}.json.run").write_text("{}")
        reply = disp.reply(Request(id=rid, op="echo", args={}, user="root",
                                   queued_at=time.time()), result={"x": rid})
        if rid == "staged":
            stage_reply(sp, rid, reply)                  # finished, not published
        else:
            sp.reply(rid, reply)                         # answered
    (sp.active / "answered.json").write_bytes(b"{}")     # as if the unlink was lost
    spool_env.start_worker()
    assert sorted(os.listdir(sp.replies)) == ["answered.json", "staged.json"]
    assert os.listdir(sp.active) == [] and os.listdir(sp.new) == []
    # (the live worker saves its counters through stats.json.tmp now and then)
    assert not [n for n in os.listdir(sp.work) if n.endswith((".reply", ".tmp"))
                and not n.startswith("stats.json")]
    client = spool_env.client()
    assert client.wait("staged", timeout=10).result == {"x": "staged"}


def test_staged_reply_cut_off_mid_write_is_dropped_not_published(spool_env: SpoolEnv):
    """A staged reply is written in place: one cut off mid-write (a SIGKILL
    between write() calls) does not parse.  With its request still in
    active/, recovery drops it and treats the request as an orphan (here:
    idempotent, so re-run, and answered exactly once); without its request
    (only possible after a power cut with durable = no) the client gets an
    Interrupted reply instead of waiting forever."""
    sp = spool_env.spool
    from spoolops.formats import encode_json
    request = {"version": 1, "id": "cut", "op": "echo", "args": {"x": "rerun"}}
    (sp.active / "cut.json").write_bytes(encode_json(request))
    (sp.work / "cut.reply").write_bytes(b'{\n  "version": 1,\n  "id": "cut",\n  "op": "ec')
    (sp.work / "lost.reply").write_bytes(b'{\n  "version": 1,\n  "id": "lo')
    # requeued by an operator while no worker ran: answered by running it
    request = {"version": 1, "id": "requeued", "op": "echo", "args": {"x": "again"}}
    (sp.new / "requeued.json").write_bytes(encode_json(request))
    (sp.work / "requeued.reply").write_bytes(b'{\n  "version": 1,\n  "id": "req')
    spool_env.start_worker()
    client = spool_env.client()
    assert client.wait("cut", timeout=30).result == {"x": "rerun"}
    assert client.wait("requeued", timeout=30).result == {"x": "again"}
    lost = client.wait("lost", timeout=30)
    assert not lost.ok and lost.error["type"] == "Interrupted"
    assert "unknown" in lost.error["message"]
    assert not [n for n in os.listdir(sp.work) if n.endswith(".reply")]
    _no_second_reply(client, sp)


def test_requeue_refuses_a_finished_request_and_restaging_keeps_the_reply(
        spool_env: SpoolEnv):
    """An orphan whose reply is staged finished: requeueing it would answer it
    twice.  Staging again over a staged reply replaces it whole."""
    sp = spool_env.spool
    from spoolops.dispatch import Dispatcher, Request
    from spoolops.formats import encode_json
    from spoolops.ops import Registry
    disp = Dispatcher(Registry(), spool_env.config, sp.work)
    request = Request(id="done", op="echo", args={}, user="root", queued_at=0.0)
    (sp.active / "done.json").write_bytes(encode_json({"version": 1, "id": "done",
                                                       "op": "echo", "args": {}}))
    stage_reply(sp, "done", disp.reply(request, result={"n": 1}))
    stage_reply(sp, "done", disp.reply(request, result={"n": 2}))
    assert json.loads((sp.work / "done.reply").read_bytes())["result"] == {"n": 2}
    proc = spool_env.spoolops("requeue", "done")
    assert proc.returncode == 1 and "finished" in proc.stdout + proc.stderr
    spool_env.start_worker()
    client = spool_env.client()
    assert client.wait("done", timeout=30).result == {"n": 2}
    _no_second_reply(client, sp)
    assert os.listdir(sp.new) == []


def test_request_id_already_running_is_quarantined_never_replaced(running: SpoolEnv):
    """A second request file with the id of a running one is refused by the
    claim itself (renameat2 RENAME_NOREPLACE): the running request is never
    replaced, and it still gets its one reply."""
    client = running.client()
    rid = client.submit("sleep", {"seconds": 1.5, "tag": "first"})
    wait_for(lambda: started(running, rid), what="first request running")
    dup = running.spool.new / f"{rid}.json"
    dup.write_bytes(json.dumps({"version": 1, "id": rid, "op": "echo", "args": {}}).encode())
    reason = running.spool.failed / f"{rid}.json.reason"
    wait_for(reason.exists, what="duplicate quarantined")
    assert "already running" in reason.read_text()
    assert client.wait(rid, timeout=30).result["tag"] == "first"
    _no_second_reply(client, running.spool)


# -- requeue ---------------------------------------------------------------------

def test_requeue_from_failed_and_from_active(spool_env: SpoolEnv):
    sp = spool_env.spool
    worker = spool_env.start_worker()
    client = spool_env.client()
    rid = client.submit("nonidem", {"seconds": 30, "tag": "one"})
    wait_for(lambda: started(spool_env, rid), what="nonidem to start")
    held = client.submit("sleep", {"seconds": 30, "tag": "held"})
    wait_for(lambda: started(spool_env, held), what="sleep to start")
    busy = spool_env.spoolops("requeue", held)
    assert busy.returncode == 1 and "live worker" in busy.stderr
    spool_env.stop_worker(worker, signal.SIGKILL)
    assert spool_env.spoolops("requeue", "no-such-id").returncode == 1
    # no worker: the orphan in active/ can be requeued by hand
    ok = spool_env.spoolops("requeue", held)
    assert ok.returncode == 0 and "active" in ok.stdout
    # never through new/, where a member could swap it: held in active/
    # without its run record, so the next worker re-runs it
    assert (sp.active / f"{held}.json").exists() and not (sp.active / f"{held}.json.run").exists()
    assert not (sp.new / f"{held}.json").exists() and client.cancel(held) is False
    spool_env.start_worker()
    assert client.wait(rid, timeout=30).error["type"] == "Interrupted"
    again = spool_env.spoolops("requeue", rid)
    assert again.returncode == 0 and "failed" in again.stdout
    assert not (sp.failed / f"{rid}.json.reason").exists()
    assert not (sp.new / f"{rid}.json").exists()         # into active/; the worker adopts it
    # back in line and running again (a 30 s sleep: seeing it start is enough)
    wait_for(lambda: started(spool_env, rid), timeout=60, what="requeued request to run")


# -- full disk ---------------------------------------------------------------------

def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {proc.stderr.strip()}")


def _fill(path: Path) -> None:
    """Write ``path`` until the filesystem is full (ENOSPC)."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno in (errno.ENOSPC, errno.EDQUOT)
    with open(path, "ab", buffering=0) as f:   # the last pages, byte by byte-ish
        for size in (4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                continue


@pytest.fixture
def full_disk_env(tmp_path: Path):
    """The whole tree on a 4 MB tmpfs, a worker logging outside it."""
    if not is_root():
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    _mount_tmpfs(mount, "4m")
    log = tmp_path / "worker.log"
    env = None
    try:
        env = make_spool_env(mount / "base", durable=False)
        env.start_worker(log=log)    # outside the full disk
        yield env, mount / "filler", log
    finally:
        if env is not None:
            env.close()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_reply_waits_for_space(full_disk_env):
    """Replies cannot be written while the disk is full: the worker keeps
    running, leaves no temp file, and publishes the reply once space returns."""
    env, filler, log = full_disk_env
    sp = env.spool
    client = env.client()
    assert client.call("echo", {"warm": True}) == {"warm": True}
    first = client.submit("sleep", {"seconds": 1, "target": "t", "tag": "first"})
    wait_for(lambda: started(env, first), what="first to start")
    _fill(filler)
    with pytest.raises(OSError) as full:
        client.submit("echo", {"x": 1})              # clients cannot write either
    assert full.value.errno in (errno.ENOSPC, errno.EDQUOT)
    wait_for(lambda: f"event=reply_retry_failed id={first}" in log.read_text(), timeout=60,
             what="the reply to fail, and fail again when retried, on a full disk")
    assert os.listdir(sp.replies) == []
    # the worker's own saves create and remove a temp file now and then: poll
    # for a moment with none, which a leftover would never give
    wait_for(lambda: not [n for n in os.listdir(sp.work) if n.endswith(".tmp")],
             what="no temp file left in work/")
    assert env.workers[0].poll() is None
    filler.unlink()
    assert client.wait(first, timeout=60).result["tag"] == "first"
    # (logged just after the rename the client saw)
    late = wait_for(lambda: re.search(rf"event=reply_published_late id={first} retries=(\d+)",
                                      log.read_text()), what="the late publish's log line")
    assert int(late.group(1)) >= 1, "no retry failed while the disk was full"
    assert client.call("echo", {"after": 1}, timeout=60) == {"after": 1}
    assert os.listdir(sp.active) == [] and os.listdir(sp.tmp) == []
    assert read_lock_pid(sp.lock_path) == env.workers[0].pid


def test_full_disk_requests_claimed_meanwhile_are_answered(full_disk_env):
    env, filler, log = full_disk_env
    client = env.client()
    first = client.submit("sleep", {"seconds": 1, "target": "t", "tag": "first"})
    second = client.submit("sleep", {"seconds": 0, "target": "t", "tag": "second"})
    wait_for(lambda: started(env, first), what="first to start")
    _fill(filler)

    def second_done() -> bool:
        text = log.read_text()
        assert f"event=job_crashed id={second}" not in text, "second was lost"
        return f"event=end id={second}" in text or f"event=not_started id={second}" in text
    wait_for(second_done, timeout=60, what="the second request to finish")
    filler.unlink()
    assert client.wait(first, timeout=60).ok
    reply = client.wait(second, timeout=60)
    # it either ran, or was answered without running because its start could not be recorded
    assert reply.ok or (reply.error["type"] == "OpFailed" and "not started" in
                        reply.error["message"])
    assert os.listdir(env.spool.active) == []


@pytest.mark.skipif(not is_root(), reason="mounting a tmpfs needs root")
def test_full_disk_header_edit_fails_cleanly(tmp_path: Path):
    """storage_root on a full 1 MB tmpfs: update_headers of a .fits.gz (always
    copied) fails with a clear OpFailed, the file is intact, no temp remains."""
    fitsfiles = pytest.importorskip("support.fitsfiles")
    env = make_spool_env(tmp_path / "tree", durable=False)
    storage = env.config.storage_root
    _mount_tmpfs(storage, "1m")
    try:
        plain = fitsfiles.simple_image(tmp_path / "img.fits", shape=(32, 32))
        gz = fitsfiles.compress_file(plain, "gz")
        target = storage / "img.fits.gz"
        target.write_bytes(gz.read_bytes())
        original = target.read_bytes()
        env.start_worker()
        client = env.client()
        _fill(storage / ".filler")
        from spoolops.errors import OpFailed
        with pytest.raises(OpFailed) as err:
            client.call("update_headers", {"filename": "img.fits.gz",
                                           "values": {"generic": {"SEQ": 1}}}, timeout=60)
        print("full-disk header edit:", err.value.message)
        assert "space" in err.value.message.lower()
        assert target.read_bytes() == original
        assert sorted(os.listdir(storage)) == [".filler", "img.fits.gz"]
        assert client.call("echo", {"still": "serving"}, timeout=60) == {"still": "serving"}
        (storage / ".filler").unlink()
        result = client.call("update_headers", {"filename": "img.fits.gz",
                                                "values": {"generic": {"SEQ": 2}}},
                             timeout=60)
        assert result["modified"] is True
    finally:
        env.close()
        subprocess.run(["umount", "-l", str(storage)], check=False)


def test_recovery_killed_between_interrupted_reply_and_quarantine(spool_env: SpoolEnv):
    """A recovery that died after staging an Interrupted reply but before moving
    the request to failed/ (its reason noted in work/ first, as ``fail`` does)
    is finished by the next one: reply published, request in failed/ with its
    reason, never re-run."""
    from spoolops.dispatch import Dispatcher
    from spoolops.errors import Interrupted
    from spoolops.ops import default_registry
    from spoolops.recovery import recover
    sp = spool_env.spool
    client = spool_env.client()
    rid = client.submit("nonidem", {"seconds": 0})
    claimed = sp.claim(rid + ".json")
    sp.start(rid, {"id": rid}, durable=False)
    registry = default_registry()
    dispatcher = Dispatcher(registry, spool_env.config, sp.work)
    request = dispatcher.parse(claimed.data, rid, claimed.user, claimed.queued_ns / 1e9)
    (sp.work / f"{rid}.failing").write_text("Interrupted: the worker died while running it")
    stage_reply(sp, rid, dispatcher.reply(request, error=Interrupted("cut off")))
    recover(sp, registry, dispatcher)
    assert not (sp.work / f"{rid}.failing").exists()
    assert os.listdir(sp.active) == [] and os.listdir(sp.new) == []
    assert (sp.failed / (rid + ".json")).exists()
    assert "Interrupted" in (sp.failed / (rid + ".json.reason")).read_text()
    assert client.wait(rid, timeout=5).error["type"] == "Interrupted"


def test_interrupting_an_orphan_survives_a_kill_at_each_step(tmp_path: Path):
    """Recovery answers a non-idempotent orphan ``Interrupted`` and keeps it
    aside in several steps; a janitor killed (SIGKILL) after each of them
    leaves what the next one settles: exactly one reply, ``Interrupted``, the
    request in failed/ with its reason, nothing staged left behind."""
    from spoolops.faults import FAULT_ENV
    for n, point in enumerate(("spool.fail.noted", "spool.fail.staged", "spool.fail.kept",
                               "spool.fail.published")):
        env = make_spool_env(tmp_path / f"t{n}", durable=True)
        try:
            sp, client = env.spool, env.client()
            rid = client.submit("nonidem", {"seconds": 0})
            assert sp.claim(rid + ".json") is not None
            sp.start(rid, {"id": rid}, durable=True)       # a worker died running it
            cut = subprocess.run([sys.executable, "-m", "spoolops", "janitor", "--json"],
                                 env=env.env(**{FAULT_ENV: f"{point}:1"}),
                                 capture_output=True, text=True, timeout=60, check=False)
            assert cut.returncode == -signal.SIGKILL, (point, cut.returncode, cut.stderr)
            again = env.spoolops("janitor", "--json")
            assert again.returncode in (0, 1), again.stderr
            assert os.listdir(sp.active) == [], (point, os.listdir(sp.active))
            assert (sp.failed / (rid + ".json")).exists(), point
            assert "Interrupted" in (sp.failed / (rid + ".json.reason")).read_text()
            assert not [name for name in os.listdir(sp.work)
                        if name.endswith((".reply", ".failing", ".tmp"))], point
            assert os.listdir(sp.replies) == [rid + ".json"], point
            assert client.wait(rid, timeout=5).error["type"] == "Interrupted"
        finally:
            env.close()


def test_recovery_leaves_an_orphan_whose_worker_was_not_taken_over(tmp_path: Path):
    """An orphan that is not ``settled`` (its worker's grace ran out after
    ``settle`` looked: not fenced, it might still answer) is left as it is --
    neither re-queued nor answered -- and taken after the next settle."""
    from dataclasses import replace as replaced

    from spoolops.dispatch import Dispatcher
    from spoolops.ops import default_registry
    from spoolops.recovery import recover
    from spoolops.transport.spool.worker import SpoolTransport

    class NotTakenOver(SpoolTransport):
        def orphans(self):
            return [replaced(o, settled=False) for o in super().orphans()]

    env = make_spool_env(tmp_path / "t", durable=True)
    try:
        client = env.client()
        rid = client.submit("nonidem", {"seconds": 0})
        sp = env.spool
        assert sp.claim(rid + ".json") is not None
        sp.start(rid, {"id": rid}, durable=True)         # a worker died running it
        held = NotTakenOver(env.config.root, env.config.durable,
                            env.config.max_request_bytes, env.config.worker_user)
        registry = default_registry()
        done = recover(held, registry, Dispatcher(registry, env.config, held.work))
        assert done.counts["interrupted"] == 0 and done.counts["requeued"] == 0, done
        assert sorted(os.listdir(sp.active)) == [rid + ".json", rid + ".json.run"]
        assert os.listdir(sp.replies) == [] and os.listdir(sp.failed) == []
        done = recover(sp, registry, Dispatcher(registry, env.config, sp.work))
        assert done.counts["interrupted"] == 1, done
        assert client.wait(rid, timeout=5).error["type"] == "Interrupted"
    finally:
        env.close()
