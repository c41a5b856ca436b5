"""Hostile input: whatever a member of the submit group can drop into ``new/``.

A real worker process runs on a real spool; the test plants a barrage of bad
entries directly in ``new/`` (as a group member could: links, FIFOs,
sockets, devices, directories, oversize files, bad names, bad JSON, bad
envelopes, bad arguments) and checks each one's outcome:

- a ``<valid id>.json`` regular file the worker can read gets exactly one
  reply with the expected error type, and the request file is gone;
- anything else is moved to ``failed/`` (or left where it is when it cannot
  be moved) beside ``failed/<name>.reason``, whose text says why.

Afterwards the same worker (same pid) still answers a normal ``echo``, and no
file outside the spool was touched.  Runs as any user; the device case needs
root (``mknod``) and is left out otherwise.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.env import SpoolEnv
from support.requires import is_root
from support.waiting import wait_for

from spoolops.formats import utc_iso
from spoolops.transport.spool.names import reason_file_name


def envelope(rid: str, op: str = "echo", args: Any = None, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"version": 1, "id": rid, "op": op,
                           "args": {"x": 1} if args is None else args,
                           "submitted": utc_iso(), "client": {"pid": 1, "host": "hostile"}}
    obj.update(extra)
    return obj


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()


@dataclass
class Case:
    """One planted entry: its name in ``new/`` and the outcome expected.

    ``reply`` is an error type (the entry's id is trustworthy); otherwise
    ``phrase`` must appear in ``failed/<name>.reason``.
    """

    label: str
    name: str
    plant: Any                    # callable(path: Path) -> None
    reply: str | None = None
    phrase: str | None = None
    movable: bool = True


_PLANTED = itertools.count()


def _bytes(data: bytes):
    def plant(path: Path) -> None:
        # written elsewhere, then renamed in: the entry appears complete
        staging = path.parent.parent / "tmp" / f"planting-{next(_PLANTED)}"
        staging.write_bytes(data)
        os.rename(staging, path)
    return plant


def _symlink(target: Path | str):
    return lambda path: os.symlink(target, path)


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o640)


def _socket(path: Path) -> None:
    # bound where the name fits sun_path (108 bytes), then renamed into place
    with tempfile.TemporaryDirectory(dir="/tmp") as short:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(os.path.join(short, "s"))
        sock.close()  # the socket file stays
        os.rename(os.path.join(short, "s"), path)


def _directory(path: Path) -> None:
    # made whole elsewhere, then renamed in: a running worker may move it
    # aside the moment it appears (a test race on a busy host)
    staging = path.parent.parent / "tmp" / f"planting-{next(_PLANTED)}"
    staging.mkdir()
    (staging / "inner.json").write_bytes(b"{}")
    os.rename(staging, path)


def _chardev(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o640, os.makedev(1, 3))  # like /dev/null


def _future_mtime(data: bytes):
    def plant(path: Path) -> None:
        # dated before it is renamed in: a running worker may claim it at once
        staging = path.parent.parent / "tmp" / f"planting-{next(_PLANTED)}"
        staging.write_bytes(data)
        future = time.time() + 10 * 365 * 86400
        os.utime(staging, (future, future))
        os.rename(staging, path)
    return plant


OUTSIDE_TEXT = b'{"secret": "outside the spool"}\n'


def build_cases(env: SpoolEnv, outside: Path) -> list[Case]:
    limit = env.config.max_request_bytes
    n = iter(range(1000))

    def rid(tag: str) -> str:
        slug = "".join(ch if ch.isalnum() else "-" for ch in tag)
        return f"hostile-{next(n):03d}-{slug}"

    def id_case(label: str, data: bytes, reply: str) -> Case:
        r = rid(label)
        return Case(label, r + ".json", _bytes(data), reply=reply)

    def raw(label: str, obj_fn) -> Case:
        r = rid(label)
        return Case(label, r + ".json", _bytes(obj_fn(r)), reply="BadRequest")

    cases = [
        # -- not a regular single-link file: quarantined, never opened as data
        Case("symlink to a file outside the spool", rid("symlink") + ".json",
             _symlink(outside), phrase="symbolic link"),
        Case("dangling symlink", rid("dangling") + ".json",
             _symlink("/nonexistent/spoolops-hostile"), phrase="symbolic link"),
        Case("symlink to a directory", rid("dirlink") + ".json", _symlink("/etc"),
             phrase="symbolic link"),
        Case("symlink to storage_root", rid("storagelink") + ".json",
             _symlink(env.config.storage_root), phrase="symbolic link"),
        Case("FIFO", rid("fifo") + ".json", _fifo, phrase="FIFO"),
        Case("unix socket", rid("socket") + ".json", _socket,
             phrase="not a regular file but a socket"),
        Case("directory", rid("dir") + ".json", _directory, phrase="directory"),
        Case("hard link to a file outside new/", rid("hardlink") + ".json",
             lambda path: os.link(outside, path), phrase="hard links"),
        # -- names that carry no id: quarantined, no reply can be addressed
        Case("name without .json", "hostile-plain.txt", _bytes(dumps({"op": "echo"})),
             phrase="name is not <id>.json"),
        Case("hidden name", ".hostile.json", _bytes(b"{}"), phrase="name is not <id>.json"),
        Case("name starting with a dash", "-hostile.json", _bytes(b"{}"),
             phrase="name is not <id>.json"),
        Case("name with a space", "hostile id.json", _bytes(b"{}"),
             phrase="name is not <id>.json"),
        Case("name with a newline", "hostile\nid.json", _bytes(b"{}"),
             phrase="name is not <id>.json"),
        Case("id longer than 128", "h" * 129 + ".json", _bytes(b"{}"),
             phrase="name is not <id>.json"),
        Case("name of 255 bytes", "h" * 255, _bytes(b"{}"), phrase="name is not <id>.json"),
        Case("non-UTF-8 name", os.fsdecode(b"hostile-\xff\xfe.json"), _bytes(b"{}"),
             phrase="name is not <id>.json"),
        Case("name of a run file", "hostile-victim.json.run", _bytes(b"{}"),
             phrase="name is not <id>.json"),
        Case("oversize file with a bad name", "hostile-big.bin",
             _bytes(b" " * (limit + 1)), phrase="name is not <id>.json"),
        # -- trustworthy id, bad content: exactly one reply
        id_case("oversize", b"{" + b" " * (limit + 10) + b"}", "BadRequest"),
        id_case("empty file", b"", "BadRequest"),
        id_case("invalid UTF-8", b'{"version": 1, "op": "\xff\xfe"}', "BadRequest"),
        id_case("UTF-16", json.dumps({"version": 1}).encode("utf-16"), "BadRequest"),
        id_case("UTF-8 BOM", b"\xef\xbb\xbf{}", "BadRequest"),
        id_case("NUL bytes", b"\x00" * 64, "BadRequest"),
        id_case("truncated JSON", b'{"version": 1, "op": "ec', "BadRequest"),
        id_case("JSON array", b"[1, 2, 3]", "BadRequest"),
        id_case("JSON string", b'"echo"', "BadRequest"),
        id_case("JSON null", b"null", "BadRequest"),
        id_case("deeply nested arrays", b"[" * 30000 + b"]" * 30000, "BadRequest"),
        raw("deeply nested args", lambda r: dumps(envelope(r)).replace(
            b'{"x": 1}', b'{"x": ' + b"[" * 200 + b"]" * 200 + b"}")),
        raw("huge integer", lambda r: dumps(envelope(r)).replace(
            b'"version": 1', b'"version": 1' + b"0" * 5000)),
        raw("NaN", lambda r: dumps(envelope(r)).replace(b'{"x": 1}', b'{"x": NaN}')),
        raw("duplicate keys", lambda r: dumps(envelope(r))[:-1] + b', "op": "crash"}'),
        raw("missing version", lambda r: dumps({k: v for k, v in envelope(r).items()
                                                if k != "version"})),
        raw("wrong version", lambda r: dumps(envelope(r, version=2))),
        raw("version as string", lambda r: dumps(envelope(r, version="1"))),
        raw("missing id", lambda r: dumps({k: v for k, v in envelope(r).items()
                                           if k != "id"})),
        raw("id not matching file name", lambda r: dumps(envelope("someone-else"))),
        raw("id as number", lambda r: dumps(envelope(r, id=12345))),
        raw("missing op", lambda r: dumps({k: v for k, v in envelope(r).items()
                                           if k != "op"})),
        raw("op not a string", lambda r: dumps(envelope(r, op=["echo"]))),
        raw("empty op", lambda r: dumps(envelope(r, op=""))),
        raw("unknown field", lambda r: dumps(envelope(r, user="root"))),
        raw("priority as string", lambda r: dumps(envelope(r, priority="9"))),
        raw("priority as bool", lambda r: dumps(envelope(r, priority=True))),
        raw("priority too large", lambda r: dumps(envelope(r, priority=10**12))),
        raw("deadline not a string", lambda r: dumps(envelope(r, deadline=123))),
        raw("deadline not a time", lambda r: dumps(envelope(r, deadline="tomorrow"))),
        raw("client not an object", lambda r: dumps(envelope(r, client="web1"))),
        raw("submitted not a string", lambda r: dumps(envelope(r, submitted=0))),
        raw("args not an object", lambda r: dumps(envelope(r, args=[1, 2]))),
        raw("wrong argument type", lambda r: dumps(envelope(r, op="sleep",
                                                            args={"seconds": "long"}))),
        raw("argument out of range", lambda r: dumps(envelope(r, op="sleep",
                                                              args={"seconds": 1e9}))),
        raw("huge structure in args", lambda r: dumps(envelope(r, op="sleep", args={
            "seconds": 0, "target": ["x"] * 3000}))),
        # -- well-formed, but not allowed: typed replies
        Case("unknown op", rid("unknownop") + ".json", None, reply="UnknownOp"),
        Case("op the submitter may not call", rid("restricted") + ".json", None,
             reply="PermissionDenied"),
        Case("path traversal op name", rid("traversal") + ".json", None, reply="UnknownOp"),
    ]
    for case in cases:  # the ones whose content needs their own id
        r = case.name[: -len(".json")]
        if case.label == "unknown op":
            case.plant = _bytes(dumps(envelope(r, op="rm_rf")))
        elif case.label == "op the submitter may not call":
            case.plant = _bytes(dumps(envelope(r, op="restricted")))
        elif case.label == "path traversal op name":
            case.plant = _bytes(dumps(envelope(r, op="../../etc/passwd")))
    if is_root():
        cases.append(Case("character device", rid("chardev") + ".json", _chardev,
                          phrase="character device"))
    return cases


def _reply(env: SpoolEnv, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((env.spool.replies / name).read_bytes())
    except FileNotFoundError:
        return None


def _outcome(env: SpoolEnv, case: Case) -> str | None:
    """None while pending; else a description of what went wrong ('' if right)."""
    spool = env.spool
    if case.reply is not None:
        reply = _reply(env, case.name)
        if reply is None:
            return None
        problems = []
        if reply.get("ok") is not False or (reply.get("error") or {}).get("type") != case.reply:
            problems.append(f"reply {reply.get('error')} instead of {case.reply}")
        if reply.get("id") != case.name[: -len(".json")]:
            problems.append(f"reply id {reply.get('id')!r}")
        for where in (spool.new, spool.active):
            if os.path.lexists(where / case.name):
                problems.append(f"request file still in {where.name}/")
        return "; ".join(problems)
    reason_path = spool.failed / reason_file_name(case.name)
    if not reason_path.exists():
        return None
    text = reason_path.read_text(errors="replace")
    problems = []
    if case.phrase not in text:
        problems.append(f"reason {text.strip()!r} lacks {case.phrase!r}")
    if text.count("\n") != 1:
        problems.append("reason is not one line")
    moved = os.path.lexists(spool.failed / case.name)
    left = os.path.lexists(spool.new / case.name)
    if case.movable and not moved:
        problems.append("entry not moved to failed/")
    if not moved and not left:
        problems.append("entry vanished")
    if os.path.lexists(spool.active / case.name):
        problems.append("entry left in active/")
    if _reply(env, case.name) is not None:
        problems.append("a reply was written for an entry without a trustworthy id")
    return "; ".join(problems)


def test_barrage_of_hostile_entries(running: SpoolEnv, tmp_path: Path) -> None:
    env = running
    proc = env.workers[0]
    outside = tmp_path / "outside.json"
    outside.write_bytes(OUTSIDE_TEXT)
    outside_mtime = outside.stat().st_mtime_ns
    storage_before = sorted(p.name for p in env.config.storage_root.iterdir())
    cases = build_cases(env, outside)
    assert len({c.name for c in cases}) == len(cases)
    assert len(cases) >= 30
    for case in cases:
        case.plant(env.spool.new / case.name)

    results: dict[str, str] = {}

    def settled() -> bool:
        for case in cases:
            if case.label not in results:
                outcome = _outcome(env, case)
                if outcome is not None:
                    results[case.label] = outcome
        return len(results) == len(cases)

    end = time.monotonic() + 120
    while not settled() and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.1)   # poll interval of a wait with a deadline (outcomes are files)
    pending = [c.label for c in cases if c.label not in results]
    assert proc.poll() is None, f"worker died with {proc.returncode}; pending: {pending}"
    assert not pending, (pending, {k: v for k, v in results.items() if v})
    failures = {label: why for label, why in results.items() if why}
    assert not failures, failures

    # the worker survived, unchanged, and still serves
    assert proc.poll() is None
    reply = env.client().call("echo", {"after": "barrage"}, timeout=60)
    assert reply == {"after": "barrage"}
    assert proc.poll() is None and env.workers[0].pid == proc.pid
    # nothing outside the spool was followed or touched
    assert outside.read_bytes() == OUTSIDE_TEXT
    assert outside.stat().st_mtime_ns == outside_mtime
    assert sorted(p.name for p in env.config.storage_root.iterdir()) == storage_before
    assert not list(env.spool.active.iterdir())


def test_future_mtime_is_treated_as_now(running: SpoolEnv) -> None:
    """A request dated ten years ahead is served, and queued 'now', not then."""
    env = running
    rid = "hostile-future-mtime"
    before = time.time()
    _future_mtime(dumps(envelope(rid)))(env.spool.new / (rid + ".json"))
    reply = wait_for(lambda: _reply(env, rid + ".json"), timeout=60, what="reply")
    assert reply["ok"] is True
    queued = reply["queued_at"]
    from spoolops.formats import parse_iso
    assert before - 5 <= parse_iso(queued) <= time.time() + 5


def test_future_mtime_does_not_jump_the_queue(spool_env: SpoolEnv) -> None:
    """Ordering: a future mtime sorts as 'now', after requests already waiting."""
    env = spool_env
    old = time.time() - 100
    names = []
    for i in range(6):  # more than concurrency, so keys are read
        rid = f"hostile-order-{i}"
        path = env.spool.new / (rid + ".json")
        _bytes(dumps(envelope(rid, op="sleep", args={"seconds": 0, "target": "t",
                                                     "tag": rid})))(path)
        os.utime(path, (old + i, old + i))
        names.append(rid)
    cheat = "hostile-order-cheat"
    _future_mtime(dumps(envelope(cheat, op="sleep", args={"seconds": 0, "target": "t",
                                                          "tag": cheat})))(
        env.spool.new / (cheat + ".json"))
    proc = env.start_worker("--once", wait=False)
    assert proc.wait(120) == 0
    starts = {}
    for rid in [*names, cheat]:
        reply = _reply(env, rid + ".json")
        assert reply is not None and reply["ok"], reply
        starts[rid] = reply["result"]["start"]
    order = sorted(starts, key=starts.get)
    assert order[-1] == cheat, order


def test_unreadable_request_is_answered(spool_env: SpoolEnv) -> None:
    """A request file the worker may not read (mode 0000) still carries a
    valid id: it is answered BadRequest, naming the mode.  As root the
    worker runs without CAP_DAC_OVERRIDE, so that root too obeys the mode."""
    env = spool_env
    path = env.spool.new / "hostile-unreadable.json"
    _bytes(dumps(envelope("hostile-unreadable")))(path)
    os.chmod(path, 0)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] \
        if is_root() else []
    proc = env.start_worker("--once", wait=False, prefix=prefix)
    assert proc.wait(60) == 0, proc.log_path.read_text()
    reply = _reply(env, "hostile-unreadable.json")
    assert reply is not None and reply["error"]["type"] == "BadRequest", reply
    assert "may not read the request file (mode 0000" in reply["error"]["message"]
    assert not path.exists()
