"""Per-room event logs: an id for every event a room broadcasts, and the recent ones
kept for clients that reconnect. Pure data structures; no I/O.

Ids. Every broadcast event (``message``, ``start``, ``token``, ``done``, ``cancelled``,
``error``, ``branch``, ``room``) gets an ``event_id``, strictly increasing per room.
A room's log counts from the moment it was created, in microseconds since the Unix
epoch: a log created after a restart (or after the room sat idle long enough for its
log to be dropped) starts above every id the old one gave out, as long as that one
gave out fewer than one id per microsecond — so an id is never reused, and nothing
needs storing. Ids stay below 2**53, exact in JavaScript, until the year 2255.

Resume. A client that saw events up to id N gets everything after N from the buffer
(``since``), provided the buffer still holds all of it. Otherwise — N older than the
buffer, from before the log was created (a restart), or never given out — ``since``
returns None and the client must resync from the current state instead: the log
never pretends to replay what it no longer has.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def now_us() -> int:
    return time.time_ns() // 1000


class RoomLog(Generic[T]):
    """One room's id counter and its buffer of recent events, oldest first."""

    __slots__ = ("base", "entries", "last_id", "touched")

    def __init__(self, base: int, now: float) -> None:
        self.base = base
        """Ids given out by this log are above this one."""
        self.last_id = base
        self.entries: deque[tuple[int, float, T]] = deque()
        """``(event_id, time appended, item)``, consecutive ids."""
        self.touched = now

    @property
    def complete_after(self) -> int:
        """The buffer holds every event with an id above this one."""
        return self.entries[0][0] - 1 if self.entries else self.last_id


class EventLogs(Generic[T]):
    """The logs of all rooms, each bounded to ``max_events`` and ``max_age`` seconds."""

    def __init__(
        self,
        max_events: int,
        max_age: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        id_base: Callable[[], int] = now_us,
    ) -> None:
        self.max_events = max_events
        self.max_age = max_age
        self._clock = clock
        self._id_base = id_base
        self._logs: dict[str, RoomLog[T]] = {}

    def _log(self, room_id: str) -> RoomLog[T]:
        log = self._logs.get(room_id)
        if log is None:
            log = self._logs[room_id] = RoomLog(self._id_base(), self._clock())
        return log

    def append(self, room_id: str, item: T) -> int:
        """Keep ``item`` as the room's next event; returns the id it was given."""
        log = self._log(room_id)
        now = self._clock()
        log.touched = now
        event_id = log.last_id = log.last_id + 1
        entries = log.entries
        entries.append((event_id, now, item))
        if len(entries) > self.max_events:
            entries.popleft()
        self._expire(log, now)
        return event_id

    def last_id(self, room_id: str) -> int:
        """The newest id of the room (creating its log): where a new client starts."""
        log = self._log(room_id)
        log.touched = self._clock()
        return log.last_id

    def since(self, room_id: str, after: int) -> list[T] | None:
        """Every event after ``after``, or None when the buffer cannot give them all."""
        log = self._logs.get(room_id)
        if log is None:
            return None
        self._expire(log, self._clock())
        if not log.complete_after <= after <= log.last_id:
            return None
        log.touched = self._clock()
        skip = after - log.complete_after
        return [item for _, _, item in itertools.islice(log.entries, skip, None)]

    def drop(self, room_id: str) -> None:
        """Forget the room (deleted): a later log for the same id starts above this one."""
        self._logs.pop(room_id, None)

    def prune(self) -> int:
        """Expire old events everywhere; drop logs untouched for ``max_age``.
        Returns how many logs were dropped."""
        now = self._clock()
        idle = [
            room_id
            for room_id, log in self._logs.items()
            if not self._expire(log, now) and now - log.touched > self.max_age
        ]
        for room_id in idle:
            del self._logs[room_id]
        return len(idle)

    def _expire(self, log: RoomLog[T], now: float) -> int:
        """Drop events older than ``max_age``; returns how many remain."""
        entries, oldest = log.entries, now - self.max_age
        while entries and entries[0][1] < oldest:
            entries.popleft()
        return len(entries)

    def __len__(self) -> int:
        return len(self._logs)
