"""What every broker guarantees: one contract, run over the memory and the Redis pair.

Each test reads as a specification of :class:`~gateway.broker.base.EventBus` or
:class:`~gateway.broker.base.RoomLeases`. A "process" here is a bus and leases pair
with its own hub and stop handler: on Redis, two of them share one key prefix (fresh
for each test) with different process ids, as two gateway processes do; the memory
broker serves one process, and the tests that need two say so where they run.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway import protocol
from gateway.broker.base import EventBus, RoomLeases
from gateway.eventlog import EventLogs
from gateway.hub import Event, RoomHub, Subscriber
from tests.conftest import TEST_REDIS_URL, scaled

LOG_SIZE = 8
"""Events each room's log keeps: small, so that a replay can be too old."""

LEASE_SECONDS = 0.3
"""Short, so that an orphan is found quickly."""


@dataclass
class Process:
    """One gateway process's broker: its bus, its leases, and what reached it."""

    bus: EventBus
    leases: RoomLeases
    hub: RoomHub = field(default_factory=RoomHub)
    stops: list[tuple[str, str, str]] = field(default_factory=list)

    async def start(self) -> Process:
        await self.bus.start(self.hub)
        await self.leases.start(
            lambda room, generation, why: self.stops.append((room, generation, why))
        )
        return self

    async def close(self) -> None:
        await self.leases.aclose()
        await self.bus.aclose()

    def join(self, room_id: str) -> Subscriber:
        """A subscriber receiving every event of the room from now on."""
        subscriber = self.hub.subscribe(room_id)
        subscriber.begin([], 0)
        return subscriber


Spawn = Callable[[], Awaitable[Process]]


@pytest.fixture(
    params=[
        "memory",
        pytest.param(
            "redis",
            marks=pytest.mark.skipif(
                TEST_REDIS_URL is None,
                reason="the Redis broker's contract needs TEST_REDIS_URL=redis://127.0.0.1:6379/0",
            ),
        ),
    ]
)
async def spawn(request: pytest.FixtureRequest) -> AsyncIterator[Spawn]:
    """Start a broker process; on Redis, each call is another process on the same
    prefix. The memory broker has one process: a second call skips the test."""
    started: list[Process] = []
    if request.param == "memory":
        from gateway.broker.memory import MemoryEventBus, MemoryRoomLeases

        async def spawn_memory() -> Process:
            if started:
                pytest.skip("the memory broker serves one process: nothing to share with another")
            bus = MemoryEventBus(EventLogs(LOG_SIZE, 300))
            started.append(await Process(bus, MemoryRoomLeases(bus)).start())
            return started[-1]

        yield spawn_memory
    else:
        import redis.asyncio

        from gateway.broker.redis import RedisBackend, RedisEventBus, RedisRoomLeases

        client = redis.asyncio.Redis.from_url(str(TEST_REDIS_URL))
        prefix = f"gw-contract-{os.urandom(6).hex()}"

        async def spawn_redis() -> Process:
            backend = RedisBackend(
                client, prefix=prefix, log_size=LOG_SIZE, process=f"p{len(started) + 1}"
            )
            leases = RedisRoomLeases(backend, lease_seconds=LEASE_SECONDS)
            bus = RedisEventBus(backend, presence_seconds=LEASE_SECONDS)
            started.append(await Process(bus, leases).start())
            return started[-1]

        yield spawn_redis
        for process in started:
            await process.close()
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        return
    for process in started:
        await process.close()


async def received(subscriber: Subscriber, count: int) -> list[dict[str, Any]]:
    """The next ``count`` frames delivered to ``subscriber`` (merged tokens apart)."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(scaled(5)):
        while len(frames) < count:
            for item in await subscriber.next_batch():
                frames.extend(item.frames if not isinstance(item, Event) else [item.frame])
    return frames


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait for ``check``: what another process (or the Redis publisher) does lands a
    little later."""
    deadline = time.monotonic() + scaled(timeout)
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def event(n: int) -> dict[str, Any]:
    return {"type": "message", "message": {"id": f"msg_{n}", "content": f"hello {n}"}}


