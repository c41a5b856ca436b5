"""Execution order bookkeeping (pure: no I/O)."""

from __future__ import annotations

from spoolops.schedule import Backlog, TargetGate, request_key


def test_small_queue_is_taken_whole() -> None:
    backlog = Backlog()
    for name in ("a", "b", "c"):
        backlog.add(name)
    assert sorted(backlog.take(4, TargetGate())) == ["a", "b", "c"]
    assert len(backlog) == 0


def test_large_queue_in_key_order_skipping_busy_targets() -> None:
    backlog, gate = Backlog(), TargetGate()
    keys = {"low": (0, 5, "low"), "high": (9, 9, "high"), "old": (0, 1, "old"),
            "busy": (9, 1, "busy"), "same1": (1, 1, "same1"), "same2": (1, 2, "same2")}
    for name, (prio, mtime, rid) in keys.items():
        backlog.add(name)
        targets = ("T",) if name == "busy" else ("S",) if name.startswith("same") else ()
        backlog.set_key(name, request_key(prio, mtime, rid), targets)
    gate.acquire(("T",))
    # busy's target is in use: passed over, not lost; same1/same2 share S: one per batch
    assert backlog.take(3, gate) == ["high", "same1", "old"]
    assert "busy" in backlog and "same2" in backlog
    gate.release(("T",))
    assert backlog.take(2, gate) == ["busy", "same2"]


def test_sync_drops_vanished_and_adds_new() -> None:
    backlog = Backlog()
    backlog.add("gone")
    backlog.add("kept")
    backlog.sync(["kept", "fresh"])
    assert "gone" not in backlog and "kept" in backlog and "fresh" in backlog


def test_small_queue_passes_over_known_busy_targets() -> None:
    backlog, gate = Backlog(), TargetGate()
    backlog.add("fresh")                      # not read yet: taken, checked after the claim
    backlog.add("blocked")
    backlog.set_key("blocked", request_key(0, 1, "blocked"), ("T",))
    gate.acquire(("T",))
    assert backlog.take(4, gate) == ["fresh"]
    assert "blocked" in backlog
    gate.release(("T",))
    assert gate.is_free(("T",))
    assert backlog.take(4, gate) == ["blocked"]


def test_small_queue_one_per_target_best_key_first() -> None:
    backlog, gate = Backlog(), TargetGate()
    for name, prio in (("low", 0), ("high", 5)):
        backlog.add(name)
        backlog.set_key(name, request_key(prio, 1, name), ("T",))
    assert backlog.take(4, gate) == ["high"]
    assert backlog.take(4, gate) == ["low"]
