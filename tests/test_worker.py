"""The worker end to end: a real worker process, real inotify, real clients."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import SpoolEnv, is_root, make_env, unavailable, wait_for

from spoolops import Client, Expired, OpFailed, Timeout, UnknownOp


def _all_replies(env: SpoolEnv) -> dict[str, dict]:
    out = {}
    for path in env.spool.replies.iterdir():
        obj = json.loads(path.read_text())
        out[obj["id"]] = obj
    return out


def _spool_quiet(env: SpoolEnv) -> None:
    assert list(env.spool.new.iterdir()) == []
    assert list(env.spool.active.iterdir()) == []


def test_echo_round_trip(running: SpoolEnv) -> None:
    client = running.client()
    assert client.call("echo", {"x": 1, "s": "é"}, timeout=30) == {"x": 1, "s": "é"}
    # the reply was collected: nothing left behind
    assert list(running.spool.replies.iterdir()) == []
    _spool_quiet(running)


def test_reply_fields(running: SpoolEnv) -> None:
    client = running.client()
    rid = client.submit("echo", {"k": "v"})
    reply = client.wait(rid, timeout=30)
    raw = reply.raw
    assert set(raw) == {"version", "id", "op", "ok", "result", "error", "submitted_by",
                        "queued_at", "started_at", "finished_at", "worker"}
    assert raw["id"] == rid and raw["op"] == "echo" and raw["ok"] is True
    assert raw["error"] is None and raw["result"] == {"k": "v"}
    assert raw["submitted_by"] == __import__("pwd").getpwuid(os.getuid()).pw_name
    assert raw["queued_at"] <= raw["started_at"] <= raw["finished_at"]
    assert raw["worker"]["pid"] == running.workers[0].pid


def test_errors_become_typed_exceptions(running: SpoolEnv) -> None:
    client = running.client()
    with pytest.raises(UnknownOp) as info:
        client.call("no_such_op", {}, timeout=30)
    assert isinstance(info.value, LookupError)
    assert info.value.type == "UnknownOp" and "no_such_op" in info.value.message
    assert info.value.reply.id
    with pytest.raises(OpFailed) as info:
        client.call("crash", {}, timeout=30)
    assert "deliberate failure" in info.value.message
    # the worker survived both
    assert client.call("echo", {"after": True}, timeout=30) == {"after": True}


def _client_process(config_path: str, proc_no: int, count: int, queue) -> None:
    client = Client(config=config_path)
    results = []
    for n in range(count):
        result = client.call("echo", {"proc": proc_no, "n": n}, timeout=120)
        results.append((result["proc"], result["n"]))
    queue.put((proc_no, results))


def test_eight_clients_two_hundred_each(running: SpoolEnv) -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_client_process,
                         args=(str(running.config_path), i, 200, queue)) for i in range(8)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for i in range(8):
        assert results[i] == [(i, n) for n in range(200)]
    assert list(running.spool.replies.iterdir()) == []
    _spool_quiet(running)


def _queue_with_mtime(client: Client, env: SpoolEnv, op: str, args: dict, priority: int,
                      mtime: float) -> str:
    rid = client.submit(op, args, priority=priority)
    path = env.spool.new / (rid + ".json")
    os.utime(path, (mtime, mtime))
    return rid


@pytest.mark.parametrize("concurrency", [1, 8])
def test_priority_then_mtime_then_id(tmp_path: Path, concurrency: int) -> None:
    env = make_env(tmp_path / "tree")
    text = env.config_path.read_text().replace("concurrency = 4", f"concurrency = {concurrency}")
    env.config_path.write_text(text)
    client = env.client()
    base = time.time() - 1000
    plan = [  # (priority, mtime offset, tag)
        (0, 5, "p0-late"), (0, 1, "p0-early"), (5, 9, "p5-late"), (5, 3, "p5-early"),
        (-1, 0, "pneg"), (0, 1, "p0-early-same-mtime"), (9, 20, "p9"),
    ]
    ids = {}
    for priority, offset, tag in plan:
        ids[tag] = _queue_with_mtime(client, env, "sleep",
                                     {"seconds": 0.05, "tag": tag, "target": "one-file"},
                                     priority, base + offset)
    proc = env.start_worker("--once", wait=False)
    assert proc.wait(120) == 0
    replies = {r["result"]["tag"]: r["result"] for r in _all_replies(env).values()}
    order = [tag for tag, _ in sorted(replies.items(), key=lambda kv: kv[1]["start"])]
    same = sorted(["p0-early", "p0-early-same-mtime"], key=lambda t: ids[t])
    assert order == ["p9", "p5-early", "p5-late", *same, "p0-late", "pneg"]
    env.close()


def test_same_target_serialised_other_targets_parallel(running: SpoolEnv, tmp_path) -> None:
    """Three requests on target A and three on B, each held running until a
    release file appears: A0 and B0 run side by side while A1, A2, B1, B2
    wait for their target; a fast echo is not stuck behind them; once
    released, each target's requests run one at a time in submission order."""
    client = running.client()
    release = tmp_path / "release"
    ids = []
    for i in range(3):
        for target in "AB":
            ids.append(client.submit("hold", {"release": str(release), "target": target,
                                              "tag": f"{target}{i}"}))

    def running_targets() -> list[str]:
        found = []
        for path in running.spool.active.glob("*.json.run"):
            try:
                found += json.loads(path.read_text())["targets"]
            except (OSError, ValueError):
                continue
        return sorted(found)
    wait_for(lambda: running_targets() == ["A", "B"], what="A0 and B0 running together")
    assert client.call("echo", {"fast": 1}, timeout=60) == {"fast": 1}
    assert running_targets() == ["A", "B"]          # the echo did not wait for them
    release.touch()
    results = [client.wait(rid, timeout=120).result for rid in ids]
    by_target: dict[str, list] = {"A": [], "B": []}
    for r in results:
        by_target[r["tag"][0]].append((r["start"], r["end"], r["tag"]))
    for target, spans in by_target.items():
        spans.sort()
        assert [s[2] for s in spans] == [f"{target}{i}" for i in range(3)], "submission order"
        for (_s1, e1, _), (s2, _e2, _) in itertools.pairwise(spans):
            assert s2 >= e1 - 0.001, f"{target}: two requests ran at once"


