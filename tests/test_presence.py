"""Who a connection is, and this process's people and typing: the rules, without
sockets (a real in-memory event bus and hub; a clock the test moves)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.access import OPEN, Viewer
from gateway.broker.memory import MemoryEventBus
from gateway.errors import BadRequest
from gateway.eventlog import EventLogs
from gateway.hub import Event, RoomHub, Subscriber
from gateway.people import Person, identify
from gateway.presence import TYPING_EVERY, Presence

ALICE = Person("u-alice", "Alice")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def bus() -> MemoryEventBus:
    bus = MemoryEventBus(EventLogs(64, 300))
    await bus.start(RoomHub())
    return bus


def watch(bus: MemoryEventBus, room_id: str = "room_1") -> Subscriber:
    assert bus._hub is not None
    subscriber = bus._hub.subscribe(room_id)
    subscriber.begin([], 0)
    return subscriber


def frames(subscriber: Subscriber) -> list[dict[str, Any]]:
    return [item.frame for item in subscriber.take() if isinstance(item, Event)]


# ----------------------------------------------------------------------- identify


def test_with_keys_the_key_names_the_person_whatever_the_query_says() -> None:
    viewer = Viewer("alice", enforced=True)
    assert identify(viewer, {"user": "bob", "name": "Al"}) == Person("alice", "Al")
    assert identify(viewer, {}) == Person("alice", "alice")


def test_without_keys_a_chosen_id_or_a_guest_per_connection() -> None:
    assert identify(OPEN, {"user": "a.b_c-1", "name": " Alice "}) == Person("a.b_c-1", "Alice")
    assert identify(OPEN, {"user": "u1"}) == Person("u1", "u1")
    first, second = identify(OPEN, {}), identify(OPEN, {"name": ""})
    assert first.id.startswith("guest-") and first.name == first.id
    assert first.id != second.id


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ({"name": "   "}, "invalid_name"),
        ({"name": "x" * 65}, "invalid_name"),
        ({"name": "tab\there"}, "invalid_name"),
        ({"name": "\u202eevil"}, "invalid_name"),  # right-to-left override
        ({"user": "has space"}, "invalid_user"),
        ({"user": "ü"}, "invalid_user"),
        ({"user": "x" * 65}, "invalid_user"),
    ],
)
def test_bad_names_and_ids_are_refused_with_their_code(query: dict[str, str], code: str) -> None:
    with pytest.raises(BadRequest) as refused:
        identify(OPEN, query)
    assert refused.value.code == code


def test_names_may_hold_any_script_and_emoji_sequences() -> None:
    for name in ("Zoë", "山田太郎", "👩\u200d💻 dev"):
        assert identify(OPEN, {"name": name}).name == name


# ----------------------------------------------------------------------- presence


def changes(subscriber: Subscriber) -> list[tuple[list[str], list[str]]]:
    """(joined, left) names of each ``presence`` event delivered."""
    return [
        ([p["name"] for p in f["joined"]], [p["name"] for p in f["left"]])
        for f in frames(subscriber)
    ]


async def test_a_person_is_in_from_their_first_connection_to_their_last(
    bus: MemoryEventBus,
) -> None:
    presence, room = Presence(bus, announce_every=3600), watch(bus)
    assert presence.arrive("room_1", ALICE) is True
    assert presence.arrive("room_1", ALICE) is False  # a second tab
    assert (await bus.position("room_1")).members == [ALICE.view()]  # at once
    presence.depart("room_1", ALICE)
    assert (await bus.position("room_1")).members == [ALICE.view()]
    presence.announce()
    (joined,) = frames(room)
    assert joined["joined"] == [ALICE.view()] and "event_id" in joined  # logged
    presence.depart("room_1", ALICE)
    assert (await bus.position("room_1")).members == []
    presence.announce()
    assert changes(room) == [([], ["Alice"])]


async def test_comings_and_goings_are_announced_together_a_moment_later(
    bus: MemoryEventBus,
) -> None:
    presence, room = Presence(bus, announce_every=0.05), watch(bus)
    bob = Person("u-bob", "Bob")
    presence.arrive("room_1", ALICE)
    presence.arrive("room_1", bob)
    presence.arrive("room_2", bob)
    assert frames(room) == []
    await asyncio.sleep(0.1)
    assert changes(room) == [(["Alice", "Bob"], [])]
    presence.depart("room_1", bob)  # a reload: gone and back before the announcement
    presence.arrive("room_1", bob)
    presence.depart("room_1", ALICE)
    await asyncio.sleep(0.1)
    assert changes(room) == [(["Bob"], ["Alice"])]


async def test_a_new_name_is_announced_as_joined_again_and_kept_for_the_leave(
    bus: MemoryEventBus,
) -> None:
    presence, room = Presence(bus, announce_every=3600), watch(bus)
    presence.arrive("room_1", ALICE)
    presence.announce()
    renamed = Person(ALICE.id, "Alice B.")
    presence.rename("room_1", renamed)
    presence.rename("room_1", renamed)  # no change
    presence.announce()
    presence.depart("room_1", ALICE)  # the connection still holds the old Person
    presence.announce()
    assert changes(room) == [(["Alice"], []), (["Alice B."], []), ([], ["Alice B."])]


async def test_typing_is_announced_once_per_interval_and_a_stop_only_after_a_start(
    bus: MemoryEventBus,
) -> None:
    clock = Clock()
    presence, room = Presence(bus, clock), watch(bus)
    before = (await bus.position("room_1")).last_event_id
    assert presence.typing("room_1", ALICE, active=False) is False
    assert presence.typing("room_1", ALICE) is True
    clock.now += TYPING_EVERY - 0.1
    assert presence.typing("room_1", ALICE) is False
    clock.now += 0.2
    assert presence.typing("room_1", ALICE) is True
    assert presence.typing("room_1", ALICE, active=False) is True
    assert presence.typing("room_1", ALICE) is True  # a stop resets the interval
    clock.now += 10  # the last start has expired on every client: no stop needed
    assert presence.typing("room_1", ALICE, active=False) is False
    sent = frames(room)
    assert [f["active"] for f in sent] == [True, True, False, True]
    assert all("event_id" not in f for f in sent)  # signals: never numbered, never logged
    assert (await bus.position("room_1")).last_event_id == before


async def test_sending_ends_typing_without_a_word(bus: MemoryEventBus) -> None:
    presence, room = Presence(bus, Clock()), watch(bus)
    presence.typing("room_1", ALICE)
    presence.sent("room_1", ALICE)
    assert presence.typing("room_1", ALICE, active=False) is False
    assert presence.typing("room_1", ALICE) is True  # a new start at once
    assert len(frames(room)) == 2
