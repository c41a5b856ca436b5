"""Small shared helpers: percentiles, the machine description, processes.

Trusts: the bench's own temporary trees and child processes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0-100) of ``values``."""
    if not values:
        return float("nan")
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50.0)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """What the figures came from: cores, CPU, memory, kernel, filesystem."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cores": os.cpu_count(), "cpu": model, "mem_gb": round(mem_gb, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "host": platform.node()}


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mnt = fields[1]
            if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    except (OSError, IndexError):
        pass
    return kind


def child_env(**extra: str) -> dict[str, str]:
    """The environment for bench child processes: ``benchlib`` importable."""
    env = dict(os.environ)
    parts = [str(SCRIPTS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.update(extra)
    return env


def spawn(module: str, *args: str, stdin: Any = subprocess.DEVNULL,
          stdout: Any = subprocess.PIPE, **env: str) -> subprocess.Popen:
    """``python -m benchlib.MODULE ARGS`` as a child process (text pipes)."""
    return subprocess.Popen([sys.executable, "-m", f"benchlib.{module}", *args],
                            stdin=stdin, stdout=stdout, stderr=None, text=True,
                            env=child_env(**env), bufsize=1)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate one child we started, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


class ClientPool:
    """``n`` persistent client processes of one kind (``clientproc``).

    Each reads one JSON command per line and answers with one JSON line, so a
    run of ``k`` concurrent clients is: send to the first ``k``, then read
    from each (they run at the same time; we just collect).
    """

    def __init__(self, kind: str, target: str, n: int, durable: bool = False) -> None:
        self.kind = kind
        self.procs = [spawn("clientproc", kind, target, "yes" if durable else "no",
                            stdin=subprocess.PIPE) for _ in range(n)]
        for proc in self.procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"{kind} client did not start: {line!r}")

    def send(self, i: int, cmd: dict[str, Any]) -> None:
        self.procs[i].stdin.write(json.dumps(cmd) + "\n")
        self.procs[i].stdin.flush()

    def recv(self, i: int) -> dict[str, Any]:
        line = self.procs[i].stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} client {i} died")
        return json.loads(line)

    def run_one(self, i: int, cmd: dict[str, Any]) -> dict[str, Any]:
        self.send(i, cmd)
        return self.recv(i)

    def run(self, k: int, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        for i in range(k):
            self.send(i, cmd)
        return [self.recv(i) for i in range(k)]

    def close(self) -> None:
        for proc in self.procs:
            try:
                proc.stdin.write('{"cmd": "quit"}\n')
                proc.stdin.flush()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                stop(proc)
