"""The per-room event log, on its own: ids, replay, and its bounds."""

from __future__ import annotations

from gateway.eventlog import EventLogs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(max_events: int = 100, max_age: float = 60.0, base: int = 1000) -> tuple:
    clock = Clock()
    bases = iter(range(base, 10**9, 1000))
    return EventLogs[str](max_events, max_age, clock=clock, id_base=lambda: next(bases)), clock


def test_ids_increase_by_one_per_room_from_the_log_base() -> None:
    logs, _ = make()
    assert logs.last_id("a") == 1000
    assert [logs.append("a", x) for x in "xyz"] == [1001, 1002, 1003]
    assert logs.append("b", "other") == 2001  # another room, its own log
    assert logs.last_id("a") == 1003


def test_since_replays_everything_after_an_id_it_still_holds() -> None:
    logs, _ = make()
    for x in "abcde":
        logs.append("r", x)
    assert logs.since("r", 1000) == list("abcde")
    assert logs.since("r", 1003) == ["d", "e"]
    assert logs.since("r", 1005) == []


def test_since_refuses_what_it_cannot_replay_completely() -> None:
    logs, _ = make(max_events=3)
    for x in "abcde":
        logs.append("r", x)  # keeps c, d, e (ids 1003..1005)
    assert logs.since("r", 1002) == ["c", "d", "e"]
    assert logs.since("r", 1001) is None  # b is gone
    assert logs.since("r", 999) is None  # before this log
    assert logs.since("r", 1006) is None  # never given out
    assert logs.since("unknown", 5) is None


def test_old_events_expire_and_idle_logs_are_dropped_without_reusing_ids() -> None:
    logs, clock = make(max_age=10)
    logs.append("r", "old")
    clock.now = 5
    logs.append("r", "new")
    clock.now = 12
    assert logs.since("r", 1000) is None  # "old" expired
    assert logs.since("r", 1001) == ["new"]
    assert logs.prune() == 0  # touched at 12
    clock.now = 30
    assert logs.prune() == 1
    assert len(logs) == 0
    # A new log for the room starts above every id the old one gave out.
    assert logs.append("r", "again") > 1002
    assert logs.since("r", 1002) is None


def test_drop_forgets_a_room() -> None:
    logs, _ = make()
    logs.append("r", "x")
    logs.drop("r")
    assert logs.since("r", 1001) is None
    assert logs.append("r", "y") == 2001
