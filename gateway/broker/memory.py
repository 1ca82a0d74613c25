"""The single-process broker: everything in this process's memory, nothing shared.

The default, and exactly the gateway's behaviour before brokers existed: publishing
appends to the room's :class:`~gateway.eventlog.EventLogs` and hands the event to the
hub at once, so no await separates a change from its delivery; a lease is an entry in
a dict, and a cancel calls the stop handler at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from gateway import protocol
from gateway.broker.base import Orphan, Position, StopHandler, live_change
from gateway.eventlog import EventLogs
from gateway.hub import Event, RoomHub
from gateway.protocol import Frame


class LiveAnswer:
    """The running answer of a room, as its frames tell it."""

    __slots__ = ("generation_id", "message_id", "parts", "seq")

    def __init__(self, generation_id: str, message_id: str) -> None:
        self.generation_id = generation_id
        self.message_id = message_id
        self.seq = 0
        self.parts: list[str] = []

    def view(self) -> dict[str, Any]:
        return {
            "generation_id": self.generation_id,
            "message_id": self.message_id,
            "seq": self.seq,
            "text": "".join(self.parts),
        }


def presence_of(people: dict[str, str], changed: dict[str, str]) -> Frame:
    """The ``presence`` event for the ``changed`` people, as they are now."""
    joined = [{"id": id_, "name": people[id_]} for id_ in changed if id_ in people]
    left = [{"id": id_, "name": name} for id_, name in changed.items() if id_ not in people]
    return protocol.presence_frame(joined, left)


class MemoryEventBus:
    """One process's rooms: an event log and live answers in dicts."""

    name = "memory"
    ready = True

    def __init__(self, log: EventLogs[Event]) -> None:
        self.log = log
        self._hub: RoomHub | None = None
        self.live: dict[str, LiveAnswer] = {}  # room -> its running answer
        self.people: dict[str, dict[str, str]] = {}  # room -> person id -> name
        self.changed: dict[str, dict[str, str]] = {}  # room -> who came or went -> name

    async def start(self, hub: RoomHub) -> None:
        self._hub = hub

    async def aclose(self) -> None:
        pass

    def publish(self, room_id: str, frame: Frame) -> None:
        event = Event(frame)
        frame["event_id"] = self.log.append(room_id, event)  # before anything encodes it
        change = live_change(frame)
        if change == "token":
            live = self.live.get(room_id)
            if live is not None and live.generation_id == frame["generation_id"]:
                live.seq = frame["seq"]
                live.parts.append(frame["text"])
        elif change == "start":
            self.live[room_id] = LiveAnswer(frame["generation_id"], frame["message_id"])
        elif change == "end":
            live = self.live.get(room_id)
            if live is not None and live.generation_id == frame["generation_id"]:
                del self.live[room_id]
        assert self._hub is not None, "publish before start"
        self._hub.deliver(room_id, event)

    def signal(self, room_id: str, frame: Frame) -> None:
        assert self._hub is not None, "signal before start"
        self._hub.deliver(room_id, Event(frame))

    def enter(self, room_id: str, person: dict[str, str]) -> None:
        people = self.people.setdefault(room_id, {})
        if people.get(person["id"]) != person["name"]:
            people[person["id"]] = person["name"]
            self.changed.setdefault(room_id, {})[person["id"]] = person["name"]

    def exit(self, room_id: str, person: dict[str, str]) -> None:
        people = self.people.get(room_id, {})
        name = people.pop(person["id"], None)
        if name is not None:
            if not people:
                del self.people[room_id]
            self.changed.setdefault(room_id, {})[person["id"]] = name

    def announce(self, room_id: str) -> None:
        changed = self.changed.pop(room_id, None)
        if changed:
            self.publish(room_id, presence_of(self.people.get(room_id, {}), changed))

    async def settle(self) -> None:
        pass  # published is applied

    async def listen(self, room_id: str) -> None:
        pass

    def forget(self, room_id: str) -> None:
        pass

    async def position(self, room_id: str) -> Position:
        live = self.live.get(room_id)
        members = [{"id": id_, "name": name} for id_, name in self.people.get(room_id, {}).items()]
        return Position(
            self.log.last_id(room_id), live.view() if live is not None else None, members=members
        )

    async def changes(self, room_id: str) -> tuple[int, int]:
        return 0, 0

    async def replay(self, room_id: str, after: int) -> list[Event] | None:
        return self.log.since(room_id, after)

    @asynccontextmanager
    async def changing(self, room_id: str) -> AsyncIterator[int]:
        # One process: the chat service's room lock already orders changes and joins.
        yield 0

    async def close_room(self, room_id: str, final: Frame) -> None:
        assert self._hub is not None, "close_room before start"
        self._hub.close_room(room_id, final)
        self.log.drop(room_id)
        self.live.pop(room_id, None)
        self.people.pop(room_id, None)
        self.changed.pop(room_id, None)

    def prune(self) -> None:
        self.log.prune()


class MemoryRoomLeases:
    """One process's leases, in a dict; the bus's live answers tell which rooms are
    generating. Nothing expires: a holder here dies only with the process, and so
    does every room's state."""

    def __init__(self, bus: MemoryEventBus) -> None:
        self._bus = bus
        self._leases: dict[str, tuple[str, bool]] = {}  # room -> holder, cancellable
        self._on_stop: StopHandler | None = None

    async def start(self, on_stop: StopHandler) -> None:
        self._on_stop = on_stop

    async def aclose(self) -> None:
        pass

    async def claim(self, room_id: str, holder_id: str, *, cancellable: bool = True) -> int | None:
        if room_id in self._leases:
            return None
        self._leases[room_id] = (holder_id, cancellable)
        return 0

    def release(self, room_id: str, holder_id: str) -> None:
        if self._leases.get(room_id, ("",))[0] == holder_id:
            del self._leases[room_id]

    async def request_cancel(self, room_id: str, generation_id: str | None) -> str | None:
        holder, cancellable = self._leases.get(room_id, ("", False))
        if not cancellable or generation_id not in (None, holder):
            return None
        assert self._on_stop is not None, "request_cancel before start"
        self._on_stop(room_id, holder, "cancelled")
        return holder

    async def generating(self) -> set[str]:
        return set(self._bus.live)

    async def orphans(self) -> list[Orphan]:
        return []  # a generation here dies only with the process, and so does its room
