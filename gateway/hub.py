"""Per-process fan-out of room events to connected clients.

Why not ``await ws.send()`` for each client in turn: one client that stops reading
would then stall every other member of the room (backpressure does not work for
fan-out). Instead each subscriber gets a bounded queue that :meth:`RoomHub.deliver`
fills without awaiting, and a writer of its own drains it.

Write-through: while a subscriber's queue is empty and its connection takes bytes
(the kernel's buffer has room), an event is written to the connection at once,
without waking its writer (:attr:`Subscriber.direct`): that is the common case, a
client that keeps up, and it costs one ``transport.write`` of bytes encoded once
for every client. Only a client that falls behind has its events queued.

Slow-consumer policy: while a subscriber's writer is busy, consecutive tokens of one
generation queued for it are coalesced into a single pending ``token`` frame (same
text, fewer frames), so a burst of tokens takes one queue slot. A subscriber whose
queue still reaches its limit, or whose single send blocks longer than the send
timeout, is dropped — its connection is closed with code 1013 ("try again later")
and it should reconnect (resuming where it was, see :mod:`gateway.eventlog`).

Shutdown: :meth:`RoomHub.stop` asks every subscription to end once its queue is sent
(the writer then closes the connection with 1012, or ends the event stream), and
:meth:`RoomHub.cut` ends those that could not, at once.

The hub knows only this process's subscribers: events reach it through the broker
(:mod:`gateway.broker`), which gives them their ids and carries them between processes.

Access: each subscriber knows its :class:`~gateway.access.Viewer`. When a ``room``
frame (the room's settings changed) arrives, :attr:`RoomHub.on_room_frame` is called
before the frame is queued, so it can hold (:meth:`Subscriber.suspend`) the members
the change may have shut out until their access is checked again: nothing the room
publishes after the change reaches them meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from gateway import protocol
from gateway.access import OPEN, Viewer
from gateway.metrics import OFF, Metrics
from gateway.people import Person
from gateway.protocol import Frame


class Event:
    """One published frame; encoded at most once per wire format however many clients
    receive it (the JSON, the WebSocket frame, the SSE event)."""

    __slots__ = ("_json", "_sse", "_websocket", "frame")

    def __init__(self, frame: Frame, data: bytes | None = None) -> None:
        self.frame = frame
        self._json = data
        self._websocket: bytes | None = None
        self._sse: bytes | None = None

    @classmethod
    def decode(cls, data: str | bytes) -> Event:
        """The event as another process encoded it (sent on as it came)."""
        if isinstance(data, str):
            data = data.encode()
        return cls(protocol.decode(data), data)

    @property
    def event_id(self) -> int:
        return self.frame.get("event_id") or 0

    @property
    def json(self) -> bytes:
        if self._json is None:
            self._json = protocol.encode_bytes(self.frame)
        return self._json

    @property
    def text(self) -> str:
        return self.json.decode()

    @property
    def websocket(self) -> bytes:
        """The WebSocket text frame, header included."""
        if self._websocket is None:
            self._websocket = protocol.websocket_text(self.json)
        return self._websocket

    @property
    def sse(self) -> bytes:
        if self._sse is None:
            frame = self.frame
            self._sse = protocol.sse_event(frame["type"], self.json, frame.get("event_id"))
        return self._sse


class TokenRun:
    """Consecutive tokens of one generation waiting for a busy subscriber; once taken
    from the queue, sent as one merged ``token`` frame (encoded for that one client)."""

    __slots__ = ("_merged", "frames")

    def __init__(self, first: Frame, second: Frame) -> None:
        self.frames = [first, second]
        self._merged: Event | None = None

    @property
    def _event(self) -> Event:
        if self._merged is None:
            self._merged = Event(protocol.merge_tokens(self.frames))
        return self._merged

    @property
    def frame(self) -> Frame:
        return self._event.frame

    @property
    def text(self) -> str:
        return self._event.text

    @property
    def websocket(self) -> bytes:
        return self._event.websocket

    @property
    def sse(self) -> bytes:
        return self._event.sse


ENDS = ("done", "cancelled", "error")
"""The frame types that end a generation."""


DirectWrite = Callable[["Event"], bool]
"""A transport's way to send an event at once, without awaiting: True when it was
written (or the connection is gone and it is dropped), False when the connection's
buffer is full and it must wait in the queue. Used only while the queue is empty, so
order is kept: the writer takes queued events only when it can write them at once."""


class SlowConsumer(Exception):
    """The subscriber's queue overflowed; its connection should be closed with 1013."""


