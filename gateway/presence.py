"""Who is in a room, and who is typing: this process's connections, told to the
event bus person by person.

A person may have several connections to a room (tabs, an event stream beside a
WebSocket): the bus hears :meth:`~gateway.broker.base.EventBus.enter` on the first
(or when their name changes) and :meth:`~gateway.broker.base.EventBus.exit` on the
last, and counts the people of every process.

Typing is a signal (never stored, never replayed): announced at most once every
:data:`TYPING_EVERY` seconds per person and room, each announcement good for
:data:`~gateway.protocol.TYPING_SECONDS`; a stop is announced only after a start.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from gateway import protocol
from gateway.broker.base import EventBus
from gateway.people import Person

TYPING_EVERY = 3.0
"""Seconds between two ``typing`` announcements of one person in one room."""


class Presence:
    """This process's people in rooms, and their typing."""

    def __init__(self, bus: EventBus, clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self._clock = clock
        self._connections: Counter[tuple[str, str]] = Counter()  # (room, person id)
        self._names: dict[tuple[str, str], str] = {}
        self._typing: dict[tuple[str, str], float] = {}  # when last announced

    def arrive(self, room_id: str, person: Person) -> bool:
        """A connection of ``person`` joined the room; returns whether the bus was told
        (their first connection here, or a new name)."""
        key = (room_id, person.id)
        self._connections[key] += 1
        if self._names.get(key) == person.name:
            return False
        self._names[key] = person.name
        self.bus.enter(room_id, person.view())
        return True

    def depart(self, room_id: str, person: Person) -> None:
        """A connection of ``person`` left the room."""
        key = (room_id, person.id)
        if self._connections[key] > 1:
            self._connections[key] -= 1
            return
        del self._connections[key]
        name = self._names.pop(key, person.name)
        self._typing.pop(key, None)
        self.bus.exit(room_id, {"id": person.id, "name": name})

    def rename(self, room_id: str, person: Person) -> None:
        """``person`` (one of their connections) now goes by ``person.name``."""
        key = (room_id, person.id)
        if key in self._connections and self._names.get(key) != person.name:
            self._names[key] = person.name
            self.bus.enter(room_id, person.view())

    def typing(self, room_id: str, person: Person, active: bool = True) -> bool:
        """``person`` is typing (or stopped); returns whether it was announced."""
        key = (room_id, person.id)
        now = self._clock()
        last = self._typing.get(key)
        if active:
            if last is not None and now - last < TYPING_EVERY:
                return False
            if len(self._typing) >= 10_000:  # people typing over REST never depart
                self._forget_typing(now)
            self._typing[key] = now
        else:
            if last is None:
                return False  # no start was announced, or it has expired by now
            del self._typing[key]
            if now - last >= protocol.TYPING_SECONDS:
                return False
        self.bus.signal(room_id, protocol.typing_frame(person.view(), active))
        return True

    def _forget_typing(self, now: float) -> None:
        self._typing = {
            key: last for key, last in self._typing.items() if now - last < protocol.TYPING_SECONDS
        }

    def sent(self, room_id: str, person: Person) -> None:
        """``person`` sent a message: they are no longer typing (clients clear it on
        the ``message``; nothing is announced)."""
        self._typing.pop((room_id, person.id), None)