def start(generation_id: str = "gen_1") -> dict[str, Any]:
    return protocol.start_frame(
        generation_id, {"id": "msg_answer", "parent_id": "msg_question", "content": ""}
    )


def done(generation_id: str = "gen_1") -> dict[str, Any]:
    return protocol.done_frame(generation_id, {"id": "msg_answer"}, "stop", None)


# ------------------------------------------------------------------------ event bus


async def test_published_events_get_increasing_ids_and_reach_the_hub_in_order(
    spawn: Spawn,
) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    first = (await a.bus.position("room_1")).last_event_id
    for n in range(5):
        a.bus.publish("room_1", event(n))
    frames = await received(member, 5)
    assert [f["message"]["id"] for f in frames] == [f"msg_{n}" for n in range(5)]
    assert [f["event_id"] for f in frames] == list(range(first + 1, first + 6))


async def test_events_published_on_two_processes_reach_both_in_one_order(spawn: Spawn) -> None:
    a, b = await spawn(), await spawn()
    for process in (a, b):
        await process.bus.listen("room_1")
    on_a, on_b = a.join("room_1"), b.join("room_1")
    for n in range(6):
        (a if n % 2 else b).bus.publish("room_1", event(n))
    seen_a, seen_b = await received(on_a, 6), await received(on_b, 6)
    assert seen_a == seen_b
    ids = [f["event_id"] for f in seen_a]
    assert ids == list(range(ids[0], ids[0] + 6))
    assert sorted(f["message"]["id"] for f in seen_a) == [f"msg_{n}" for n in range(6)]


async def test_replay_gives_exactly_the_events_after_an_id_or_none(spawn: Spawn) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    for n in range(5):
        a.bus.publish("room_1", event(n))
    ids = [f["event_id"] for f in await received(member, 5)]

    missed = await a.bus.replay("room_1", ids[1])
    assert missed is not None
    assert [e.event_id for e in missed] == ids[2:]
    assert [e.frame["message"]["id"] for e in missed] == ["msg_2", "msg_3", "msg_4"]
    assert await a.bus.replay("room_1", ids[-1]) == []  # up to date: nothing missed
    assert await a.bus.replay("room_1", ids[-1] + 1) is None  # an id never given out
    assert await a.bus.replay("room_unknown", ids[-1]) is None


async def test_replay_after_an_id_the_log_no_longer_holds_is_none_never_a_part(
    spawn: Spawn,
) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    for n in range(LOG_SIZE + 3):
        a.bus.publish("room_1", event(n))
    ids = [f["event_id"] for f in await received(member, LOG_SIZE + 3)]
    assert await a.bus.replay("room_1", ids[0]) is None
    kept = await a.bus.replay("room_1", ids[-LOG_SIZE - 1])
    assert kept is not None and [e.event_id for e in kept] == ids[-LOG_SIZE:]


async def test_position_follows_the_live_answer_with_the_newest_event_id(spawn: Spawn) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    assert (await a.bus.position("room_1")).live is None

    a.bus.publish("room_1", start("gen_1"))
    a.bus.publish("room_1", protocol.token_frame("gen_1", 1, "Hel"))
    a.bus.publish("room_1", protocol.token_frame("gen_1", 2, "lo"))
    a.bus.publish("room_1", protocol.token_frame("gen_other", 9, "stale"))  # not the live one
    newest = (await received(member, 4))[-1]["event_id"]
    position = await a.bus.position("room_1")
    assert position.last_event_id == newest
    assert position.live == {
        "generation_id": "gen_1",
        "message_id": "msg_answer",
        "seq": 2,
        "text": "Hello",
    }

    a.bus.publish("room_1", done("gen_other"))  # another generation's end changes nothing
    a.bus.publish("room_1", done("gen_1"))
    newest = (await received(member, 2))[-1]["event_id"]
    position = await a.bus.position("room_1")
    assert (position.last_event_id, position.live) == (newest, None)


