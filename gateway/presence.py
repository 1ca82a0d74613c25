"""Who is in a room, and who is typing: this process's connections, told to the
event bus person by person.

A person may have several connections to a room (tabs, an event stream beside a
WebSocket): the bus hears :meth:`~gateway.broker.base.EventBus.enter` on the first
(or when their name changes) and :meth:`~gateway.broker.base.EventBus.exit` on the
last, and counts the people of every process. Who is in the room changes at once;
the room hears of it at most every :data:`ANNOUNCE_EVERY` seconds, in one ``presence``
event for everyone who came or went meanwhile. Why: each event goes to everyone in
the room, so announcing each arrival on its own would cost a room of N people N²
deliveries as they join (measured: a second of CPU for 500 people joining one room).

Typing is a signal (never stored, never replayed): announced at most once every
:data:`TYPING_EVERY` seconds per person and room, each announcement good for
:data:`~gateway.protocol.TYPING_SECONDS`; a stop is announced only after a start.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

from gateway import protocol
from gateway.broker.base import EventBus
from gateway.people import Person

TYPING_EVERY = 3.0
"""Seconds between two ``typing`` announcements of one person in one room."""

ANNOUNCE_EVERY = 0.25
"""Seconds a room's comings and goings wait to be announced together."""


class Presence:
    """This process's people in rooms, and their typing."""

    def __init__(
        self,
        bus: EventBus,
        clock: Callable[[], float] = time.monotonic,
        announce_every: float = ANNOUNCE_EVERY,
    ) -> None:
        self.bus = bus
        self._clock = clock
        self.announce_every = announce_every
        self._unannounced: set[str] = set()  # rooms with changes the room has not heard of
        self._announcing: asyncio.TimerHandle | None = None
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
        self._changed(room_id)
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
        self._changed(room_id)

    def rename(self, room_id: str, person: Person) -> None:
        """``person`` (one of their connections) now goes by ``person.name``."""
        key = (room_id, person.id)
        if key in self._connections and self._names.get(key) != person.name:
            self._names[key] = person.name
            self.bus.enter(room_id, person.view())
            self._changed(room_id)

    def _changed(self, room_id: str) -> None:
        self._unannounced.add(room_id)
        if self._announcing is None:
            loop = asyncio.get_running_loop()
            self._announcing = loop.call_later(self.announce_every, self.announce)

    def announce(self) -> None:
        """Announce every room's comings and goings now (due, or the server stops)."""
        if self._announcing is not None:
            self._announcing.cancel()
            self._announcing = None
        rooms, self._unannounced = self._unannounced, set()
        for room_id in rooms:
            self.bus.announce(room_id)

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