class Subscriber:
    """A client's view of a room: a bounded queue of events and a wake-up signal."""

    def __init__(
        self,
        room_id: str,
        limit: int,
        *,
        joining: bool = False,
        stopping: bool = False,
        viewer: Viewer = OPEN,
        person: Person | None = None,
    ) -> None:
        self.room_id = room_id
        self.limit = limit
        self.viewer = viewer
        self.person = person
        """Who this is, when they count as in the room (see :mod:`gateway.presence`)."""
        self.present = False
        self.overflowed = False
        self.closed_with: Frame | None = None
        self.stopping = stopping
        """The server is stopping: end once the queue is sent (see :attr:`drained`)."""
        self.cut = asyncio.Event()
        """The server is stopping and cannot wait for this client: end now."""
        self._queue: deque[Event | TokenRun] = deque()
        self._ready = asyncio.Event()
        if stopping:
            self._ready.set()
        # While joining, events are held (unfiltered, unmerged) until begin().
        self._held: list[Event] | None = [] if joining else None
        self._after = 0
        """Events up to this id were in the client's first frame (see begin())."""
        # While suspended (access being checked), events wait here until resume().
        self._suspended: list[Event] | None = None
        self.direct: DirectWrite | None = None
        """Set by the transport once the client has its first frame: events then go
        straight to the connection while nothing is queued (see :data:`DirectWrite`)."""

    def begin(self, first: list[Event], after: int) -> None:
        """Start the subscription: ``first`` (replayed events), then the events that
        arrived while joining, except those up to event ``after`` (already in the
        client's snapshot or in ``first``)."""
        held, self._held = self._held or [], None
        for event in first:
            self.push(event)
        for event in held:
            if not event.event_id or event.event_id > after:
                self.push(event)
        # Another process's events up to ``after`` may still be on their way (its
        # pub/sub message can come later than the snapshot read): never twice.
        self._after = after

    def push(self, event: Event) -> None:
        if self.closed_with is not None:
            return  # ended: nothing more goes out, only the final frame
        if self._held is not None:  # still joining: see begin()
            self._held.append(event)
            return
        if 0 < event.event_id <= self._after:
            return  # in the client's snapshot already (see begin())
        if self._suspended is not None:  # access being checked: see suspend()
            if len(self._suspended) >= self.limit:
                self.overflowed = True
                self._ready.set()
            else:
                self._suspended.append(event)
            return
        queue = self._queue
        if not queue:
            direct = self.direct
            if direct is not None and direct(event):
                return
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
        """End this subscription after ``final`` has been sent (e.g. room deleted).
        Events queued before now still go out first; suspended ones never do."""
        self.closed_with = final
        self._suspended = None
        self._ready.set()

    def wake(self) -> None:
        """Wake the writer with nothing queued (something it watches has changed)."""
        self._ready.set()

    def stop(self) -> None:
        """The server is stopping: the writer sends what is queued, then ends."""
        self.stopping = True
        self._ready.set()

    @property
    def drained(self) -> bool:
        """Stopping, and everything queued was taken: time to end the connection."""
        return self.stopping and not self._queue and self._held is None

    def suspend(self) -> None:
        """Hold every event from now on, unsent, until :meth:`resume` (still allowed)
        or :meth:`close` (shut out): the room's access changed, and whether this
        viewer may still see it is being checked."""
        if self._suspended is None and self.closed_with is None:
            self._suspended = []

    @property
    def suspended(self) -> bool:
        return self._suspended is not None

    def resume(self) -> None:
        """Queue the events held since :meth:`suspend`, and those to come."""
        held, self._suspended = self._suspended or [], None
        for event in held:
            self.push(event)

    async def wait(self) -> None:
        """Wait until something is queued (or the subscription ends or stops).
        Raises SlowConsumer."""
        await self._ready.wait()
        self._ready.clear()
        if self.overflowed:
            raise SlowConsumer(self.room_id)

    def take(self) -> list[Event | TokenRun]:
        """Take everything queued (possibly nothing)."""
        batch = list(self._queue)
        self._queue.clear()
        return batch

    async def next_batch(self) -> list[Event | TokenRun]:
        """Wait for events and take all that are queued (possibly none, once
        stopping). Raises SlowConsumer."""
        await self.wait()
        return self.take()


