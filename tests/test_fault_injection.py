"""Fault injection: SIGKILL the worker at random moments under load (the
kill-and-restart test on both transports).

Four client processes submit a stream of mixed requests (``echo``,
``update_headers`` setting a distinct ``SEQ`` on one of three FITS files, a
few non-idempotent ``nonidem`` and ``ingest_upload``) while the test kills
the worker with SIGKILL at random moments and restarts it (or lets the hot
standby take over).  At the end every request has exactly one reply (an
``Interrupted`` one only for a non-idempotent op), no reply is left over or
for an unknown id, every FITS file is byte-identical to a state the requests
could produce and passes astropy's verify, every ingested file is whole, and
``new/``, ``active/`` and ``work/`` hold nothing stale.  A third test runs the
janitor in a tight loop beside a busy worker: nothing is lost.

CI sizes: 30 kills (restart; 20 over PostgreSQL), 20 (standby).  ``SPOOLOPS_SOAK=1`` runs 500;
``SPOOLOPS_SOAK_KILLS=N`` runs N.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from support.env import TRANSPORTS, Env, SpoolEnv, make_spool_env, queue_for
from support.waiting import wait_for

from spoolops.transport.worklock import worker_alive

fitsfiles = pytest.importorskip("support.fitsfiles")

# long runs: SPOOLOPS_SOAK=1 multiplies the kills by ten
pytestmark = pytest.mark.timeout(3600 if os.environ.get("SPOOLOPS_SOAK") else 900)

FITS_NAMES = ("f0.fits", "f1.fits.gz", "f2.fits")


def kill_count(ci: int) -> int:
    if os.environ.get("SPOOLOPS_SOAK_KILLS"):
        return int(os.environ["SPOOLOPS_SOAK_KILLS"])
    return 500 if os.environ.get("SPOOLOPS_SOAK") else ci


CLIENT = r"""
import hashlib, json, os, random, sys, time
from pathlib import Path
from spoolops.client import Client
from spoolops.errors import Timeout

index, out, stop, staging = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
fits_names = sys.argv[5].split(",")
rng = random.Random(index)
client = Client()
records, k = [], 0
with out.open("w") as log:
    while not stop.exists():
        batch = []
        for _ in range(rng.randint(1, 4)):
            k += 1
            roll = rng.random()
            if roll < 0.5:
                op, args = "echo", {"c": index, "k": k}
            elif roll < 0.85:
                op = "update_headers"
                args = {"filename": rng.choice(fits_names),
                        "values": {"generic": {"SEQ": index * 100000 + k}}}
            elif roll < 0.95:
                op, args = "nonidem", {"seconds": 0.05, "tag": f"{index}-{k}"}
            else:
                name = f"up-{index}-{k}.fits"
                data = os.urandom(rng.randint(1, 64) * 1024)
                (staging / name).write_bytes(data)
                op, args = "ingest_upload", {"filename": name, "path": "ingested",
                                             "md5": hashlib.md5(data).hexdigest()}
            batch.append((client.submit(op, args), op, args))
        for rid, op, args in batch:
            rec = {"id": rid, "op": op, "args": args}
            try:
                reply = client.wait(rid, timeout=300)
                rec.update(ok=reply.ok, error=reply.error, result=reply.result)
            except Timeout:
                rec.update(ok=None, error={"type": "ClientTimeout"}, result=None)
            log.write(json.dumps(rec) + "\n")
            log.flush()
