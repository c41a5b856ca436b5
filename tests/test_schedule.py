"""Execution order bookkeeping (pure: no I/O)."""

from __future__ import annotations

from spoolops.schedule import Queue, TargetGate, request_key


def test_small_queue_is_taken_whole() -> None:
    queue = Queue()
    for name in ("a", "b", "c"):
        queue.add(name)
    assert sorted(queue.take(4, TargetGate())) == ["a", "b", "c"]
    assert len(queue) == 0


def test_large_queue_in_key_order_skipping_busy_targets() -> None:
    queue, gate = Queue(), TargetGate()
    keys = {"low": (0, 5, "low"), "high": (9, 9, "high"), "old": (0, 1, "old"),
            "busy": (9, 1, "busy"), "same1": (1, 1, "same1"), "same2": (1, 2, "same2")}
    for name, (prio, mtime, rid) in keys.items():
        queue.add(name)
        targets = ("T",) if name == "busy" else ("S",) if name.startswith("same") else ()
        queue.set_key(name, request_key(prio, mtime, rid), targets)
    gate.acquire(("T",))
    # busy's target is in use: passed over, not lost; same1/same2 share S: one per batch
    assert queue.take(3, gate) == ["high", "same1", "old"]
    assert "busy" in queue and "same2" in queue
    gate.release(("T",))
    assert queue.take(2, gate) == ["busy", "same2"]


def test_sync_drops_vanished_and_adds_new() -> None:
    queue = Queue()
    queue.add("gone")
    queue.add("kept")
    queue.sync(["kept", "fresh"])
    assert "gone" not in queue and "kept" in queue and "fresh" in queue


def test_small_queue_passes_over_known_busy_targets() -> None:
    queue, gate = Queue(), TargetGate()
    queue.add("fresh")                      # not read yet: taken, checked after the claim
    queue.add("blocked")
    queue.set_key("blocked", request_key(0, 1, "blocked"), ("T",))
    gate.acquire(("T",))
    assert queue.take(4, gate) == ["fresh"]
    assert "blocked" in queue
    gate.release(("T",))
    assert gate.is_free(("T",))
    assert queue.take(4, gate) == ["blocked"]


def test_small_queue_one_per_target_best_key_first() -> None:
    queue, gate = Queue(), TargetGate()
    for name, prio in (("low", 0), ("high", 5)):
        queue.add(name)
        queue.set_key(name, request_key(prio, 1, name), ("T",))
    assert queue.take(4, gate) == ["high"]
    assert queue.take(4, gate) == ["low"]
