"""Waits with a deadline: for a condition, for a worker's log line, for a
child's next output line.  A wait polls; it never stands in for an event
with a sleep of a guessed length."""

from __future__ import annotations

import queue
import subprocess
import threading
import time


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition"):
    """``predicate()``'s first true value, polled until ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)   # poll interval of a wait with a deadline, not a stand-in
    raise AssertionError(f"timed out waiting for {what}")


def wait_log(proc: subprocess.Popen, text: str, timeout: float = 60) -> str:
    """Wait until a worker's log (``proc.log_path``) holds ``text``; returns
    the log.  Fails at once if the worker exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = proc.log_path.read_text(errors="replace")  # type: ignore[attr-defined]
        if text in content:
            return content
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}: {content}")
        time.sleep(0.02)   # poll interval of a wait with a deadline (a log line)
    raise AssertionError(f"no {text!r} in the worker log within {timeout} s")


class Lines:
    """The lines a child process prints, read by a thread, waited for with a
    deadline (select() on a buffered pipe misses lines already buffered)."""

    def __init__(self, stream) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def next(self, until: float) -> str | None:
        """The next line, or None if none comes before ``until`` (monotonic)."""
        try:
            return self._queue.get(timeout=max(0.0, until - time.monotonic()))
        except queue.Empty:
            return None
