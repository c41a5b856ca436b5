"""Crash-atomicity of update_headers: SIGKILL at many points, then recover.

Each trial forks a child that runs the edit with ``SPOOLOPS_FAULT`` set to
die after N bytes written or at the N-th fsync (``spoolops.faults``);
the parent then runs the worker's recovery (``recover_journals`` and
``cleanup_temps``) and requires the file to be byte-identical to the old or
the new version, with no temporary file or journal left.  50 trials per
path by default; ``SPOOLOPS_SOAK=1`` runs 500.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from pathlib import Path

import pytest
from support import fitsfiles

from spoolops import faults as fault
from spoolops.fits import edit, parse_values, recover_journals
from spoolops.fits.journal import JOURNAL_DIR
from spoolops.workhome.temps import TEMP_MARK, cleanup_temps

# long runs: SPOOLOPS_SOAK=1 multiplies the kills by ten
pytestmark = pytest.mark.timeout(3600 if os.environ.get("SPOOLOPS_SOAK") else 900)

TRIALS = 500 if os.environ.get("SPOOLOPS_SOAK") == "1" else 50
EDITS = parse_values({"qa_state": "Pass", "generic": {"OBJECT": "crash test"}})


def _run(storage: Path, work: Path, name: str, inplace_min: int, layout: str) -> None:
    edit.update_file(storage, name, EDITS, work_dir=work, durable=True,
                     inplace_min=inplace_min, layout=layout)


def _child(storage: Path, work: Path, name: str, inplace_min: int, layout: str,
           spec: str) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.environ[fault.FAULT_ENV] = spec
            _run(storage, work, name, inplace_min, layout)
            os._exit(0)
        except BaseException:  # noqa: BLE001 - report through the exit status
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("path_kind", ["copy", "inplace", "gz", "bz2", "gz-streams",
                                       "bz2-streams"])
def test_sigkill_leaves_old_or_new(tmp_path, path_kind):
    path_kind, _, layout = path_kind.partition("-")
    layout = layout or "single"
    storage, work = tmp_path / "storage", tmp_path / "work"
    storage.mkdir()
    work.mkdir(mode=0o700)
    src = fitsfiles.multi_extension(tmp_path / "m.fits", checksum=False)
    if path_kind in ("gz", "bz2"):
        src = fitsfiles.compress_file(src, path_kind)
    name = src.name
    inplace_min = 0 if path_kind == "inplace" else 1 << 60
    old = src.read_bytes()

    # One clean run measures the writes and fsyncs, and gives the new bytes.
    shutil.copyfile(src, storage / name)
    os.environ.pop(fault.FAULT_ENV, None)
    bytes0, fsyncs0 = fault.counts()
    _run(storage, work, name, inplace_min, layout)
    bytes1, fsyncs1 = fault.counts()
    total_bytes, total_fsyncs = bytes1 - bytes0, fsyncs1 - fsyncs0
    new = (storage / name).read_bytes()
    assert new != old and total_bytes > 0 and total_fsyncs > 0

    rng = random.Random(f"{path_kind}-{layout}-{TRIALS}")
    outcomes = {"old": 0, "new": 0}
    for trial in range(TRIALS):
        shutil.copyfile(src, storage / name)
        if trial % 3 == 0:
            spec = f"fsync:{1 + trial // 3 % total_fsyncs}"
        else:
            spec = f"write:{rng.randrange(total_bytes + 1)}"
        status = _child(storage, work, name, inplace_min, layout, spec)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 or (
            os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL), spec
        recover_journals(work)
        cleanup_temps(work)
        now = (storage / name).read_bytes()
        assert now in (old, new), f"mixed file after {spec}"
        outcomes["old" if now == old else "new"] += 1
        assert not [p for p in storage.iterdir() if TEMP_MARK in p.name], spec
        assert not list((work / JOURNAL_DIR).glob("*")) if (work / JOURNAL_DIR).exists() \
            else True
        assert not list((work / "temps").glob("*")) if (work / "temps").exists() else True
    assert outcomes["old"] and outcomes["new"], outcomes
