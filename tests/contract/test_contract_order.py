"""Contract: the order in which requests come out, as the worker's schedule
sees it.

The worker keys each queued entry from what ``peek`` (and ``claim``) tell of
it: ``schedule.request_key(priority, queued_ns, id)`` -- priority from the
request itself (``Dispatcher.parse``), ``queued_ns`` and id from the
transport (``Claimed``) -- and starts the best keys first
(``schedule.Backlog.take``).  A transport's promise is therefore: ``scan``
names every queued entry, ``peek`` and ``claim`` agree on each one's id and
place in line, and that place is its queued time.  (The order of ``scan``'s
list itself is promised only when ``scan_limit`` cuts it: the best first.)

Runs on every transport (the ``queue`` fixture).
"""

from __future__ import annotations

from support.contract import Handles, make_request

from spoolops.dispatch import Dispatcher
from spoolops.ops import Registry
from spoolops.schedule import Backlog, TargetGate, request_key
from spoolops.transport.base import Claimed

# (id, priority, queued time): out of order on purpose, with ties to break
REQUESTS = [
    ("ord-e", 0, 1_000_000_300),
    ("ord-b", 5, 1_000_000_200),
    ("ord-f", -3, 1_000_000_100),
    ("ord-a", 5, 1_000_000_200),     # ties with ord-b: the id decides
    ("ord-d", 0, 1_000_000_100),
    ("ord-c", 5, 1_000_000_400),
]
EXPECTED = ["ord-a", "ord-b", "ord-c", "ord-d", "ord-e", "ord-f"]


def test_order_is_priority_then_queued_time_then_id(queue, request) -> None:
    h = Handles(queue, request)
    worker = h.worker()
    for rid, priority, when in REQUESTS:
        h.publish(make_request(rid, priority=priority))
        queue.set_queued_time(rid, when)
    dispatcher = Dispatcher(Registry(), queue.config, worker.work_dir)

    names = worker.scan()
    assert len(names) == len(REQUESTS)
    keys = {}
    for name in names:
        seen = worker.peek(name)
        assert isinstance(seen, Claimed) and seen.entry == name
        parsed = dispatcher.parse(seen.data, seen.rid, seen.user, seen.queued_ns / 1e9)
        keys[name] = request_key(parsed.priority, seen.queued_ns, seen.rid)
    # the place in line is the queued time, to the second set here
    assert sorted(k[1] // 10**9 for k in keys.values()) == sorted(w for _, _, w in REQUESTS)
    by_key = sorted(names, key=keys.__getitem__)
    assert [keys[n][2] for n in by_key] == EXPECTED

    # the worker's schedule takes the best first, two at a time
    line = Backlog()
    line.sync(names)
    for name, key in keys.items():
        line.set_key(name, key, ())
    taken = []
    while len(line):
        batch = line.take(2, TargetGate())
        got = worker.claim_all(batch)
        # claim agrees with peek: same id, same place
        assert [(c.rid, c.queued_ns) for c in got] == [(keys[n][2], keys[n][1]) for n in batch]
        taken += [c.rid for c in got]
    assert taken == EXPECTED


def test_scan_limit_keeps_the_best(queue, request) -> None:
    """Where ``scan`` is cut at ``scan_limit`` the best entries come first;
    where it is not, every queued entry is named (each exactly once)."""
    h = Handles(queue, request)
    worker = h.worker()
    for rid, priority, when in REQUESTS:
        h.publish(make_request(rid, priority=priority))
        queue.set_queued_time(rid, when)
    names = worker.scan()
    ids = [worker.peek(n).rid for n in names]
    assert sorted(ids) == EXPECTED and len(set(names)) == len(names)
    if worker.scan_limit is not None:
        assert ids == EXPECTED