async def test_the_live_answer_is_the_same_from_another_process(spawn: Spawn) -> None:
    a, b = await spawn(), await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    a.bus.publish("room_1", start("gen_1"))
    a.bus.publish("room_1", protocol.token_frame("gen_1", 1, "Hi"))
    await received(member, 2)
    assert await b.bus.position("room_1") == await a.bus.position("room_1")


async def test_changing_brackets_a_change_until_its_events_are_published(
    spawn: Spawn,
) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    before = await a.bus.changes("room_1")
    async with a.bus.changing("room_1") as count:
        during = await a.bus.changes("room_1")
        a.bus.publish("room_1", event(1))
    await received(member, 1)

    async def ended() -> bool:
        position = await a.bus.position("room_1")
        return (
            (position.begun, position.ended)
            == await a.bus.changes("room_1")
            == (
                count,
                count,
            )
        )

    if a.bus.name == "memory":
        # One process: the chat service's room lock orders changes and snapshots, so
        # there is nothing to count; the bracket is there, and counts nothing.
        assert before == during == (0, 0) and count == 0
    else:
        assert during == (before[0] + 1, before[1]) and count == before[0] + 1
    await eventually(ended)  # the end goes out after the change's events
    claimed = await a.leases.claim("room_1", "gen_1")
    assert claimed == count  # a claim tells the change count it saw


async def test_a_change_under_way_is_seen_by_another_process(spawn: Spawn) -> None:
    a, b = await spawn(), await spawn()
    async with a.bus.changing("room_1") as count:
        begun, ended = await b.bus.changes("room_1")
        assert begun == count and ended == count - 1


async def test_close_room_ends_every_subscription_and_forgets_the_room(spawn: Spawn) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    a.bus.publish("room_1", start("gen_1"))
    last = (await received(member, 1))[-1]["event_id"]
    final = {"type": "error", "code": "room_deleted"}
    await a.bus.close_room("room_1", final)

    async def closed() -> bool:
        return member.closed_with == final

    await eventually(closed)
    assert await a.bus.replay("room_1", last) is None
    assert (await a.bus.position("room_1")).live is None
    assert "room_1" not in await a.leases.generating()


async def test_close_room_reaches_the_members_on_another_process(spawn: Spawn) -> None:
    a, b = await spawn(), await spawn()
    await b.bus.listen("room_1")
    member = b.join("room_1")
    await a.bus.close_room("room_1", {"type": "error", "code": "room_deleted"})

    async def closed() -> bool:
        return member.closed_with is not None

    await eventually(closed)


# ------------------------------------------------------------------------- presence

ALICE = {"id": "u-alice", "name": "Alice"}
BOB = {"id": "u-bob", "name": "Bob"}


async def members(process: Process, room_id: str) -> list[dict[str, str]]:
    return sorted((await process.bus.position(room_id)).members, key=lambda m: m["id"])


async def test_who_came_and_went_is_announced_as_they_are_now_in_one_logged_event(
    spawn: Spawn,
) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    a.bus.enter("room_1", ALICE)
    a.bus.enter("room_1", BOB)
    a.bus.announce("room_1")
    (first,) = await received(member, 1)
    assert first["type"] == "presence" and "event_id" in first
    assert sorted(p["id"] for p in first["joined"]) == ["u-alice", "u-bob"]
    assert first["left"] == []

    a.bus.enter("room_1", ALICE)  # already in, same name: nothing to say
    a.bus.enter("room_1", {**ALICE, "name": "Alice B."})  # a new name: joined again
    a.bus.exit("room_1", BOB)
    a.bus.exit("room_1", BOB)  # gone already
    a.bus.announce("room_1")
    a.bus.announce("room_1")  # nothing new: no event
    a.bus.publish("room_1", event(1))
    second, after = await received(member, 2)
    assert (second["joined"], second["left"]) == ([{**ALICE, "name": "Alice B."}], [BOB])
    assert after["type"] == "message"
    assert await members(a, "room_1") == [{"id": "u-alice", "name": "Alice B."}]
    replayed = await a.bus.replay("room_1", first["event_id"])
    assert replayed is not None and [e.frame for e in replayed] == [second, after]


