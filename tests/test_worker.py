"""The worker, what is particular to the spool (inotify, the lock, mtimes,
its memory over thousands of requests); the end-to-end behaviour both
transports share is in test_e2e.py and contract/ (SIGTERM, a second
worker refused: contract/test_contract_lifecycle.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from support.env import SpoolEnv
from support.requires import is_root, unavailable


def _spool_quiet(env: SpoolEnv) -> None:
    assert list(env.spool.new.iterdir()) == []
    assert list(env.spool.active.iterdir()) == []


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
