"""The room cache: what it keeps of a branch, what it knows of sent messages, and when
it stays current."""

from __future__ import annotations

from gateway.roomstate import RoomCache, RoomLocks, trimmed
from gateway.store.models import Message, Room


def message(id: str, content: str = "hi", client_id: str | None = None) -> Message:
    return Message(id=id, room_id="room_1", role="user", content=content, client_id=client_id)


def test_trimming_keeps_the_newest_within_the_budget_and_at_least_two() -> None:
    branch = [message(f"m{i}", "x" * 400) for i in range(5)]  # 104 tokens each

    assert [m.id for m in trimmed(branch, 250)] == ["m3", "m4"]
    assert [m.id for m in trimmed(branch, 10)] == ["m3", "m4"]
    assert trimmed(branch, 10_000) == branch


def test_a_sent_message_is_known_by_its_client_id_until_trimmed_away() -> None:
    cache = RoomCache(default_context_tokens=250)
    state = cache.remember(Room(id="room_1"), [message("m1", "x" * 400, "c1")], version=3)
    assert state.sent("c1") is not None and state.sent("c2") is None

    state.extend(message("m2", "x" * 400, "c2"), message("m3", "x" * 400))

    assert [m.id for m in state.branch] == ["m2", "m3"]
    assert state.sent("c1") is None  # a miss proves nothing: the database decides
    assert state.sent("c2") is not None and state.sent("c2").id == "m2"


def test_an_answer_ending_keeps_the_state_current_only_if_it_was_just_before() -> None:
    cache = RoomCache(default_context_tokens=1000)
    answer = Message(id="a1", room_id="room_1", role="assistant", content="", status="streaming")
    cache.remember(Room(id="room_1"), [message("m1"), answer], version=4)

    cache.answer_ended("room_1", "a1", {"content": "done", "status": "complete"}, version=5)
    state = cache.get("room_1")
    assert state is not None
    assert (answer.content, answer.status, state.version) == ("done", "complete", 5)

    # Another change began in between (say, on another process): read it again.
    cache.answer_ended("room_1", "a1", {"status": "complete"}, version=7)
    assert state.version == 5


def test_the_least_recently_used_room_is_dropped_first() -> None:
    cache = RoomCache(default_context_tokens=1000, size=2)
    for room_id in ("r1", "r2"):
        cache.remember(Room(id=room_id), [], version=0)
    cache.get("r1")
    cache.remember(Room(id="r3"), [], version=0)

    assert cache.get("r2") is None
    assert cache.get("r1") is not None and cache.get("r3") is not None


def test_a_room_has_one_lock_while_it_is_in_use() -> None:
    locks = RoomLocks()
    lock = locks("room_1")

    assert locks("room_1") is lock
    assert locks("room_2") is not lock
