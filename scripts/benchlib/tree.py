"""A real spoolops tree and worker for the bench (nothing borrowed from tests/).

``SpoolopsTree`` writes a config file, builds the tree with
``spoolops.admin.init_tree`` and runs ``python -m spoolops worker`` as a
separate process, logging to a file as a deployment would.

Trusts: the directory it is given (the bench's own temporary folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spoolops.admin import init_tree, resolve_accounts
from spoolops.config import load_config
from spoolops.transport.worklock import worker_alive

from .common import child_env


class SpoolopsTree:
    def __init__(self, base: Path, durable: bool, concurrency: int = 4,
                 extra: str = "", layout: str = "single") -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.config_path = base / "spoolops.conf"
        self.config_path.write_text("\n".join([
            "[spool]", "root = spool", f"durable = {'yes' if durable else 'no'}", "",
            "[worker]", f"concurrency = {concurrency}", "rescan_interval = 60s",
            f"log = {base / 'worker.log'}", "",
            "[storage]", "storage_root = storage", "upload_staging_dir = staging",
            f"compressed_layout = {layout}", "",
            extra, ""]))
        self.config = load_config(self.config_path)
        init_tree(self.config, resolve_accounts(self.config))
        self.root = self.config.root
        self.storage = self.config.storage_root
        self.worker: subprocess.Popen | None = None

    def start_worker(self, *args: str, wait: bool = True) -> subprocess.Popen:
        stats = self.root / "work" / "stats.json"
        if stats.exists():
            stats.unlink()
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "spoolops", "worker", "--config", str(self.config_path),
             *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            env=child_env())
        if wait:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                alive, pid = worker_alive(self.root / "work" / "worker.lock")
                if alive and pid == self.worker.pid and stats.exists():
                    return self.worker
                if self.worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.worker.returncode}")
                time.sleep(0.02)
            raise RuntimeError("worker did not come up")
        return self.worker

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)
            self.worker.wait(120)
        self.worker = None

    def count(self, folder: str) -> int:
        with os.scandir(self.root / folder) as it:
            return sum(1 for _ in it)