def test_deadline_expired(running: SpoolEnv) -> None:
    client = running.client()
    rid = client.submit("echo", {"x": 1}, deadline=time.time() - 5)
    reply = client.wait(rid, timeout=30)
    assert reply.ok is False and reply.error["type"] == "Expired"
    with pytest.raises(Expired):
        reply.raise_for_error()


def test_cancel_before_claim(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    rid = client.submit("echo", {"x": 1})
    keep = client.submit("echo", {"x": 2})
    assert client.cancel(rid) is True
    assert client.cancel(rid) is False  # already gone
    proc = spool_env.start_worker("--once", wait=False)
    assert proc.wait(60) == 0
    assert set(_all_replies(spool_env)) == {keep}
    _spool_quiet(spool_env)


def test_timeout_when_no_worker_withdraws_request(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    t0 = time.monotonic()
    with pytest.raises(Timeout) as info:
        client.call("echo", {"x": 1}, timeout=0.5)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - t0 < 10
    assert list(spool_env.spool.new.iterdir()) == []  # withdrawn: it will never run


def test_startup_scan_serves_backlog(spool_env: SpoolEnv) -> None:
    client = spool_env.client()
    ids = [client.submit("echo", {"n": n}) for n in range(60)]
    spool_env.start_worker()
    for n, rid in enumerate(ids):
        assert client.wait(rid, timeout=60).result == {"n": n}
    _spool_quiet(spool_env)


def test_inotify_overflow_loses_nothing(spool_env: SpoolEnv, tmp_path: Path) -> None:
    limit_path = Path("/proc/sys/fs/inotify/max_queued_events")
    original = int(limit_path.read_text())
    if is_root():
        # max_queued_events is read when an inotify instance is created: the
        # host-wide value is lowered only while the worker starts
        try:
            limit_path.write_text("64\n")
        except OSError as exc:
            unavailable(f"cannot lower fs.inotify.max_queued_events ({exc.strerror}):"
                        " /proc/sys is read-only here")
        try:
            proc = spool_env.start_worker()
        finally:
            limit_path.write_text(f"{original}\n")
        count = 400
    else:
        proc = spool_env.start_worker()
        count = original + 200
    client = spool_env.client()
    proc.send_signal(signal.SIGSTOP)
    try:
        ids = [client.submit("echo", {"n": n}) for n in range(count)]
    finally:
        proc.send_signal(signal.SIGCONT)
    for n, rid in enumerate(ids):
        assert client.wait(rid, timeout=300).result == {"n": n}
    assert "inotify_overflow" in proc.log_path.read_text()
    _spool_quiet(spool_env)


def test_sigterm_finishes_running_and_keeps_queued(spool_env: SpoolEnv) -> None:
    proc = spool_env.start_worker()
    client = spool_env.client()
    slow = [client.submit("sleep", {"seconds": 1.0, "tag": f"s{i}"}) for i in range(4)]
    wait_for(lambda: len([p for p in spool_env.spool.active.iterdir()
                          if p.name.endswith(".run")]) == 4, what="4 running")
    queued = [client.submit("echo", {"n": n}) for n in range(20)]
    assert spool_env.stop_worker(proc) == 0
    # what ran has its reply; nothing is stuck in active/
    assert set(_all_replies(spool_env)) >= set(slow)
    assert list(spool_env.spool.active.iterdir()) == []
    # everything else is still queued or answered: nothing lost
    answered = set(_all_replies(spool_env))
    still_queued = {p.name[: -len(".json")] for p in spool_env.spool.new.iterdir()}
    assert set(queued) <= answered | still_queued
    spool_env.start_worker()
    for rid in slow + queued:
        assert client.wait(rid, timeout=60).ok
    _spool_quiet(spool_env)


def test_second_worker_refuses(running: SpoolEnv) -> None:
    result = running.spoolops("worker", timeout=30)
    assert result.returncode == 2
    assert "another worker" in result.stderr and str(running.workers[0].pid) in result.stderr


def test_worker_memory_flat(running: SpoolEnv) -> None:
    """RSS after 1,000 and after 4,000 requests: no growth with requests served."""
    client = running.client()
    pid = running.workers[0].pid

    def rss_kb() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def burst(n: int) -> None:
        ids = [client.submit("echo", {"n": i, "pad": "x" * 200}) for i in range(n)]
        for rid in ids:
            client.wait(rid, timeout=120)

    burst(1000)
    first = rss_kb()
    burst(3000)
    second = rss_kb()
    assert second - first < 4096, f"worker RSS grew {second - first} kB over 3,000 requests"


def test_place_in_line_is_the_exact_mtime(spool_env: SpoolEnv) -> None:
    """A request's place in line is its mtime to the nanosecond, whether read
    ahead of the claim (peek) or by the claim: the worker keys requests put
    back for a busy target by the one and others by the other, and a float
    round trip moved mtimes by ~100 ns and let a later same-target request
    overtake an earlier one (seen as A0, A2, A1)."""
    client = spool_env.client()
    rid = client.submit("echo", {"x": 1})
    path = spool_env.spool.new / f"{rid}.json"
    mtime_ns = 1_764_345_600_123_456_789    # not a float's worth of precision
    assert int(mtime_ns / 1e9 * 1e9) != mtime_ns
    os.utime(path, ns=(mtime_ns, mtime_ns))
    assert spool_env.spool.peek(path.name).queued_ns == mtime_ns
    assert spool_env.spool.claim(path.name).queued_ns == mtime_ns