RoomFrameHook = Callable[[str, Frame, list[Subscriber]], None]
"""Called with ``(room_id, room view, the room's subscribers here)`` as a ``room``
frame is delivered, before it is queued; never awaits."""


class RoomHub:
    """Which of this process's subscribers are in which room, and delivering room
    events to them."""

    def __init__(self, queue_limit: int = 1024, metrics: Metrics = OFF) -> None:
        self.queue_limit = queue_limit
        self._active_rooms = metrics.rooms
        self._rooms: dict[str, set[Subscriber]] = {}
        self.stopping = False
        self._emptied = asyncio.Event()
        # Generations whose last frame (done/cancelled/error) a shutdown waits for.
        self._awaited_ends: set[str] = set()
        self._ends_delivered = asyncio.Event()
        self.on_room_frame: RoomFrameHook | None = None
        """Set by the chat service: re-checks access when a room's settings change."""

    def subscribe(
        self, room_id: str, viewer: Viewer = OPEN, person: Person | None = None
    ) -> Subscriber:
        """Join the room: every event delivered from now on is kept for the
        subscription, which starts when :meth:`Subscriber.begin` is called."""
        subscriber = Subscriber(
            room_id,
            self.queue_limit,
            joining=True,
            stopping=self.stopping,
            viewer=viewer,
            person=person,
        )
        members = self._rooms.get(room_id)
        if members is None:
            members = self._rooms[room_id] = set()
            self._active_rooms.inc()
        members.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> bool:
        """Leave the room; returns True when that left it without subscribers here."""
        members = self._rooms.get(subscriber.room_id)
        if members is not None:
            members.discard(subscriber)
            if not members:
                del self._rooms[subscriber.room_id]
                self._active_rooms.dec()
                if not self._rooms:
                    self._emptied.set()
                return True
        return False

    def deliver(self, room_id: str, event: Event) -> None:
        """Queue ``event`` for every member of the room; never awaits."""
        members = self._rooms.get(room_id)
        if members:
            if event.frame["type"] == "room" and self.on_room_frame is not None:
                # First: a member the change shuts out must not get this frame (it
                # may reveal the room's new settings), nor anything after it.
                self.on_room_frame(room_id, event.frame["room"], list(members))
            for subscriber in members:
                subscriber.push(event)
        if self._awaited_ends:
            frame = event.frame
            if frame["type"] in ENDS and frame.get("generation_id") in self._awaited_ends:
                self._awaited_ends.discard(frame["generation_id"])
                if not self._awaited_ends:
                    self._ends_delivered.set()

    def expect_ends(self, generation_ids: set[str]) -> None:
        """Note the generations whose last frame (done/cancelled/error) a shutdown
        waits for: with Redis, frames come back here only after a round trip."""
        self._awaited_ends = set(generation_ids)
        self._ends_delivered.clear()
        if not self._awaited_ends:
            self._ends_delivered.set()

    async def ends_delivered(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until every generation of :meth:`expect_ends`
        had its last frame delivered here. Returns False on timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._ends_delivered.wait()
            return True
        except TimeoutError:
            self._awaited_ends = set()
            return False

    def stop(self) -> None:
        """The server is stopping: every subscription (also any made from now on)
        ends once its queue is sent."""
        self.stopping = True
        for members in self._rooms.values():
            for subscriber in members:
                subscriber.stop()

    async def emptied(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until no subscriber is left; False on timeout."""
        if not self._rooms:
            return True
        self._emptied.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._emptied.wait()
            return True
        except TimeoutError:
            return False

    def cut(self) -> None:
        """End every subscription now (the server cannot wait any longer)."""
        for members in self._rooms.values():
            for subscriber in members:
                subscriber.cut.set()

    def close_room(self, room_id: str, final: Frame) -> None:
        """End every subscription to the room with ``final`` (room deleted)."""
        members = self._rooms.pop(room_id, None)
        if members is None:
            return
        self._active_rooms.dec()
        for subscriber in members:
            subscriber.close(final)

    def subscribers(self, room_id: str) -> list[Subscriber]:
        """The room's subscribers here."""
        return list(self._rooms.get(room_id, ()))

    def rooms(self) -> list[str]:
        """The rooms with subscribers here."""
        return list(self._rooms)

    def members(self, room_id: str) -> int:
        return len(self._rooms.get(room_id, ()))
