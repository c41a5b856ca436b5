"""Operations as a site writes them: declarations that fail closed, and the
example of docs/writing-an-operation.rst run through the entry-point group."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.env import make_spool_env

from spoolops.errors import SpoolError
from spoolops.ops import EVERYONE, NO_TARGETS, SITE_DEFAULT, Operation, Registry
from spoolops.ops import args as check

DOC = Path(__file__).resolve().parent.parent / "docs" / "writing-an-operation.rst"


def _run(ctx, args):
    return {}


def test_an_op_must_declare_its_targets_and_who_may_call_it() -> None:
    with pytest.raises(TypeError, match="targets"):
        Operation("forgetful", _run, allowed_users=EVERYONE)        # type: ignore[call-arg]
    with pytest.raises(TypeError, match="allowed_users"):
        Operation("forgetful", _run, targets=NO_TARGETS)            # type: ignore[call-arg]
    registry = Registry()
    for bad in ((), ("",), "fitsweb", None):
        with pytest.raises(SpoolError, match="allowed_users"):
            registry.register(Operation("x", _run, targets=NO_TARGETS, allowed_users=bad))
    with pytest.raises(SpoolError, match="targets"):
        registry.register(Operation("x", _run, targets=None, allowed_users=EVERYONE))
    registry.register(Operation("ok", _run, targets=NO_TARGETS, allowed_users=SITE_DEFAULT))
    registry.register(Operation("mine", _run, targets=NO_TARGETS, allowed_users=("fitsweb",)))
    assert registry.names() == ["mine", "ok"]


def test_site_default_follows_access_default() -> None:
    from spoolops.config import Config
    config = Config.from_text("[access]\ndefault = fitsweb\nmine = alice\n")
    assert config.allowed_users("ok", SITE_DEFAULT) == ("fitsweb",)
    assert config.allowed_users("all", EVERYONE) == ("*",)
    assert config.allowed_users("mine", EVERYONE) == ("alice",)   # [access] wins


@pytest.mark.parametrize(("args", "message"), [
    ([], "args must be a JSON object"), ({"extra": 1}, "unknown argument"),
    ({"n": True}, "n must be an integer >= 0"), ({"n": -1}, "n must be an integer >= 0"),
    ({"f": "yes"}, "f must be true or false"), ({"m": "xyz"}, "32 hexadecimal"),
    ({"p": "../x"}, "'..'"), ({"p": "/etc"}, "relative"), ({"s": 3}, "s must be a string"),
])
def test_argument_checks_say_what_is_wrong(args, message) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        clean = check.object_args(args)
        check.only(clean, ("n", "f", "m", "p", "s"), "op")
        check.integer(clean, "n", 0, minimum=0)
        check.flag(clean, "f")
        check.md5(clean, "m")
        check.relative_path(clean, "p", allow_empty=True)
        check.text(clean, "s")


def test_null_means_not_given() -> None:
    args = {"n": None, "f": None, "m": None, "s": None}
    assert (check.integer(args, "n", 7), check.flag(args, "f", True), check.md5(args, "m"),
            check.text(args, "s", "d")) == (7, True, None, "d")
    assert check.md5({"m": " ABCDEF0123456789ABCDEF0123456789 "}, "m") == \
        "abcdef0123456789abcdef0123456789"


def _doc_files() -> dict[str, str]:
    """The files the page shows: a '.. file: NAME' line, then a code block."""
    text = DOC.read_text()
    files = {}
    for match in re.finditer(r"^\.\. file: (\S+)\n\n\.\. code-block:: python\n\n"
                             r"((?:    .*\n|\n)+)", text, re.MULTILINE):
        body = "\n".join(line[4:] for line in match.group(2).splitlines())
        files[match.group(1)] = body.strip() + "\n"
    return files


def test_the_writing_an_operation_example_runs_as_a_site_op(tmp_path: Path) -> None:
    files = _doc_files()
    assert set(files) == {"site_notes.py", "test_site_notes.py"}
    site = tmp_path / "site"
    dist = site / "site_notes-0.1.dist-info"
    dist.mkdir(parents=True)
    for name, body in files.items():
        (site / name).write_text(body)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: site-notes\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[spoolops.ops]\nwrite_note = site_notes:WRITE_NOTE\n")
    env = make_spool_env(tmp_path / "tree", durable=True)
    try:
        pythonpath = f"{site}:{env.env()['PYTHONPATH']}"
        env.start_worker(PYTHONPATH=pythonpath)
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(site / "test_site_notes.py")], capture_output=True,
                              text=True, timeout=300, check=False, cwd=site,
                              env=env.env(PYTHONPATH=pythonpath,
                                          SPOOLOPS_TEST_CONFIG=str(env.config_path)))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 passed" in done.stdout
        log = env.workers[0].log_path.read_text()
        assert "write_note" in log.split("ops=")[1].split()[0]      # registered by entry point
        assert not (env.spool.work / "temps").exists() or \
            not list((env.spool.work / "temps").iterdir())
    finally:
        env.close()