"""


def make_fits(env: Env) -> dict[str, bytes]:
    storage = env.config.storage_root
    scratch = env.base / "scratch"
    scratch.mkdir()
    fitsfiles.simple_image(storage / "f0.fits", shape=(32, 32), checksum=True)
    plain = fitsfiles.simple_image(scratch / "f1.fits", shape=(48, 48), seed=1)
    shutil.copy(fitsfiles.compress_file(plain, "gz"), storage / "f1.fits.gz")
    fitsfiles.simple_image(storage / "f2.fits", shape=(16, 16), seed=2, cards=30)
    (env.config.upload_staging_dir / "ingested").mkdir(exist_ok=True)
    return {name: (storage / name).read_bytes() for name in FITS_NAMES}


def normalise(data: bytes) -> bytes:
    """Mask what legitimately differs between two runs of the same edit: the
    CHECKSUM card (its comment carries the time of the update, which the
    checksum covers) and the DATASUM card's comment.  Both are verified with
    astropy separately."""
    if data[:2] == b"\x1f\x8b":
        import gzip
        data = gzip.decompress(data)
    out = bytearray(data)
    for i in range(0, len(out), 80):
        card = bytes(out[i:i + 8])
        if card == b"CHECKSUM":
            out[i:i + 80] = b" " * 80
        elif card == b"DATASUM ":
            out[i + 30:i + 80] = b" " * 50
        elif card == b"END     ":
            break
    return bytes(out)


def expected_state(env: Env, name: str, original: bytes, seq: int) -> bytes:
    """The file a lone ``SEQ = seq`` edit makes of the original (real code path)."""
    from spoolops.fits import parse_values, update_file
    root = env.base / f"expect-{seq}"
    (root / "work").mkdir(parents=True)
    (root / name).write_bytes(original)
    update_file(root, name, parse_values({"generic": {"SEQ": seq}}), work_dir=root / "work",
                durable=False)
    data = (root / name).read_bytes()
    shutil.rmtree(root)
    return data


class Load:
    """Four client processes submitting until told to stop."""

    def __init__(self, env: Env, clients: int = 4) -> None:
        self.env = env
        self.stop = env.base / "stop-clients"
        self.outs = [env.base / f"client-{i}.jsonl" for i in range(clients)]
        self.procs = [subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(i), str(out), str(self.stop),
             str(env.config.upload_staging_dir), ",".join(FITS_NAMES)],
            env=env.client_env(),
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i, out in enumerate(self.outs)]

    def finish(self, timeout: float = 300) -> list[dict]:
        self.stop.touch()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
        return [json.loads(line) for out in self.outs for line in out.read_text().splitlines()]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()


def lock_holder(env: SpoolEnv) -> int | None:
    alive, pid = worker_alive(env.spool.lock_path)
    return pid if alive else None


def check_outcome(env: Env, records: list[dict], originals: dict[str, bytes]) -> dict:
    """Every assertion of the issue's end state; returns counts for the report."""
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    counts: dict[str, int] = {}
    interrupted = set()
    for r in records:
        assert r["ok"] is not None, f"no reply to {r['id']} ({r['op']})"
        if r["ok"]:
            outcome = "ok"
        else:
            outcome = r["error"]["type"]
            assert outcome == "Interrupted" and r["op"] in ("nonidem", "ingest_upload"), r
            interrupted.add(r["id"])
        counts[f"{r['op']}:{outcome}"] = counts.get(f"{r['op']}:{outcome}", 0) + 1
        if r["op"] == "echo" and r["ok"]:
            assert r["result"] == r["args"]
    # exactly one reply: the clients collected theirs; anything left is a
    # duplicate or for an unknown id
    transport = env.transport()
    counts_now = transport.counts(time.time())
    assert counts_now["replies"].count == 0
    assert counts_now["queued"].count == 0 and counts_now["running"].count == 0
    failed = {e.id for e in transport.entries("failed")}
    assert failed == interrupted
    work = transport.work_dir
    stale = [n for n in os.listdir(work)
             if n not in ("worker.lock", "stats.json", "locks", "temps", "journals", "memos")]
    assert stale == []
    for sub in ("temps", "journals", "memos"):
        if (work / sub).exists():
            assert os.listdir(work / sub) == []
    # FITS files: byte-identical to the original or to one requested SEQ edit
    from astropy.io import fits
    requested = {name: set() for name in FITS_NAMES}
    for r in records:
        if r["op"] == "update_headers":
            requested[r["args"]["filename"]].add(r["args"]["values"]["generic"]["SEQ"])
    storage = env.config.storage_root
    for name in FITS_NAMES:
        data = (storage / name).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # a bad CHECKSUM/DATASUM warns
            with fits.open(storage / name, checksum=True) as hdul:
                hdul.verify("exception")
                seq = hdul[0].header.get("SEQ")
        if seq is None:
            assert data == originals[name]
        else:
            assert seq in requested[name], f"{name}: SEQ {seq} was never requested"
            expected = expected_state(env, name, originals[name], seq)
            assert normalise(data) == normalise(expected), name
    # ingests: whole or absent; no temporary file anywhere
    for r in records:
        if r["op"] != "ingest_upload":
            continue
        dest = storage / "ingested" / r["args"]["filename"]
        if r["ok"]:
            assert dest.exists()
        if dest.exists():
            import hashlib
            assert hashlib.md5(dest.read_bytes()).hexdigest() == r["args"]["md5"]
    for root in (storage, env.config.upload_staging_dir):
        leftovers = [p for p in root.rglob("*") if "spoolops-tmp" in p.name]
        assert leftovers == []
    counts["requests"] = len(records)
    return counts


