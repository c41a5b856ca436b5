"""ingest_upload killed with SIGKILL at many points, then recovered.

Each trial runs the operation in a child process on a fresh tree and kills it
either through ``SPOOLOPS_FAULT`` (after N bytes, after the k-th fsync,
before/after publishing, before/after removing the staged file) or with a
random SIGKILL from the parent while it copies.  Then, as the worker does at
start-up, ``cleanup_temps(work_dir)`` runs, and the tree must show one of the
two legal states: nothing published (target absent or still the old file,
staged file intact) or the new file published whole (staged file present or
removed) -- and no temporary file anywhere.  Finally the ingest is retried
in-process, as an operator re-queuing the interrupted request would.

``SPOOLOPS_SOAK=1`` multiplies the random kills and enlarges the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import spoolops.config
from spoolops.config import Config
from spoolops.ops import OpContext
from spoolops.ops.ingest import INGEST_UPLOAD
from spoolops.ops.ingest_publish import CHUNK
from spoolops.workhome.temps import TEMP_MARK, cleanup_temps

# long runs: SPOOLOPS_SOAK=1 multiplies the kills by ten
pytestmark = pytest.mark.timeout(3600 if os.environ.get("SPOOLOPS_SOAK") else 900)

SOAK = os.environ.get("SPOOLOPS_SOAK") == "1"
RANDOM_KILLS = 400 if SOAK else 20
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(spoolops.config.__file__).parents[1])}
CHILD_ENV.pop("SPOOLOPS_FAULT", None)
COUNT_ALL = "fsync:1000000000,bytes:1000000000000"  # counts every point, never fires

CHILD = r"""
import json, sys
from pathlib import Path
from spoolops import faults
from spoolops.config import Config
from spoolops.ops import OpContext
from spoolops.ops.ingest import INGEST_UPLOAD
top, args = Path(sys.argv[1]), json.loads(sys.argv[2])
ctx = OpContext(config=Config(storage_root=top / "storage", upload_staging_dir=top / "staging",
                              root=top / "spool"), work_dir=top / "work")
