"""update_headers: value mappings, validation, the corpus, and each write path."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from astropy.io import fits
from support import fitsfiles
from support.requires import require_fitsverify

from spoolops.config import Config, replace_config
from spoolops.errors import BadRequest, Conflict, NotFound, OpFailed
from spoolops.fits import edit as fits_edit
from spoolops.fits import parse_values, recover_journals
from spoolops.fits.journal import JOURNAL_DIR, write_journal
from spoolops.ops import OpContext
from spoolops.ops.headers import UPDATE_HEADERS
from spoolops.workhome.temps import TEMP_MARK, cleanup_temps

KINDS = ["", "gz", "bz2"]


@pytest.fixture
def env(tmp_path: Path):
    storage = tmp_path / "storage"
    storage.mkdir()
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    config = Config(storage_root=storage, upload_staging_dir=tmp_path / "staging",
                    root=tmp_path / "spool")
    return OpContext(config=config, work_dir=work, request_id="req-1")


def call(ctx: OpContext, **args):
    clean = UPDATE_HEADERS.validate(args, ctx)
    assert UPDATE_HEADERS.targets(clean, ctx) == [
        os.path.join(os.path.realpath(ctx.config.storage_root), args["filename"])]
    return UPDATE_HEADERS.run(ctx, clean)


def place(ctx: OpContext, src: Path, kind: str = "", name: str | None = None) -> str:
    name = name or src.name
    dest = ctx.config.storage_root / name
    shutil.copyfile(src, dest)
    if kind:
        packed = fitsfiles.compress_file(dest, kind)
        dest.unlink()
        dest = packed
    os.chown(dest, 4321, 8765)
    os.chmod(dest, 0o640)
    return dest.name


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def no_leftovers(ctx: OpContext) -> None:
    assert not [p for p in ctx.config.storage_root.rglob("*") if TEMP_MARK in p.name]
    assert not list((ctx.work_dir / "temps").glob("*")) if (ctx.work_dir / "temps").exists() \
        else True
    jdir = ctx.work_dir / JOURNAL_DIR
    assert not jdir.exists() or not list(jdir.iterdir())


# -- mappings and validation (no file content needed) -----------------------

@pytest.mark.parametrize("state,pair", [("Undefined", ("UNKNOWN", "UNKNOWN")),
                                        ("pass", ("USABLE", "YES")),
                                        ("USABLE", ("USABLE", "NO")),
                                        ("Fail", ("BAD", "NO")), ("check", ("CHECK", "CHECK"))])
def test_qa_state_mapping(state, pair):
    assert parse_values({"qa_state": state}) == [("RAWGEMQA", pair[0]), ("RAWPIREQ", pair[1])]


def test_raw_site_release_generic():
    edits = dict(parse_values({"raw_site": "IQ70, cc50 bgany", "release": "2024-02-29",
                               "generic": {"object": "M31", "exptime": 1.5, "flag": True,
                                           "gone": None, "n": 3}}))
    assert edits == {"RAWIQ": "70-percentile", "RAWCC": "50-percentile", "RAWBG": "Any",
                     "RELEASE": "2024-02-29", "OBJECT": "M31", "EXPTIME": 1.5,
                     "FLAG": True, "GONE": None, "N": 3}
    assert dict(parse_values({"raw_site": ["wv80", "iqany"]})) == {
        "RAWWV": "80-percentile", "RAWIQ": "Any"}


@pytest.mark.parametrize("values", [
    {}, {"bogus": 1}, {"qa_state": "great"}, {"qa_state": 3}, {"raw_site": "iq50"},
    {"raw_site": ""}, {"raw_site": "iq70 iq85"}, {"release": "2023-02-29"},
    {"release": "20230101"}, {"generic": {"TOOLONGKEY": 1}}, {"generic": {"BAD KEY": 1}},
    {"generic": {"NAXIS1": 5}}, {"generic": {"CHECKSUM": None}}, {"generic": {"TFORM3": "J"}},
    {"generic": {"SIMPLE": True}}, {"generic": {"OBJECT": "x" * 69}},
    {"generic": {"OBJECT": "caf\u00e9"}}, {"generic": {"OBJECT": "a\nb"}},
    {"generic": {"OBJECT": [1]}}, {"generic": {"X": float("nan")}},
    {"generic": {"X": 2 ** 70}}, {"generic": []},
    {"qa_state": "Pass", "generic": {"RAWGEMQA": "BAD"}},
])
def test_invalid_values_rejected(values):
    with pytest.raises(BadRequest):
        parse_values(values)


def test_longest_string_that_fits_is_accepted():
    assert parse_values({"generic": {"OBJECT": "x" * 68}}) == [("OBJECT", "x" * 68)]


def test_validate_args(env, tmp_path):
    name = place(env, fitsfiles.simple_image(tmp_path / "a.fits"))
    good = {"filename": name, "values": {"qa_state": "Pass"}}
    for bad in ({**good, "hdu": -1}, {**good, "hdu": True}, {**good, "extra": 1},
                {**good, "before_md5": "xyz"}, {**good, "reject_new": "yes"},
                {**good, "filename": "../a.fits"}, {**good, "filename": "/etc/passwd"},
                {**good, "filename": "a.txt"}, {"values": {"qa_state": "Pass"}}):
        with pytest.raises(BadRequest):
            UPDATE_HEADERS.validate(bad, env)
    with pytest.raises(NotFound):
        UPDATE_HEADERS.validate({**good, "filename": "missing.fits"}, env)
    os.symlink(name, env.config.storage_root / "link.fits")
    with pytest.raises(BadRequest):
        UPDATE_HEADERS.validate({**good, "filename": "link.fits"}, env)
    assert UPDATE_HEADERS.idempotent


# -- the corpus --------------------------------------------------------------

def _generated(tmp: Path) -> list[Path]:
    return [fitsfiles.simple_image(tmp / "plain.fits"),
            fitsfiles.simple_image(tmp / "plain_ck.fits", dtype=">f8", checksum=True),
            fitsfiles.multi_extension(tmp / "mef.fits"),
            fitsfiles.multi_extension(tmp / "mef_nock.fits", checksum=False),
            fitsfiles.compressed_image(tmp / "comp.fits", checksum=True),
            fitsfiles.full_block_header(tmp / "full.fits"),
            fitsfiles.full_block_header(tmp / "full_ck.fits", checksum=True)]


# corpus files that update_headers must refuse, each with the reason it must
# give.  None today: every astropy test file (invalid/ included) and every
# generated file is one the archive could hold, so each must be edited.
REFUSED: dict[str, str] = {}


def _check_edit(ctx: OpContext, src: Path, kind: str, hdu: int = 0) -> None:
    """Edit ``src`` (plain, gz or bz2) and verify the result: the edit is made,
    the data units are byte-identical, owner and mode are kept, CHECKSUM is
    right and fitsverify finds no new error.  A refusal fails the test,
    unless ``REFUSED`` names the file and the refusal gives that reason."""
    require_fitsverify()
    name = place(ctx, src, kind)
    path = ctx.config.storage_root / name
    before, units = path.read_bytes(), fitsfiles.data_units(path)
    errors = fitsfiles.fitsverify_errors(path)
    values = {"qa_state": "Check", "generic": {"OBJECT": "spoolops test", "SPOOLN": 7}}
    refusal = REFUSED.get(src.name)
    if refusal is not None:
        with pytest.raises((BadRequest, OpFailed), match=refusal):
            call(ctx, filename=name, values=values, hdu=hdu)
        assert path.read_bytes() == before, "a refused file must stay byte-identical"
        no_leftovers(ctx)
        return
    result = call(ctx, filename=name, values=values, hdu=hdu)
    assert result["modified"] is True
    assert result["md5_before"] == hashlib.md5(before).hexdigest()
    assert result["md5_after"] == md5(path) and result["size"] == path.stat().st_size
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        hdr = hdul[hdu].header
        assert (hdr["RAWGEMQA"], hdr["RAWPIREQ"]) == ("CHECK", "CHECK")
        assert hdr["OBJECT"] == "spoolops test" and hdr["SPOOLN"] == 7
    assert fitsfiles.data_units(path) == units, "data bytes changed"
    st = path.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 8765, 0o640)
    assert fitsfiles.fitsverify_errors(path) <= errors
    no_leftovers(ctx)


def test_fitsverify_is_the_judge(tmp_path):
    """fitsverify passes a good file and counts the errors of a broken one."""
    require_fitsverify()
    assert fitsfiles.fitsverify_errors(fitsfiles.ASTROPY_DATA / "test0.fits") == 0
    broken = tmp_path / "broken.fits"
    broken.write_bytes((fitsfiles.ASTROPY_DATA / "test0.fits").read_bytes()[:-2880])
    assert fitsfiles.fitsverify_errors(broken) > 0


@pytest.mark.parametrize("src", fitsfiles.astropy_corpus(), ids=lambda p: p.name)
def test_astropy_corpus(env, src):
    _check_edit(env, src, "")


@pytest.mark.parametrize("kind", KINDS)
def test_generated_files(env, tmp_path, kind):
    gen = tmp_path / "gen"
    gen.mkdir()
    for src in _generated(gen):
        _check_edit(env, src, kind)
    _check_edit(env, gen / "mef.fits", kind, hdu=2)


@pytest.mark.parametrize("kind", ["gz", "bz2"])
def test_astropy_corpus_compressed_sample(env, kind):
    for name in ("checksum.fits", "test0.fits", "tb.fits", "comp.fits"):
        _check_edit(env, fitsfiles.ASTROPY_DATA / name, kind)


def test_checksums_verify_with_astropy(env, tmp_path):
    for src in (fitsfiles.multi_extension(tmp_path / "m.fits"),
                fitsfiles.full_block_header(tmp_path / "f.fits", checksum=True)):
        name = place(env, src)
        for hdu in (0, 1) if name == "m.fits" else (0,):
            call(env, filename=name, values={"generic": {"OBSERVER": "x" * 60}}, hdu=hdu)
        with fits.open(env.config.storage_root / name, checksum=True) as hdul:
            for h in hdul:
                assert h._checksum_valid and h._datasum_valid


# -- semantics ---------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_noop_leaves_file_untouched(env, tmp_path, kind):
    name = place(env, fitsfiles.simple_image(tmp_path / "a.fits", checksum=True), kind)
    path = env.config.storage_root / name
    call(env, filename=name, values={"qa_state": "Pass"})
    st, digest = path.stat(), md5(path)
    result = call(env, filename=name, values={"qa_state": "pass"}, md5=True)
    assert result["modified"] is False and result["changes"] == []
    assert result["md5_before"] == result["md5_after"] == digest
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_ino == st.st_ino


def test_changes_delete_and_reject_new(env, tmp_path):
    name = place(env, fitsfiles.simple_image(tmp_path / "a.fits"))
    path = env.config.storage_root / name
    result = call(env, filename=name, values={"generic": {"OBJECT": None, "NEWKEY": 1.5}})
    assert result["changes"] == [{"keyword": "OBJECT", "old": "test field", "new": None},
                                 {"keyword": "NEWKEY", "old": None, "new": 1.5}]
    assert "OBJECT" not in fits.getheader(path)
    digest = md5(path)
    with pytest.raises(Conflict):
        call(env, filename=name, values={"generic": {"NEWKEY": 2, "ABSENT": 1}},
             reject_new=True)
    assert md5(path) == digest
    assert call(env, filename=name, values={"generic": {"NEWKEY": 2}},
                reject_new=True)["changes"][0]["old"] == 1.5


@pytest.mark.parametrize("kind", KINDS)
def test_before_md5_and_hdu_range(env, tmp_path, kind):
    name = place(env, fitsfiles.multi_extension(tmp_path / "m.fits"), kind)
    path = env.config.storage_root / name
    digest = md5(path)
    with pytest.raises(Conflict):
        call(env, filename=name, values={"qa_state": "Fail"}, before_md5="0" * 32)
    with pytest.raises(BadRequest):
        call(env, filename=name, values={"qa_state": "Fail"}, hdu=4)
    assert md5(path) == digest
    result = call(env, filename=name, values={"qa_state": "Fail"}, before_md5=digest.upper())
    assert result["md5_before"] == digest and result["modified"]


def test_in_place_path(env, tmp_path, monkeypatch):
    monkeypatch.setattr(fits_edit, "INPLACE_MIN_BYTES", 0)
    name = place(env, fitsfiles.simple_image(tmp_path / "a.fits", checksum=True))
    path = env.config.storage_root / name
    ino, units = path.stat().st_ino, fitsfiles.data_units(path)
    result = call(env, filename=name, values={"qa_state": "Usable"})
    assert path.stat().st_ino == ino, "in-place edit keeps the inode"
    assert result["md5_before"] is None and result["md5_after"] is None
    result = call(env, filename=name, values={"qa_state": "Pass"}, md5=True)
    assert result["md5_after"] == md5(path) and fitsfiles.data_units(path) == units
    with fits.open(path, checksum=True) as hdul:
        assert hdul[0]._checksum_valid and hdul[0].header["RAWPIREQ"] == "YES"
    no_leftovers(env)
    # A header that must grow a block falls back to the copy path.
    many = {f"K{i:07d}": i for i in range(40)}
    call(env, filename=name, values={"generic": many})
    assert path.stat().st_ino != ino and fitsfiles.data_units(path) == units


@pytest.mark.parametrize("kind", ["gz", "bz2"])
def test_repeat_compressed_edit_copies_data_streams(env, tmp_path, kind, monkeypatch):
    monkeypatch.setattr("spoolops.fits.compress.CHUNK", 64 * 1024)
    env.config = replace_config(env.config, compressed_layout="streams")
    name = place(env, fitsfiles.simple_image(tmp_path / "a.fits", shape=(300, 300),
                                             dtype=">f4"), kind)
    path = env.config.storage_root / name
    call(env, filename=name, values={"qa_state": "Pass"})
    first = path.read_bytes()
    call(env, filename=name, values={"qa_state": "Fail", "generic": {"X": "y" * 60}})
    second = path.read_bytes()
    tail = len(first) - 1
    while second[tail - len(first) + len(second)] == first[tail]:
        tail -= 1
    assert len(first) - tail > 0.9 * len(first), "data streams were not copied verbatim"
    assert fits.getheader(path)["RAWGEMQA"] == "BAD"


def test_recover_journals_rolls_back(env, tmp_path):
    name = place(env, fitsfiles.simple_image(tmp_path / "a.fits"))
    path = env.config.storage_root / name
    old = path.read_bytes()
    header = old[:2880]
    new = header.replace(b"test field", b"half edit ")
    write_journal(env.work_dir, os.path.realpath(path), path.stat(), 0, header, new, True)
    with open(path, "r+b") as f:
        f.write(new[:1000])
    assert recover_journals(env.work_dir)[0].startswith("rolled back")
    assert path.read_bytes() == old
    assert recover_journals(env.work_dir) == [] and cleanup_temps(env.work_dir) == ([], [])


def test_damaged_files_refused_unchanged(env, tmp_path):
    src = fitsfiles.simple_image(tmp_path / "a.fits", shape=(100, 100))
    data = src.read_bytes()
    cases = {"trunc.fits": data[:-3000], "noend.fits": data[:2880].replace(b"END ", b"XND "),
             "junk.fits": b"hello" * 1000, "trunc.fits.gz": fitsfiles.compress_file(
                 src, "gz").read_bytes()[:-50], "notbz.fits.bz2": data}
    for name, blob in cases.items():
        (env.config.storage_root / name).write_bytes(blob)
        with pytest.raises((OpFailed, BadRequest)):
            call(env, filename=name, values={"qa_state": "Pass"})
        assert (env.config.storage_root / name).read_bytes() == blob
    no_leftovers(env)


@pytest.mark.parametrize("kind", ["gz", "bz2"])
def test_single_layout_is_one_stream_that_cfitsio_reads(env, tmp_path, kind):
    """The default layout writes one stream: fitsverify (cfitsio, which reads
    only the first stream of a concatenated file) verifies the file as stored."""
    import bz2
    import subprocess
    import zlib
    name = place(env, fitsfiles.simple_image(tmp_path / "a.fits", shape=(400, 400),
                                             dtype=">f4"), kind)
    path = env.config.storage_root / name
    for qa in ("Pass", "Fail"):  # a first and a repeat edit
        call(env, filename=name, values={"qa_state": qa})
        dec = bz2.BZ2Decompressor() if kind == "bz2" else zlib.decompressobj(31)
        dec.decompress(path.read_bytes())
        assert dec.eof and dec.unused_data == b"", "more than one stream"
        assert fits.getheader(path)["RAWGEMQA"] == ("USABLE" if qa == "Pass" else "BAD")
    out = subprocess.run([require_fitsverify(), "-q", str(path)], capture_output=True,
                         text=True, check=False)
    assert "verification OK" in out.stdout, out.stdout
