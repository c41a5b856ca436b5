"""The systems under test, started once per bench run and shared by workloads.

spoolops twice (``durable = no`` and ``yes``, one worker each), the floor
twice (fsync off and on), the old HTTP server and the db-poll queue: each a
server process.  Client processes are made per measurement (``make_pool``)
and closed after it: every client process of a spool watches its
``replies/`` folder and is woken by every reply, so idle clients left
around would tax the system being measured (spoolops and floor alike).

Trusts: the bench's temporary folder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import floor
from .common import ClientPool, spawn, stop
from .tree import SpoolopsTree

MAX_CLIENTS = 8


class Systems:
    def __init__(self, base: Path, with_dbpoll: bool = True) -> None:
        self.base = base
        self.servers: list[subprocess.Popen] = []
        self.pools: dict[str, ClientPool] = {}      # shared 2-client pools (``shared``)
        self.targets: dict[str, tuple[str, str, bool]] = {}   # name -> kind, target, durable
        self.trees: dict[str, SpoolopsTree] = {}
        try:
            self._start(with_dbpoll)
        except BaseException:
            self.close()
            raise

    def _server(self, module: str, *args: str) -> str:
        proc = spawn(module, *args)
        self.servers.append(proc)
        line = proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"{module} server did not start")
        return line

    def _start(self, with_dbpoll: bool) -> None:
        for durable in (False, True):
            tag = "on" if durable else "off"
            # the durable tree runs the FITS workloads with the fast
            # layout; the default (single) layout is timed in-process (w_fits)
            tree = SpoolopsTree(self.base / f"spoolops-durable-{tag}", durable,
                                layout="streams" if durable else "single")
            tree.start_worker()
            self.trees[tag] = tree
            self.targets[f"spoolops/{tag}"] = ("spoolops", str(tree.config_path), durable)
            root = self.base / f"floor-durable-{tag}"
            floor.make_tree(root)
            self._server("floor", str(root), "yes" if durable else "no")
            self.targets[f"floor/{tag}"] = ("floor", str(root), durable)
        port = self._server("oldhttp")
        self.targets["old-http"] = ("http", f"127.0.0.1:{port}", False)
        if with_dbpoll:
            db = self.base / "dbpoll.sqlite"
            self._server("dbpoll", str(db))
            self.targets["db-poll"] = ("dbpoll", str(db), False)

    def make_pool(self, name: str, n: int) -> ClientPool:
        """``n`` fresh client processes of system ``name`` (the caller closes them)."""
        kind, target, durable = self.targets[name]
        return ClientPool(kind, target, n, durable)

    def shared(self, name: str) -> ClientPool:
        """Two client processes of ``name``, kept until ``close``."""
        if name not in self.pools:
            self.pools[name] = self.make_pool(name, 2)
        return self.pools[name]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        for tree in self.trees.values():
            tree.stop_worker()
        for proc in self.servers:
            stop(proc)
