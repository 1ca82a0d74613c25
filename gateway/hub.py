"""Per-process fan-out of room events to connected clients.

Why not ``await ws.send()`` for each client in turn: one client that stops reading
would then stall every other member of the room (backpressure does not work for
fan-out). Instead each subscriber gets a bounded queue that :meth:`RoomHub.publish`
fills without awaiting, and a writer of its own drains it.

Slow-consumer policy: while a subscriber's writer is busy, consecutive tokens of one
generation queued for it are coalesced into a single pending ``token`` frame (same
text, fewer frames), so a burst of tokens takes one queue slot. A subscriber whose
queue still reaches its limit, or whose single send blocks longer than the send
timeout, is dropped — its connection is closed with code 1013 ("try again later")
and it should reconnect (resuming where it was, see :mod:`gateway.eventlog`).
"""

from __future__ import annotations

import asyncio
from collections import deque

from gateway import protocol
from gateway.eventlog import EventLogs
from gateway.protocol import Frame


class Event:
    """One published frame; encoded at most once however many clients receive it."""

    __slots__ = ("_text", "frame")

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = protocol.encode(self.frame)
        return self._text


class TokenRun:
    """Consecutive tokens of one generation waiting for a busy subscriber; once taken
    from the queue, sent as one merged ``token`` frame."""

    __slots__ = ("_merged", "frames")

    def __init__(self, first: Frame, second: Frame) -> None:
        self.frames = [first, second]
        self._merged: Frame | None = None

    @property
    def frame(self) -> Frame:
        if self._merged is None:
            self._merged = protocol.merge_tokens(self.frames)
        return self._merged

    @property
    def text(self) -> str:
        return protocol.encode(self.frame)


class SlowConsumer(Exception):
    """The subscriber's queue overflowed; its connection should be closed with 1013."""


class Subscriber:
    """A client's view of a room: a bounded queue of events and a wake-up signal."""

    def __init__(self, room_id: str, limit: int) -> None:
        self.room_id = room_id
        self.limit = limit
        self.overflowed = False
        self.closed_with: Frame | None = None
        self._queue: deque[Event | TokenRun] = deque()
        self._ready = asyncio.Event()

    def push(self, event: Event) -> None:
        queue = self._queue
        frame = event.frame
        if queue and frame["type"] == "token":
            last = queue[-1]
            if isinstance(last, TokenRun):
                if last.frames[0]["generation_id"] == frame["generation_id"]:
                    last.frames.append(frame)
                    return
            elif (
                last.frame["type"] == "token"
                and last.frame["generation_id"] == frame["generation_id"]
            ):
                queue[-1] = TokenRun(last.frame, frame)
                return
        if len(queue) >= self.limit:
            self.overflowed = True
        else:
            queue.append(event)
        self._ready.set()

    def close(self, final: Frame) -> None:
        """End this subscription after ``final`` has been sent (e.g. room deleted)."""
        self.closed_with = final
        self._ready.set()

    async def next_batch(self) -> list[Event | TokenRun]:
        """Wait for events and take all that are queued. Raises SlowConsumer."""
        await self._ready.wait()
        self._ready.clear()
        if self.overflowed:
            raise SlowConsumer(self.room_id)
        batch = list(self._queue)
        self._queue.clear()
        return batch


class RoomHub:
    """Which subscribers are in which room, publishing to them, and each room's log
    of recent events for those who come back."""

    def __init__(self, log: EventLogs[Event], queue_limit: int = 1024) -> None:
        self.log = log
        self.queue_limit = queue_limit
        self._rooms: dict[str, set[Subscriber]] = {}

    def subscribe(self, room_id: str) -> Subscriber:
        """Join the room: every event published from now on is queued for it."""
        subscriber = Subscriber(room_id, self.queue_limit)
        self._rooms.setdefault(room_id, set()).add(subscriber)
        return subscriber

    def resume(self, room_id: str, after: int) -> tuple[Subscriber, int] | None:
        """Join the room with every event after ``after`` queued first; returns the
        subscription and how many events it replays, or None when the log cannot
        replay them all (too old, or from before a restart): resync instead."""
        missed = self.log.since(room_id, after)
        if missed is None:
            return None
        # Tokens are merged in the queue; other events each take a slot. A replay that
        # would overflow the queue at once is better served by a resync.
        if sum(event.frame["type"] != "token" for event in missed) > self.queue_limit // 2:
            return None
        subscriber = self.subscribe(room_id)
        for event in missed:
            subscriber.push(event)
        return subscriber, len(missed)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        members = self._rooms.get(subscriber.room_id)
        if members is not None:
            members.discard(subscriber)
            if not members:
                del self._rooms[subscriber.room_id]

    def publish(self, room_id: str, frame: Frame) -> None:
        """Give ``frame`` the room's next ``event_id``, log it, and queue it for every
        member of the room; never awaits."""
        event = Event(frame)
        frame["event_id"] = self.log.append(room_id, event)  # before anything encodes it
        members = self._rooms.get(room_id)
        if members:
            for subscriber in members:
                subscriber.push(event)

    def close_room(self, room_id: str, final: Frame) -> None:
        """End every subscription with ``final`` and forget the room's log (deleted)."""
        for subscriber in self._rooms.pop(room_id, set()):
            subscriber.close(final)
        self.log.drop(room_id)

    def members(self, room_id: str) -> int:
        return len(self._rooms.get(room_id, ()))
