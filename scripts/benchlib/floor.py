"""Baseline ``floor``: the least a filesystem spool can do in Python.

Client: write ``tmp/ID.json``, rename it into ``new/``, sleep on inotify
until ``replies/ID.json`` appears, read it, unlink it.  Server
(``python -m benchlib.floor ROOT DURABLE``): one bare inotify loop that
renames ``new/X`` to ``active/X``, writes the request's bytes back as the
reply through ``rtmp/X`` + rename into ``replies/``, unlinks ``active/X``.
No validation, no logging, no ordering, one thread.  With ``DURABLE=yes``
both sides fsync the file and the directory it is renamed into, as spoolops
does with ``durable = yes``.

Trusts: everything (that is the point of a floor).
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

DIRS = ("tmp", "new", "active", "rtmp", "replies")


def make_tree(root: Path) -> None:
    for name in DIRS:
        (root / name).mkdir(parents=True, exist_ok=True)


def _write(path: Path, data: bytes, durable: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def serve(root: Path, durable: bool) -> None:
    ino = INotify()
    ino.add_watch(root / "new", flags.MOVED_TO)
    print("ready", flush=True)

    def handle(name: str) -> None:
        try:
            os.rename(root / "new" / name, root / "active" / name)
        except FileNotFoundError:
            return
        with open(root / "active" / name, "rb") as f:
            data = f.read()
        _write(root / "rtmp" / name, data, durable)
        os.rename(root / "rtmp" / name, root / "replies" / name)
        if durable:
            _fsync_dir(root / "replies")
        os.unlink(root / "active" / name)

    for name in os.listdir(root / "new"):
        handle(name)
    while True:
        for event in ino.read():
            handle(event.name)


class FloorCaller:
    """The floor's client half (one process, one call at a time)."""

    def __init__(self, root: str, durable: bool) -> None:
        self.root = Path(root)
        self.durable = durable
        self.ino = INotify()
        self.ino.add_watch(self.root / "replies", flags.MOVED_TO)
        self.prefix = f"{os.getpid()}-"

    def call(self, op: str, args: dict[str, Any], timeout: float) -> bytes:
        import json
        name = self.prefix + secrets.token_hex(6) + ".json"
        _write(self.root / "tmp" / name, json.dumps({"op": op, "args": args}).encode(),
               self.durable)
        os.rename(self.root / "tmp" / name, self.root / "new" / name)
        if self.durable:
            _fsync_dir(self.root / "new")
        reply = self.root / "replies" / name
        while True:
            # the watch predates the request, so no event can be missed
            if any(ev.name == name for ev in self.ino.read(timeout=int(timeout * 1000))):
                break
        with open(reply, "rb") as f:
            data = f.read()
        os.unlink(reply)
        return data


if __name__ == "__main__":
    make_tree(Path(sys.argv[1]))
    serve(Path(sys.argv[1]), sys.argv[2] == "yes")