async def test_a_leave_and_a_join_in_between_announces_the_person_as_they_are(
    spawn: Spawn,
) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    a.bus.enter("room_1", ALICE)
    a.bus.announce("room_1")
    await received(member, 1)
    a.bus.exit("room_1", ALICE)  # a reload: gone, and back before any announcement
    a.bus.enter("room_1", ALICE)
    a.bus.announce("room_1")
    (frame,) = await received(member, 1)
    assert (frame["joined"], frame["left"]) == ([ALICE], [])


async def test_a_person_on_two_processes_is_one_member_until_both_exit(spawn: Spawn) -> None:
    a, b = await spawn(), await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    a.bus.enter("room_1", ALICE)
    b.bus.enter("room_1", ALICE)
    await a.bus.settle()
    await b.bus.settle()  # applied: seen by every process
    assert await members(a, "room_1") == [ALICE]
    b.bus.announce("room_1")  # any process may announce what any other changed
    assert (await received(member, 1))[0]["joined"] == [ALICE]

    a.bus.exit("room_1", ALICE)
    a.bus.announce("room_1")
    await a.bus.settle()
    b.bus.publish("room_1", event(1))
    assert (await received(member, 1))[0]["type"] == "message"  # no leave before it
    assert await members(a, "room_1") == [ALICE]  # still in, through b
    b.bus.exit("room_1", ALICE)
    b.bus.announce("room_1")
    left = (await received(member, 1))[0]
    assert (left["joined"], left["left"]) == ([], [ALICE])
    assert await members(a, "room_1") == []


async def test_signals_reach_every_process_without_an_id_and_are_not_logged(
    spawn: Spawn,
) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    a.bus.publish("room_1", event(1))
    logged = (await received(member, 1))[0]["event_id"]
    typing = protocol.typing_frame(ALICE, True)
    a.bus.signal("room_1", typing)
    assert await received(member, 1) == [typing]
    assert await a.bus.replay("room_1", logged) == []
    assert (await a.bus.position("room_1")).last_event_id == logged


async def test_signals_reach_another_process(spawn: Spawn) -> None:
    a, b = await spawn(), await spawn()
    await b.bus.listen("room_1")
    member = b.join("room_1")
    a.bus.signal("room_1", protocol.typing_frame(ALICE, False))
    assert await received(member, 1) == [protocol.typing_frame(ALICE, False)]


async def test_closing_a_room_forgets_its_people(spawn: Spawn) -> None:
    a = await spawn()
    a.bus.enter("room_1", ALICE)
    await a.bus.settle()
    assert await members(a, "room_1") == [ALICE]
    await a.bus.close_room("room_1", {"type": "error", "code": "room_deleted"})
    assert await members(a, "room_1") == []


# ---------------------------------------------------------------------- room leases


async def test_a_lease_is_exclusive_until_released_then_can_be_claimed_again(
    spawn: Spawn,
) -> None:
    a = await spawn()
    assert await a.leases.claim("room_1", "gen_1") is not None
    assert await a.leases.claim("room_1", "gen_2") is None
    assert await a.leases.claim("room_2", "gen_3") is not None  # one lease per room
    a.leases.release("room_1", "gen_2")  # not the holder: changes nothing
    assert await a.leases.claim("room_1", "gen_2") is None
    a.leases.release("room_1", "gen_1")

    async def claimed_again() -> bool:
        return await a.leases.claim("room_1", "gen_2") is not None

    await eventually(claimed_again)


async def test_a_lease_held_by_one_process_cannot_be_claimed_by_another(spawn: Spawn) -> None:
    a, b = await spawn(), await spawn()
    assert await a.leases.claim("room_1", "gen_1") is not None
    assert await b.leases.claim("room_1", "gen_2") is None
    a.leases.release("room_1", "gen_1")

    async def claimed_by_b() -> bool:
        return await b.leases.claim("room_1", "gen_2") is not None

    await eventually(claimed_by_b)


