"""The spool protocol's primitives, on real directories."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from support.env import SpoolEnv

from spoolops.files import UnsafeEntry, read_untrusted, write_atomic
from spoolops.formats import ID_RE, encode_json, new_request_id
from spoolops.transport.spool.names import id_from_name


def test_request_ids_match_pattern_and_sort_by_time() -> None:
    base = time.time()
    ids = [new_request_id(base + n * 0.000_01) for n in range(50)]   # 10 us apart
    assert all(ID_RE.match(i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    same = {new_request_id(base) for _ in range(1000)}                # one microsecond
    assert len(same) == 1000
    assert id_from_name(ids[0] + ".json") == ids[0]
    for bad in ("x.txt", ".hidden.json", "a/b.json", "-x.json", "x" * 129 + ".json", ".json"):
        assert id_from_name(bad) is None


def test_publish_request_file_is_readable_json(spool_env: SpoolEnv) -> None:
    spool = spool_env.spool
    rid = spool_env.client().submit("echo", {"x": 1}, priority=3)
    path = spool.new / (rid + ".json")
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == os.getuid()
    text = path.read_text()
    assert text.endswith("}\n") and "\n  " in text  # pretty-printed for cat
    obj = json.loads(text)
    assert obj["id"] == rid and obj["op"] == "echo" and obj["priority"] == 3
    assert obj["version"] == 1 and obj["client"]["pid"] == os.getpid()
    assert list(spool.tmp.iterdir()) == []


def test_read_untrusted_refuses_what_is_not_a_plain_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text("{}")
    assert read_untrusted(good, 100).data == b"{}"
    link = tmp_path / "link.json"
    link.symlink_to(good)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    hard = tmp_path / "hard.json"
    os.link(good, hard)
    big = tmp_path / "big.json"
    big.write_bytes(b"x" * 101)
    folder = tmp_path / "dir.json"
    folder.mkdir()
    cases = {link: "symbolic link", fifo: "FIFO", hard: "hard links", big: "more than",
             folder: "regular file"}
    for path, phrase in cases.items():
        with pytest.raises(UnsafeEntry) as info:
            read_untrusted(path, 100)
        assert phrase in info.value.reason, (path, info.value.reason)
    with pytest.raises(FileNotFoundError):
        read_untrusted(tmp_path / "absent.json", 100)


def test_cancel_and_claim_race_has_one_winner(spool_env: SpoolEnv) -> None:
    spool = spool_env.spool
    wins = {"claim": 0, "cancel": 0}
    for n in range(300):
        rid = f"race-{n}"
        (spool.new / (rid + ".json")).write_text("{}")
        barrier = threading.Barrier(2)
        outcome = {}

        def claim(rid: str = rid, barrier=barrier, outcome=outcome) -> None:
            barrier.wait()
            outcome["claim"] = spool.claim(rid + ".json") is not None

        def cancel(rid: str = rid, barrier=barrier, outcome=outcome) -> None:
            barrier.wait()
            outcome["cancel"] = spool.withdraw(rid)

        threads = [threading.Thread(target=claim), threading.Thread(target=cancel)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcome["claim"] != outcome["cancel"], "exactly one must win"
        wins["claim" if outcome["claim"] else "cancel"] += 1
        (spool.active / (rid + ".json")).unlink(missing_ok=True)
    assert wins["claim"] + wins["cancel"] == 300


def test_claim_never_replaces_a_running_request(spool_env: SpoolEnv) -> None:
    spool = spool_env.spool
    (spool.active / "dup.json").write_bytes(b"running")
    (spool.new / "dup.json").write_bytes(b"second")
    refused = spool.claim("dup.json")          # quarantined, never renamed over it
    assert refused.moved and "already running" in refused.reason
    assert (spool.active / "dup.json").read_bytes() == b"running"
    assert (spool.failed / "dup.json").read_bytes() == b"second"
    assert spool.claim("absent.json") is None


def test_encode_json_is_one_key_per_line_and_round_trips() -> None:
    obj = {"id": "x", "args": {"a": [1, {"b": "é"}]}, "ok": True, "error": None}
    text = encode_json(obj).decode()
    assert json.loads(text) == obj
    assert text.splitlines()[1:-1] == ['  "id": "x",', '  "args": {"a": [1, {"b": "é"}]},',
                                       '  "ok": true,', '  "error": null']
    with pytest.raises(ValueError):
        encode_json({"x": float("nan")})


def test_write_atomic_readers_never_see_a_part(tmp_path: Path) -> None:
    final = tmp_path / "final.json"
    versions = [bytes([65 + i]) * 300_000 for i in range(4)]
    write_atomic(tmp_path / "stage", final, versions[0], durable=False)
    stop = threading.Event()
    seen, torn = set(), []

    def reader() -> None:
        while not stop.is_set():
            data = final.read_bytes()
            if data not in versions:
                torn.append(len(data))
            seen.add(data[:1])

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            write_atomic(tmp_path / "stage", final, versions[i % 4], durable=(i % 10 == 0))
    finally:
        stop.set()
        t.join()
    assert torn == [] and len(seen) >= 2
    assert not (tmp_path / "stage").exists()


def test_nesting_limit_is_exact() -> None:
    """32 levels are allowed, 33 are not (the bracket count shortcut must agree)."""
    from spoolops.errors import BadRequest
    from spoolops.formats import MAX_DEPTH, decode_json_object
    ok = b'{"a": ' + b"[" * (MAX_DEPTH - 2) + b"1" + b"]" * (MAX_DEPTH - 2) + b"}"
    assert decode_json_object(ok)
    deep = b'{"a": ' + b"[" * (MAX_DEPTH - 1) + b"1" + b"]" * (MAX_DEPTH - 1) + b"}"
    with pytest.raises(BadRequest):
        decode_json_object(deep)


def test_lone_surrogate_round_trips(running: SpoolEnv) -> None:
    """A "\\udc80" escape decodes to a lone surrogate, which UTF-8 cannot
    carry: files hold the escape again, and the request gets its reply."""
    client = running.client()
    assert client.call("echo", {"s": "\udc80x"}, timeout=30) == {"s": "\udc80x"}
