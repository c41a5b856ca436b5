"""Queue COUNT echo requests without waiting: ``python -m benchlib.submitter CONFIG COUNT``.

Uses the real ``spoolops.Client.submit``; prints the seconds it took.
Trusts: the config it is given.
"""

from __future__ import annotations

import sys
import time

from spoolops import Client


def main(argv: list[str]) -> int:
    client = Client(config=argv[0])
    count = int(argv[1])
    start = time.perf_counter()
    for i in range(count):
        client.submit("echo", {"i": i})
    print(time.perf_counter() - start, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