async def test_cancel_reaches_the_holder_before_its_generation_has_started(
    spawn: Spawn,
) -> None:
    # A send has claimed the room and is storing its message; nothing is published.
    a = await spawn()
    await a.leases.claim("room_1", "gen_1")
    assert await a.leases.request_cancel("room_1", None) == "gen_1"

    async def asked() -> bool:
        return a.stops == [("room_1", "gen_1", "cancelled")]

    await eventually(asked)


async def test_cancel_reaches_the_holder_of_a_started_generation(spawn: Spawn) -> None:
    a = await spawn()
    await a.leases.claim("room_1", "gen_1")
    a.bus.publish("room_1", start("gen_1"))
    assert await a.leases.request_cancel("room_1", "gen_1") == "gen_1"

    async def asked() -> bool:
        return a.stops == [("room_1", "gen_1", "cancelled")]

    await eventually(asked)


async def test_cancel_on_another_process_reaches_the_holder_started_or_not(
    spawn: Spawn,
) -> None:
    a, b = await spawn(), await spawn()
    await a.leases.claim("room_1", "gen_1")
    assert await b.leases.request_cancel("room_1", None) == "gen_1"
    a.bus.publish("room_1", start("gen_1"))
    assert await b.leases.request_cancel("room_1", "gen_1") == "gen_1"

    async def asked_twice() -> bool:
        return a.stops == [("room_1", "gen_1", "cancelled")] * 2

    await eventually(asked_twice)
    assert b.stops == []


async def test_cancel_asks_nobody_for_another_generation_a_free_room_or_a_select(
    spawn: Spawn,
) -> None:
    a = await spawn()
    assert await a.leases.request_cancel("room_1", None) is None  # nothing holds it
    await a.leases.claim("room_1", "gen_1")
    assert await a.leases.request_cancel("room_1", "gen_other") is None
    # A short exclusive change (selecting a branch) holds a lease but is no generation.
    await a.leases.claim("room_2", "select_1", cancellable=False)
    assert await a.leases.request_cancel("room_2", None) is None
    a.leases.release("room_1", "gen_1")
    a.leases.release("room_2", "select_1")

    async def released() -> bool:
        return await a.leases.claim("room_1", "gen_2") is not None

    await eventually(released)
    assert a.stops == []


async def test_generating_lists_rooms_from_an_answers_start_to_its_end(spawn: Spawn) -> None:
    a = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    await a.leases.claim("room_1", "gen_1")
    assert "room_1" not in await a.leases.generating()  # claimed, not started
    a.bus.publish("room_1", start("gen_1"))
    await received(member, 1)
    assert "room_1" in await a.leases.generating()
    a.bus.publish("room_1", done("gen_1"))
    a.leases.release("room_1", "gen_1")
    await received(member, 1)
    assert "room_1" not in await a.leases.generating()


async def test_a_generation_whose_holder_stops_renewing_is_taken_over(spawn: Spawn) -> None:
    a = await spawn()
    if a.bus.name == "memory":
        assert await a.leases.orphans() == []
        pytest.skip(
            "the memory broker's holder dies only with its process, and its rooms with it: "
            "it never has orphans"
        )
    b = await spawn()
    await a.bus.listen("room_1")
    member = a.join("room_1")
    await a.leases.claim("room_1", "gen_1")
    a.bus.publish("room_1", start("gen_1"))
    a.bus.publish("room_1", protocol.token_frame("gen_1", 1, "so far"))
    await received(member, 2)
    await a.close()  # it stops renewing, as a dead process does

    found: list[Any] = []

    async def adopted() -> bool:
        found.extend(await b.leases.orphans())
        return bool(found)

    await eventually(adopted, timeout=LEASE_SECONDS * 20)
    (orphan,) = found
    assert (orphan.room_id, orphan.generation_id) == ("room_1", "gen_1")
    assert (orphan.message_id, orphan.text) == ("msg_answer", "so far")
    assert await b.leases.claim("room_1", "gen_2") is None  # b holds it now
    assert await b.leases.orphans() == []  # taken once
