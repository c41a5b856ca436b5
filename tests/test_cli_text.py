"""What the ``spoolops`` commands print for a person: never a raw control.

Op names, ids, file names, targets, error messages (a web user's) and
hosts, counters, hook calls (the worker account's) reach an operator's
terminal -- often root's -- through ``ls``, ``show``, ``status``, ``tail``,
``hooks``, ``janitor`` and ``doctor``.  ``cli.text.printable`` shows each
control, bidi and invisible format character as a visible escape; these
tests plant such characters where each command reads them and look at the
raw bytes it prints (read as bytes: text mode would turn a CR into a newline).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import unicodedata

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.env import SpoolEnv
from support.waiting import Lines, wait_for

from spoolops.cli.text import printable, printable_lines

# a title change (OSC ... BEL), clear screen, cursor home, a carriage return
# that overwrites the line, a bidi override, a C1 CSI
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[1;1H\rworker OK\u202eevil\x9b"
ESCAPED = r"\x1b]0;owned\x07\x1b[2J\x1b[1;1H\rworker OK\u202eevil\x9b"


def _unsafe(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F or \
        unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs")


def _assert_clean(out: bytes, *expected: str) -> str:
    """``out`` holds no control, bidi or format character but newlines, and
    each of ``expected`` (escaped forms)."""
    text = out.decode("utf-8")            # strict: a lone surrogate is no UTF-8
    raw = sorted({f"U+{ord(c):04X}" for c in text if c != "\n" and _unsafe(c)})
    assert not raw, f"raw {raw} in:\n{text!r}"
    for form in expected:
        assert form in text, f"{form!r} not in:\n{text}"
    return text


def _run(env: SpoolEnv, *args: str) -> bytes:
    """``spoolops ARGS``: its stdout and stderr, as bytes."""
    done = subprocess.run([sys.executable, "-m", "spoolops", *args], capture_output=True,
                          env=env.env(), timeout=60, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.stdout + done.stderr


# -- printable() --------------------------------------------------------------------------

@pytest.mark.parametrize("code", [*range(0x20), 0x7F])
def test_printable_escapes_c0_controls_and_del(code: int) -> None:
    shown = printable(f"a{chr(code)}b")
    assert shown == "a" + {9: r"\t", 10: r"\n", 13: r"\r"}.get(code, f"\\x{code:02x}") + "b"
    assert shown.isprintable()


@pytest.mark.parametrize("code", range(0x80, 0xA0))
def test_printable_escapes_c1_controls(code: int) -> None:
    assert printable(f"a{chr(code)}b") == f"a\\x{code:02x}b"


@pytest.mark.parametrize("code", [*range(0x202A, 0x202F), *range(0x2066, 0x206A)])
def test_printable_escapes_bidi_overrides_and_isolates(code: int) -> None:
    assert printable(f"abc{chr(code)}def") == f"abc\\u{code:04x}def"


@pytest.mark.parametrize("char, shown", [
    ("\u200b", r"\u200b"),          # zero-width space (Cf)
    ("\u200d", r"\u200d"),          # zero-width joiner (Cf)
    ("\u200e", r"\u200e"),          # left-to-right mark (Cf)
    ("\u061c", r"\u061c"),          # Arabic letter mark (Cf)
    ("\u00ad", r"\xad"),            # soft hyphen (Cf)
    ("\ufeff", r"\ufeff"),          # byte order mark (Cf)
    ("\U000e0041", r"\U000e0041"),  # a tag character (Cf, beyond the BMP)
    ("\u2028", r"\u2028"),          # line separator (Zl)
    ("\u2029", r"\u2029"),          # paragraph separator (Zp)
    ("\ud800", r"\ud800"),          # a lone surrogate (Cs): not even encodable
])
def test_printable_escapes_invisible_format_characters(char: str, shown: str) -> None:
    assert printable(f"x{char}y") == f"x{shown}y"
    printable(f"x{char}y").encode("utf-8")


@pytest.mark.parametrize("text", [
    "", "echo", "update_headers", "20261128T101500.123456Z-42-abcdef01",
    "/data/2026/N20261128S0001.fits.bz2", "café é naïve", "日本語のファイル",
    "e\u0301",                      # a combining accent: ordinary text
    "Ελληνικά русский עברית العربية", "emoji \U0001f600", "a b\u00a0c",
    "quotes ' \" and punctuation !#$%&()*+,-./:;<=>?@[]^_`{|}~",
])
def test_printable_leaves_ordinary_text_alone(text: str) -> None:
    assert printable(text) == text


def test_printable_doubles_a_backslash_so_that_no_escape_can_be_forged() -> None:
    assert printable("C:\\dir") == "C:\\\\dir"
    # a real ESC and the four characters "\x1b" print differently
    assert printable("\x1b") != printable("\\x1b")
    assert printable("\\\x1b") != printable("\\x1b")


def test_printable_takes_any_value() -> None:
    assert printable(None) == "None" and printable(12) == "12"
    assert printable(["a\x1b"]) == r"['a\\x1b']"      # its repr, escaped again


def test_printable_lines_keeps_the_newlines_between_lines() -> None:
    assert printable_lines("one\x1b\ntwo\r") == "one\\x1b\ntwo\\r"


def test_the_planted_text_escapes_as_these_tests_expect() -> None:
    assert printable(HOSTILE) == ESCAPED


# -- the commands, on the filesystem spool ----------------------------------------------------

def test_ls_and_show_print_a_hostile_request_escaped(spool_env: SpoolEnv) -> None:
    rid = spool_env.client().submit("op" + HOSTILE, {"filename": "f" + HOSTILE})
    # a request file a member named (its name is the id ls shows)
    (spool_env.spool.new / f"id{HOSTILE}.json").write_text(json.dumps({"op": HOSTILE}))
    for command in (("ls",), ("ls", "new")):
        text = _assert_clean(_run(spool_env, *command), "op" + ESCAPED, "f" + ESCAPED,
                             "id" + ESCAPED)
        assert rid in text
    _assert_clean(_run(spool_env, "show", rid), "op:       op" + ESCAPED)
    _assert_clean(_run(spool_env, "show", "id"), "id:       id" + ESCAPED)


def test_ls_failed_and_show_print_hostile_names_and_errors_escaped(running: SpoolEnv) -> None:
    spool = running.spool
    # junk a member left, named to attack: the worker moves it to failed/
    (spool.new / f"junk{HOSTILE}.txt").write_text("not a request")
    wait_for(lambda: list(spool.failed.glob("junk*.reason")), what="junk quarantined")
    _assert_clean(_run(running, "ls", "failed"), "junk" + ESCAPED)
    text = _assert_clean(_run(running, "show", "junk"), "junk" + ESCAPED)
    assert "reason:" in text
    # an answered request whose reply (the worker account's) says anything at all
    rid = running.client().submit("op" + HOSTILE)
    reply_path = spool.replies / f"{rid}.json"
    wait_for(reply_path.exists, what="the reply")
    reply = json.loads(reply_path.read_text())
    reply["error"] = {"type": "Boom" + HOSTILE, "message": "bad " + HOSTILE}
    reply["worker"] = {"host": "host" + HOSTILE, "pid": "1" + HOSTILE}
    reply["started_at"] = "then" + HOSTILE
    reply_path.write_text(json.dumps(reply))
    _assert_clean(_run(running, "ls", "replies"), "op" + ESCAPED)
    _assert_clean(_run(running, "show", rid), "Boom" + ESCAPED, "bad " + ESCAPED,
                  "host" + ESCAPED, "then" + ESCAPED)


def test_status_prints_the_worker_counters_escaped(spool_env: SpoolEnv) -> None:
    spool = spool_env.spool
    # what the worker account writes: its lock (held) and its counters
    with open(spool.lock_path, "w") as lock:
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        (spool.work / "stats.json").write_text(json.dumps(
            {"pid": 999999999, "served": "12" + HOSTILE, "outcomes": {}}))
        text = _assert_clean(_run(spool_env, "status"), "served 12" + ESCAPED)
    assert f"running, pid {os.getpid()}" in text


def test_tail_prints_hostile_events_escaped(running: SpoolEnv) -> None:
    tail = subprocess.Popen([sys.executable, "-m", "spoolops", "tail"], env=running.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = Lines(tail.stdout)
    seen: list[bytes] = []
    try:
        deadline = time.monotonic() + 60
        client = running.client()
        while lines.next(time.monotonic() + 1.0) is None:       # tail is watching
            assert time.monotonic() < deadline, "tail never reported an event"
            client.wait(client.submit("echo", {"probe": 1}), timeout=30)
        client.submit("op" + HOSTILE, {"filename": "f" + HOSTILE})
        (running.spool.new / f"junk{HOSTILE}.txt").write_text("not a request")
        # (the two arrive in either order: the worker takes both at once)
        while not (any(b" failed " in line and b"junk" in line for line in seen)
                   and any(b"op=op" in line for line in seen)):
            line = lines.next(deadline)
            assert line is not None, f"tail printed no more lines: {seen}"
            seen.append(line)
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(30) == 0
    finally:
        tail.kill()
        tail.wait(30)
    text = _assert_clean(b"".join(seen), "op=op" + ESCAPED, "junk" + ESCAPED)
    assert " queued " in text and " finished " in text


def test_hooks_list_prints_a_kept_call_escaped(spool_env: SpoolEnv) -> None:
    from spoolops.hookledger import HookCall, HookLedger
    call = HookCall(id="r1", key="k", hook="hook" + HOSTILE, op="op" + HOSTILE, args={},
                    result={}, user="web")
    HookLedger(spool_env.spool.work, durable=False).record(call, "refused " + HOSTILE)
    _assert_clean(_run(spool_env, "hooks", "list"), "hook=hook" + ESCAPED, "op=op" + ESCAPED,
                  "refused " + ESCAPED)


def test_janitor_prints_a_hostile_file_name_escaped(spool_env: SpoolEnv) -> None:
    stale = spool_env.spool.tmp / f"tmp{HOSTILE}"
    stale.write_text("{}")
    past = time.time() - 30 * 86400
    os.utime(stale, (past, past))
    _assert_clean(_run(spool_env, "janitor", "--dry-run"), "would remove", "tmp" + ESCAPED)


def test_doctor_prints_findings_escaped(monkeypatch, capsys) -> None:
    from spoolops.cli import doctor
    from spoolops.cli.main import main
    from spoolops.doctor import Finding
    monkeypatch.setattr(doctor, "run_checks", lambda *a, **k: [
        Finding("queue", False, "role " + HOSTILE, "grant " + HOSTILE)])
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    _assert_clean(out.encode(), "role " + ESCAPED, "grant " + ESCAPED)


def test_error_messages_print_escaped(monkeypatch, capsys) -> None:
    from spoolops.cli import main as cli_main
    from spoolops.errors import SpoolError

    def fails(args):
        raise SpoolError("no request " + HOSTILE)
    monkeypatch.setitem(cli_main.COMMANDS, "status", fails)
    assert cli_main.main(["status"]) == 1
    _assert_clean(capsys.readouterr().err.encode(), "no request " + ESCAPED)


# -- Prometheus -------------------------------------------------------------------------------

def test_prometheus_labels_are_escaped_and_counters_must_be_numbers() -> None:
    from spoolops.prometheus import render_metrics
    empty = {"count": 0, "oldest_age_s": None}
    status = {"queued": empty, "running": empty, "failed": empty, "replies": empty,
              "worker": {"alive": True}}
    op = 'a"b\\c\nforged{x="1"} 9' + HOSTILE + "\ud800"
    stats = {"outcomes": {op: {"ok": 3},
                          "echo": {"ok": '1\nspoolops_worker_up 0\n# x'}},
             "buckets": [0.1, "1\nforged 1"],
             "histograms": {op: {"buckets": [1, 2], "count": 2, "sum": 0.5},
                            "sleep": {"buckets": [1, 1], "count": "1\nforged 2",
                                      "sum": 0.1}}}
    text = render_metrics(status, stats)
    text.encode("utf-8")                                # writable as UTF-8
    samples = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
               for s in family.samples]
    names = {name for name, _, _ in samples}
    assert "forged" not in names
    assert ("spoolops_worker_up", {}, 1.0) in samples   # not forged to 0
    served = {s[1]["op"]: s[2] for s in samples if s[0] == "spoolops_served_total"}
    assert served == {op.replace("\ud800", "\ufffd" * 3): 3.0}   # the name, unchanged
    assert not [s for s in samples if s[1].get("op") == "sleep"]
    buckets = [s for s in samples if s[0] == "spoolops_operation_seconds_bucket"]
    assert sorted(s[1]["le"] for s in buckets) == ["+Inf", "0.1"]