clean = INGEST_UPLOAD.validate(args, ctx)
print("ready", flush=True)
sys.stdin.readline()
result = INGEST_UPLOAD.run(ctx, clean)
print(json.dumps({"result": result, "counts": faults.snapshot()}), flush=True)
"""

# name -> (args, size of the upload, folder of the target, old target contents or None)
SCENARIOS = {
    "new_nested_folders": ({"filename": "N1.fits", "path": "2026/11"}, 2 * CHUNK + 37,
                           "2026/11", None),
    "overwrite": ({"filename": "N2.fits", "path": "2026", "overwrite": True}, CHUNK,
                  "2026", b"old contents"),
    "processed_cal": ({"filename": "cal.fits", "processed_cal": True}, 100,
                      "processed_cals", None),
}


def _setup(top: Path, name: str, seed: int, size: int | None = None
           ) -> tuple[dict, bytes, Path, Path]:
    args, scenario_size, folder, old = SCENARIOS[name]
    size = size or (scenario_size * 4 + 3 if SOAK else scenario_size)
    for d in ("storage", "staging", "work"):
        (top / d).mkdir(parents=True)
    data = random.Random(seed).randbytes(size) if size < CHUNK * 4 else \
        random.Random(seed).randbytes(CHUNK) * (size // CHUNK) + b"x" * (size % CHUNK)
    staged_dir = top / "staging"           # where FitsStorage stages an upload with no path
    (staged_dir / args["filename"]).write_bytes(data)
    target = top / "storage" / folder / args["filename"]
    if old is not None:
        target.parent.mkdir(parents=True)
        target.write_bytes(old)
    args = {**args, "md5": hashlib.md5(data).hexdigest()}
    return args, data, target, staged_dir / args["filename"]


def _start(top: Path, args: dict, fault: str | None) -> subprocess.Popen:
    env = dict(CHILD_ENV)
    if fault:
        env["SPOOLOPS_FAULT"] = fault
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(top), json.dumps(args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _go(proc: subprocess.Popen, kill_after: float | None = None) -> tuple[int, str, str]:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    if kill_after is not None:
        time.sleep(kill_after)   # a kill at a random moment of the copy: the point
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def _mid_copy(top: Path, data: bytes) -> bool:
    """Was the process killed while copying (a partial temporary file left)?"""
    return any(0 < (Path(d) / n).stat().st_size < len(data)
               for d, _dirs, files in os.walk(top / "storage") for n in files
               if TEMP_MARK in n)


def _check_recovered(top: Path, args: dict, data: bytes, target: Path, staged: Path,
                     old: bytes | None) -> str:
    """After cleanup: one legal state, no temp anywhere.  Returns the state."""
    cleanup_temps(top / "work")
    temps = [os.path.join(d, n) for d, dirs, files in os.walk(top)
             for n in dirs + files if TEMP_MARK in n]
    assert temps == []
    records = top / "work" / "temps"
    assert not records.exists() or list(records.iterdir()) == []
    current = target.read_bytes() if target.exists() else None
    if current == data:
        assert not staged.exists() or staged.read_bytes() == data
        assert target.stat().st_mode & 0o7777 == 0o644
        state = "published" if staged.exists() else "done"
    else:
        assert current == old, "target is neither the old file nor the complete new one"
        assert staged.read_bytes() == data, "staged file lost without a publish"
        state = "nothing"
    # retry, as recovery re-runs the interrupted request (idempotent): it
    # completes, and a copy already published counts ("already")
    ctx = OpContext(config=Config(storage_root=top / "storage",
                                  upload_staging_dir=top / "staging", root=top / "spool"),
                    work_dir=top / "work")
    if staged.exists():
        result = INGEST_UPLOAD.run(ctx, INGEST_UPLOAD.validate(args, ctx))
        assert result["size"] == len(data)
        assert result.get("already", False) == (state == "published")
        assert target.read_bytes() == data and not staged.exists()
    return state


def _calibrate(tmp_path: Path, name: str) -> dict[str, int]:
    """Run once to completion, counting every fault point it passes."""
    top = tmp_path / f"{name}-calibrate"
    args, data, target, staged = _setup(top, name, 0)
    rc, out, err = _go(_start(top, args, COUNT_ALL))
    assert rc == 0, err
    assert target.read_bytes() == data and not staged.exists()
    return json.loads(out.strip().splitlines()[-1])["counts"]


def _fault_points(counts: dict[str, int], size: int) -> list[str]:
    points = [f"fsync:{k}" for k in range(1, counts["fsync"] + 1)]
    points += sorted({f"bytes:{b}" for b in (1, CHUNK + 1, 2 * CHUNK + 1, size) if b <= size})
    points += [f"ingest.{p}:1" for p in ("before_publish", "after_publish",
                                          "before_staged_unlink", "after_staged_unlink")]
    return points


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_sigkill_at_every_fault_point(tmp_path, name):
    counts = _calibrate(tmp_path, name)
    size = len(_setup(tmp_path / "probe", name, 0)[1])
    assert counts["fsync"] >= 3 and counts["bytes"] == size
    states = []
    for i, fault in enumerate(_fault_points(counts, size)):
        top = tmp_path / f"t{i}"
        args, data, target, staged = _setup(top, name, i)
        rc, _out, err = _go(_start(top, args, fault))
        assert rc == -signal.SIGKILL, f"{fault}: the fault did not fire (rc={rc}): {err}"
        states.append((fault, _check_recovered(top, args, data, target, staged,
                                               SCENARIOS[name][3])))
    by_fault = dict(states)
    # the kill points straddle the publish: both outcomes must have been seen
    assert by_fault["ingest.before_publish:1"] == "nothing"
    assert by_fault["ingest.after_publish:1"] == "published"
    assert by_fault["ingest.before_staged_unlink:1"] == "published"
    assert by_fault["ingest.after_staged_unlink:1"] == "done"
    assert by_fault["bytes:1"] == "nothing"


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    """Random SIGKILLs while copying: each leaves a legal state, and some of
    them must have landed mid-copy (else this would test nothing the fault
    points do not)."""
    rng = random.Random(int(os.environ.get("SPOOLOPS_SEED", "1234")))
    seen: dict[str, int] = {}
    mid_copy = 0
    name = "new_nested_folders"
    size = 24 * CHUNK                          # a copy of tens of milliseconds
    for i in range(RANDOM_KILLS):
        top = tmp_path / f"r{i}"
        args, data, target, staged = _setup(top, name, i, size)
        rc, _out, err = _go(_start(top, args, None), kill_after=rng.uniform(0, 0.15))
        assert rc in (0, -signal.SIGKILL), err
        mid_copy += rc == -signal.SIGKILL and _mid_copy(top, data)
        state = _check_recovered(top, args, data, target, staged, SCENARIOS[name][3])
        seen[state] = seen.get(state, 0) + 1
    print(f"random kills: {seen}, {mid_copy} mid-copy")
    assert mid_copy >= max(1, RANDOM_KILLS // 10), f"only {mid_copy} kills landed mid-copy"