@pytest.fixture
def fault_env(tmp_path: Path):
    env = make_spool_env(tmp_path / "tree", durable=False)
    yield env
    env.close()


def _final_drain(env: Env, load: Load) -> list[dict]:
    worker = env.start_worker()
    records = load.finish()
    env.stop_worker(worker)
    return records


@pytest.mark.slow
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_kill_and_restart(request, tmp_path: Path, kind: str):
    env = queue_for(request, tmp_path, kind, durable=True)
    kills = kill_count(30 if kind == "spool" else 20)
    originals = make_fits(env)
    rng = random.Random(1234)
    load = Load(env)
    t0 = time.monotonic()
    try:
        for _ in range(kills):
            worker = env.start_worker()
            time.sleep(rng.uniform(0.0, 0.5))   # the kill lands at a random moment: the point
            env.stop_worker(worker, signal.SIGKILL)
        records = _final_drain(env, load)
    finally:
        load.kill()
    counts = check_outcome(env, records, originals)
    print(f"\nkill+restart ({kind}): {kills} kills, {time.monotonic() - t0:.1f} s, {counts}")


@pytest.mark.slow
def test_kill_with_standby_takeover(fault_env: SpoolEnv):
    env = fault_env
    kills = kill_count(20)
    originals = make_fits(env)
    rng = random.Random(4321)
    env.start_worker()
    standby = env.start_worker("--standby", wait=False)
    load = Load(env)
    t0 = time.monotonic()
    takeovers = []
    try:
        for _ in range(kills):
            holder = wait_for(lambda: lock_holder(env), timeout=60, what="a worker")
            time.sleep(rng.uniform(0.05, 0.5))  # the kill lands at a random moment: the point
            killed_at = time.monotonic()
            os.kill(holder, signal.SIGKILL)
            wait_for(lambda h=holder: lock_holder(env) not in (None, h), timeout=60,
                     interval=0.005, what="the standby to take over")
            takeovers.append(time.monotonic() - killed_at)
            standby = env.start_worker("--standby", wait=False)
        records = load.finish()
        for proc in env.workers:
            if proc.poll() is None:
                env.stop_worker(proc)
    finally:
        load.kill()
    assert standby.returncode is not None
    counts = check_outcome(env, records, originals)
    takeovers.sort()
    print(f"\nstandby: {kills} kills, {time.monotonic() - t0:.1f} s, takeover median"
          f" {takeovers[len(takeovers) // 2] * 1000:.0f} ms, max {takeovers[-1] * 1000:.0f}"
          f" ms, {counts}")


JANITOR_LOOP_S = "60" if os.environ.get("SPOOLOPS_SOAK") else "6"
JANITOR_LOOP = r"""
import sys, time
from spoolops.config import load_config
from spoolops.janitor import run_janitor
config = load_config()
end = time.monotonic() + float(sys.argv[1])
passes = removed = 0
while time.monotonic() < end:
    report = run_janitor(config, lock_ttl=0.0)
    passes += 1
    removed += sum(1 for a in report.actions if a.done)
print(passes, removed)
"""


@pytest.mark.slow
def test_janitor_in_a_tight_loop_beside_a_busy_worker(fault_env: SpoolEnv):
    """Short tmp_ttl, lock files removed as soon as nobody holds them: still no
    request or reply is lost."""
    env = make_spool_env(fault_env.base / "busy", durable=False,
                         extra="[janitor]\ntmp_ttl = 2s\nreply_ttl = 1h\nstuck_after = 1h\n")
    try:
        originals = make_fits(env)
        env.start_worker()
        load = Load(env)
        try:
            janitor = subprocess.run([sys.executable, "-c", JANITOR_LOOP, JANITOR_LOOP_S], env=env.env(),
                                     capture_output=True, text=True, timeout=300, check=False)
            assert janitor.returncode == 0, janitor.stderr[-2000:]
            records = load.finish()
        finally:
            load.kill()
        env.stop_worker(env.workers[0])
        passes, removed = map(int, janitor.stdout.split())
        counts = check_outcome(env, records, originals)
        assert counts.get("nonidem:Interrupted", 0) == 0
        print(f"\njanitor loop: {passes} passes, {removed} removals, {counts}")
    finally:
        env.close()
