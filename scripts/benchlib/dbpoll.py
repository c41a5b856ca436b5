"""Baseline ``db-poll``: a database queue polled once a second.

An sqlite3 table (WAL mode) stands in for the database.  The worker
(``python -m benchlib.dbpoll DBFILE``) takes every queued row once a second;
a client inserts a row, then looks for its result once a second, as the
FitsStorage clients of the database queue did.

Trusts: its clients and the database file.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from typing import Any

POLL_S = 1.0
SCHEMA = ("CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY, op TEXT, args TEXT,"
          " state TEXT DEFAULT 'new', result TEXT)")


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(SCHEMA)
    return db


def serve(path: str) -> None:
    db = connect(path)
    print("ready", flush=True)
    while True:
        rows = db.execute("SELECT id, op, args FROM queue WHERE state = 'new'").fetchall()
        for rid, op, args in rows:
            result = args if op == "echo" else json.dumps(None)
            db.execute("UPDATE queue SET state = 'done', result = ? WHERE id = ?",
                       (result, rid))
        time.sleep(POLL_S)


class DbPollCaller:
    def __init__(self, path: str) -> None:
        self.db = connect(path)

    def call(self, op: str, args: dict[str, Any], timeout: float) -> Any:
        cur = self.db.execute("INSERT INTO queue (op, args) VALUES (?, ?)",
                              (op, json.dumps(args)))
        rid = cur.lastrowid
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            time.sleep(POLL_S)
            row = self.db.execute("SELECT result FROM queue WHERE id = ? AND state = 'done'",
                                  (rid,)).fetchone()
            if row is not None:
                self.db.execute("DELETE FROM queue WHERE id = ?", (rid,))
                return json.loads(row[0])
        raise TimeoutError(f"no result for {rid}")


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
