"""ingest_upload on real files: ownership, modes, md5, conflicts, confinement.

Every test works in its own temporary storage_root and upload_staging_dir;
FITS samples are astropy's own test files and ``fitsverify`` judges the
stored copy.  Root-only checks (chown, tmpfs) skip with a reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import astropy.io.fits
import pytest
from support.requires import require_fitsverify

import spoolops.config
from spoolops.config import Config
from spoolops.errors import BadRequest, Conflict, NotFound, OpFailed
from spoolops.ops import OpContext, builtin_operations
from spoolops.ops.ingest import INGEST_UPLOAD, dir_mode_for
from spoolops.workhome.temps import TEMP_MARK

FITS_DATA = Path(astropy.io.fits.__file__).parent / "tests" / "data"
IS_ROOT = os.geteuid() == 0
# children import spoolops from this tree, however (or whether) it is installed
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(spoolops.config.__file__).parents[1])}
OTHER_UID = 12345


@pytest.fixture
def env(tmp_path):
    storage, staging, work = tmp_path / "storage", tmp_path / "staging", tmp_path / "work"
    for d in (storage, staging, work):
        d.mkdir()
    (tmp_path / "outside").mkdir()
    config = Config(storage_root=storage, upload_staging_dir=staging, root=tmp_path / "spool")
    return OpContext(config=config, work_dir=work)


def ingest(ctx: OpContext, **args):
    return INGEST_UPLOAD.run(ctx, INGEST_UPLOAD.validate(args, ctx))


def stage(ctx: OpContext, name: str, data: bytes) -> Path:
    """Staged as FitsStorage's web code stages an upload with no path (a
    processed calibration included): at the top of upload_staging_dir."""
    (ctx.config.upload_staging_dir / name).write_bytes(data)
    return ctx.config.upload_staging_dir / name


def leftovers(ctx: OpContext) -> list[str]:
    """Temporary files anywhere in the tree, plus unforgotten temp records."""
    found = []
    top = ctx.config.storage_root.parent
    for dirpath, dirnames, filenames in os.walk(top):
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if TEMP_MARK in n]
    records = ctx.work_dir / "temps"
    if records.exists():
        found += [str(p) for p in records.iterdir()]
    return found


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_registered_and_repeatable():
    """Idempotent: a retry of a finished ingest is ok (already), so a crash
    mid-ingest is re-run by recovery instead of answered Interrupted."""
    assert INGEST_UPLOAD in builtin_operations()
    assert INGEST_UPLOAD.name == "ingest_upload" and INGEST_UPLOAD.idempotent


def test_real_fits_is_stored_owned_by_worker_with_file_mode(env):
    src = FITS_DATA / "checksum.fits"
    data = src.read_bytes()
    staged = stage(env, "N20261128S0001.fits", data)
    if IS_ROOT:
        os.chown(staged, OTHER_UID, OTHER_UID)
    os.chmod(staged, 0o600)
    calls = []
    env.progress = lambda done, total: calls.append((done, total))
    result = ingest(env, filename="N20261128S0001.fits", path="2026/11",
                    md5=md5(data).upper())
    assert result == {"filename": "N20261128S0001.fits", "path": "2026/11/N20261128S0001.fits",
                      "size": len(data), "md5": md5(data)}
    stored = env.config.storage_root / "2026" / "11" / "N20261128S0001.fits"
    assert stored.read_bytes() == data
    st = stored.stat()
    assert st.st_mode & 0o7777 == 0o644 and st.st_nlink == 1
    for folder in (stored.parent, stored.parent.parent):
        assert folder.stat().st_mode & 0o7777 == 0o755
    if IS_ROOT:
        assert st.st_uid == os.geteuid() != OTHER_UID
    assert not staged.exists()
    assert calls and calls[-1] == (len(data), len(data))
    assert leftovers(env) == []
    run = subprocess.run([require_fitsverify(), "-q", str(stored)], check=False,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(not IS_ROOT, reason="chown to another uid needs root")
def test_owner_is_worker_even_when_staged_file_belongs_to_another_user(env):
    staged = stage(env, "f.fits", b"x" * 5000)
    os.chown(staged, OTHER_UID, OTHER_UID)
    ingest(env, filename="f.fits")
    st = (env.config.storage_root / "f.fits").stat()
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_mode_is_exact_whatever_the_umask(env):
    from dataclasses import replace
    ctx = OpContext(config=replace(env.config, file_mode=0o664), work_dir=env.work_dir)
    stage(ctx, "f.fits", b"abc")
    old = os.umask(0o077)
    try:
        ingest(ctx, filename="f.fits", path="new/deep")
    finally:
        os.umask(old)
    stored = ctx.config.storage_root / "new" / "deep" / "f.fits"
    assert stored.stat().st_mode & 0o7777 == 0o664
    assert stored.parent.stat().st_mode & 0o7777 == 0o775
    assert dir_mode_for(0o640) == 0o750 and dir_mode_for(0o600) == 0o700


def test_new_folder_keeps_inherited_setgid(env):
    os.chmod(env.config.storage_root, 0o2775)
    stage(env, "f.fits", b"abc")
    ingest(env, filename="f.fits", path="sub")
    assert (env.config.storage_root / "sub").stat().st_mode & 0o7777 == 0o2755


def test_md5_mismatch_publishes_nothing(env):
    data = b"corrupt upload" * 1000
    staged = stage(env, "f.fits", data)
    with pytest.raises(Conflict) as err:
        ingest(env, filename="f.fits", path="2026", md5="0" * 32)
    assert "0" * 32 in err.value.message and md5(data) in err.value.message
    assert not (env.config.storage_root / "2026" / "f.fits").exists()
    assert staged.read_bytes() == data
    assert leftovers(env) == []


def test_existing_target_is_a_conflict_and_untouched(env):
    (env.config.storage_root / "f.fits").write_bytes(b"old")
    staged = stage(env, "f.fits", b"new")
    with pytest.raises(Conflict):
        ingest(env, filename="f.fits")
    assert (env.config.storage_root / "f.fits").read_bytes() == b"old"
    assert staged.read_bytes() == b"new"
    assert leftovers(env) == []


def test_overwrite_replaces(env):
    target = env.config.storage_root / "f.fits"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    staged = stage(env, "f.fits", b"new contents")
    result = ingest(env, filename="f.fits", overwrite=True, md5=md5(b"new contents"))
    assert result["size"] == len(b"new contents")
    assert target.read_bytes() == b"new contents"
    assert target.stat().st_mode & 0o7777 == 0o644
    assert not staged.exists() and leftovers(env) == []


def test_overwrite_refuses_a_folder(env):
    (env.config.storage_root / "f.fits").mkdir()
    staged = stage(env, "f.fits", b"new")
    with pytest.raises(Conflict):
        ingest(env, filename="f.fits", overwrite=True)
    assert staged.exists() and leftovers(env) == []


def test_processed_cal_goes_to_processed_cals_path(env):
    staged = stage(env, "cal.fits", b"cal")
    result = ingest(env, filename="cal.fits", processed_cal=True)
    assert result["path"] == "processed_cals/cal.fits"
    assert (env.config.storage_root / "processed_cals" / "cal.fits").read_bytes() == b"cal"
    assert not staged.exists()


def test_missing_staged_file_is_not_found(env):
    with pytest.raises(NotFound):
        ingest(env, filename="nothing.fits")


def test_long_file_name_still_fits_its_temp_name(env):
    name = "N" * 250 + ".fits"
    stage(env, name, b"abc")
    assert ingest(env, filename=name)["size"] == 3


def test_targets_name_destination_and_staged_file(env):
    stage(env, "f.fits", b"x")
    clean = INGEST_UPLOAD.validate({"filename": "f.fits", "path": "a/b"}, env)
    real = os.path.realpath
    assert INGEST_UPLOAD.targets(clean, env) == [
        os.path.join(real(env.config.storage_root), "a", "b", "f.fits"),
        os.path.join(real(env.config.upload_staging_dir), "f.fits")]


def test_not_durable_still_works(env):
    from dataclasses import replace
    ctx = OpContext(config=replace(env.config, durable=False), work_dir=env.work_dir)
    stage(ctx, "f.fits", b"abc")
    assert ingest(ctx, filename="f.fits")["md5"] == md5(b"abc")


@pytest.mark.parametrize("args, word", [
    ({"filename": "f.fits", "colour": "red"}, "colour"),
    ({}, "filename"),
    ({"filename": 3}, "filename"),
    ({"filename": "f.fits", "path": 7}, "path"),
    ({"filename": "f.fits", "processed_cal": "yes"}, "processed_cal"),
    ({"filename": "f.fits", "overwrite": 1}, "overwrite"),
    ({"filename": "f.fits", "md5": 12}, "md5"),
    ({"filename": "f.fits", "md5": "xyz"}, "md5"),
    ({"filename": "f.fits", "processed_cal": True, "path": "a"}, "path"),
])
def test_bad_arguments(env, args, word):
    stage(env, "f.fits", b"x")
    with pytest.raises(BadRequest) as err:
        INGEST_UPLOAD.validate(args, env)
    assert word in err.value.message


@pytest.mark.parametrize("args", [
    {"filename": "../x"}, {"filename": "/etc/passwd"}, {"filename": "a/../../x"},
    {"filename": "a/b"}, {"filename": ".."}, {"filename": ""}, {"filename": "a\nb"},
    {"filename": "f.fits", "path": "../x"}, {"filename": "f.fits", "path": "/etc"},
    {"filename": "f.fits", "path": "a/../../x"}, {"filename": "f.fits", "path": "a//b"},
])
def test_traversal_rejected_before_anything_is_touched(env, args):
    staged = stage(env, "f.fits", b"x")
    with pytest.raises(BadRequest):
        ingest(env, **args)
    assert list(env.config.storage_root.iterdir()) == []
    assert staged.exists()


def _assert_untouched(env):
    outside = env.config.storage_root.parent / "outside"
    assert [p.name for p in outside.iterdir()] in ([], ["secret"])
    assert leftovers(env) == []


def _rejected_by_validate_and_run(env, filename: str) -> None:
    """BadRequest from validate(), and from run() alone (a swap after validate)."""
    with pytest.raises(BadRequest):
        ingest(env, filename=filename)
    clean = {"filename": filename, "path": "", "processed_cal": False, "md5": None,
             "overwrite": False, "staged": "", "fileuploadlog_id": None, "batch": None}
    with pytest.raises(BadRequest):
        INGEST_UPLOAD.run(env, clean)


def test_symlinked_staged_file_rejected_even_if_swapped_after_validate(env):
    secret = env.config.storage_root.parent / "outside" / "secret"
    secret.write_bytes(b"secret")
    (env.config.upload_staging_dir / "f.fits").symlink_to(secret)
    _rejected_by_validate_and_run(env, "f.fits")
    assert list(env.config.storage_root.iterdir()) == []
    assert secret.read_bytes() == b"secret"
    _assert_untouched(env)


def test_symlinked_folder_inside_storage_root_rejected(env):
    outside = env.config.storage_root.parent / "outside"
    (env.config.storage_root / "evil").symlink_to(outside)
    stage(env, "f.fits", b"x")
    for path in ("evil", "evil/sub"):
        with pytest.raises(BadRequest):
            ingest(env, filename="f.fits", path=path)
    assert list(outside.iterdir()) == []
    assert (env.config.upload_staging_dir / "f.fits").exists()
    _assert_untouched(env)


def test_symlinked_processed_cals_folders_rejected(env):
    outside = env.config.storage_root.parent / "outside"
    (outside / "cal.fits").write_bytes(b"elsewhere")
    (env.config.upload_staging_dir / "sub").symlink_to(outside)
    with pytest.raises(BadRequest):              # a staging folder that is a link
        ingest(env, filename="cal.fits", path="sub")
    stage(env, "cal.fits", b"cal")
    store_out = env.config.storage_root.parent / "store_out"
    store_out.mkdir()
    (env.config.storage_root / "processed_cals").symlink_to(store_out)
    with pytest.raises(BadRequest):
        ingest(env, filename="cal.fits", processed_cal=True)
    assert list(store_out.iterdir()) == []
    assert (outside / "cal.fits").read_bytes() == b"elsewhere"
    assert leftovers(env) == []


def test_hard_linked_staged_file_rejected(env):
    secret = env.config.storage_root.parent / "outside" / "secret"
    secret.write_bytes(b"secret")
    os.link(secret, env.config.upload_staging_dir / "f.fits")
    with pytest.raises(BadRequest):
        ingest(env, filename="f.fits")
    assert list(env.config.storage_root.iterdir()) == []
    assert secret.read_bytes() == b"secret" and secret.stat().st_nlink == 2


def test_fifo_as_staged_file_rejected_without_blocking(env):
    os.mkfifo(env.config.upload_staging_dir / "f.fits")
    with pytest.raises(BadRequest):
        ingest(env, filename="f.fits")
    clean = {"filename": "f.fits", "path": "", "processed_cal": False, "md5": None,
             "overwrite": False, "staged": "", "fileuploadlog_id": None, "batch": None}
    with pytest.raises(BadRequest):  # the open itself must not wait for a writer
        INGEST_UPLOAD.run(env, clean)
    assert list(env.config.storage_root.iterdir()) == [] and leftovers(env) == []


def test_directory_as_staged_file_rejected(env):
    (env.config.upload_staging_dir / "f.fits").mkdir()
    _rejected_by_validate_and_run(env, "f.fits")
    assert list(env.config.storage_root.iterdir()) == []


def test_symlinked_target_name_rejected_even_with_overwrite(env):
    outside = env.config.storage_root.parent / "outside" / "secret"
    outside.write_bytes(b"secret")
    (env.config.storage_root / "f.fits").symlink_to(outside)
    stage(env, "f.fits", b"new")
    with pytest.raises(BadRequest):
        ingest(env, filename="f.fits", overwrite=True)
    assert outside.read_bytes() == b"secret" and leftovers(env) == []


@pytest.mark.skipif(not IS_ROOT, reason="mounting a small tmpfs needs root")
def test_no_space_left_is_opfailed_and_leaves_no_temp(env):
    storage = env.config.storage_root
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(storage)],
                             check=False, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.decode().strip()}")
    try:
        data = os.urandom(3 << 20)
        staged = stage(env, "big.fits", data)
        with pytest.raises(OpFailed) as err:
            ingest(env, filename="big.fits")
        assert "no space left" in err.value.message
        assert list(storage.iterdir()) == []
        assert staged.read_bytes() == data
        assert leftovers(env) == []
    finally:
        subprocess.run(["umount", str(storage)], check=True)


STREAM_CHILD = r"""
import json, resource, sys
from pathlib import Path
from spoolops.config import Config
from spoolops.ops import OpContext
from spoolops.ops.ingest import INGEST_UPLOAD
top = Path(sys.argv[1])
ctx = OpContext(config=Config(storage_root=top / "storage", upload_staging_dir=top / "staging",
                              root=top / "spool", durable=False), work_dir=top / "work")
clean = INGEST_UPLOAD.validate({"filename": "big.fits"}, ctx)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = INGEST_UPLOAD.run(ctx, clean)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "after_kib": after, "result": result}))
"""


def test_large_upload_streams_in_bounded_memory(env):
    size = 192 << 20
    staged = env.config.upload_staging_dir / "big.fits"
    with open(staged, "wb") as fh:  # sparse: cheap to make, still read byte by byte
        fh.truncate(size)
    top = env.config.storage_root.parent
    run = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(top)],
                         env=CHILD_ENV, capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    assert out["result"]["size"] == size
    zeros, expected = bytes(1 << 20), hashlib.md5()
    for _ in range(size >> 20):
        expected.update(zeros)
    assert out["result"]["md5"] == expected.hexdigest()
    growth_mib = (out["after_kib"] - out["before_kib"]) / 1024
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.0f} MiB for a 192 MiB file"
    assert (env.config.storage_root / "big.fits").stat().st_size == size


def test_staged_name_replaced_during_copy_is_not_removed(env):
    staged = stage(env, "f.fits", b"original")

    def swap(done, total):  # the web user re-uploads while the worker copies
        (env.config.upload_staging_dir / "other").write_bytes(b"second upload")
        os.rename(env.config.upload_staging_dir / "other", staged)
    env.progress = swap
    assert ingest(env, filename="f.fits")["md5"] == md5(b"original")
    assert (env.config.storage_root / "f.fits").read_bytes() == b"original"
    assert staged.read_bytes() == b"second upload"


def test_staged_file_growing_during_copy_is_a_conflict(env):
    staged = stage(env, "f.fits", b"first half")

    def append(done, total):
        with open(staged, "ab") as fh:
            fh.write(b" and more")
    env.progress = append
    with pytest.raises(Conflict):
        ingest(env, filename="f.fits")
    assert list(env.config.storage_root.iterdir()) == [] and leftovers(env) == []
    assert staged.read_bytes() == b"first half and more"
