"""Server-Sent Events: the same room events as the WebSocket, for HTTP-only clients.

Each event is ``id:`` (the room's ``event_id``, for logged events), ``event:`` (the
frame's ``type``) and ``data:`` (the same JSON as the WebSocket frame, one line).
A browser's ``EventSource`` reconnects by itself and sends ``Last-Event-ID``; the
gateway then replays what was missed (see :mod:`gateway.eventlog`).

Why a response class of its own rather than Starlette's ``StreamingResponse``: the
stream must end the moment the client goes away (its subscription and queue freed at
once, not at the next failed write), it must send heartbeats while the room is
quiet, and a client that cannot keep up must be cut off like a slow WebSocket one.
So it runs two tasks, a writer draining the subscription and a listener waiting for
``http.disconnect``; whichever ends first ends the other.

A client that stops reading is cut off: its connection is aborted (through the
``gateway.abort`` extension of :mod:`gateway.server`'s protocols), which frees the
buffered bytes at once. When the server stops, the stream sends what is queued (the
``interrupted`` end of a running answer) and ends; ``EventSource`` reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any, Literal, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway import protocol
from gateway.chat import ChatService
from gateway.generations import Started
from gateway.hub import Event, SlowConsumer, Subscriber, TokenRun
from gateway.people import identify
from gateway.protocol import Frame
from gateway.transports import (
    ABORT_EXTENSION,
    WIRE_EXTENSION,
    Wire,
    connection_closed,
    until_first_done,
)
from gateway.transports.guard import sender_of, viewer_of

log = logging.getLogger(__name__)

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # nginx buffers responses by default, which would hold tokens back.
    (b"x-accel-buffering", b"no"),
]
RETRY_MS = 1000
"""How soon an ``EventSource`` reconnects after the stream drops."""

HEARTBEAT = b": keepalive\n\n"


def format_frame(frame: Frame) -> bytes:
    """A frame that is not a logged room event (``ready``, ``resumed``, ``error``...).
    ``ready``/``resync`` carry the id they are current as of, so a client that drops
    right after them resumes from there."""
    event_id = frame.get("last_event_id") if frame["type"] in ("ready", "resync") else None
    return protocol.sse_event(frame["type"], protocol.encode_bytes(frame), event_id)


class StreamFormat(Protocol):
    """How an :class:`EventStream` writes a room's events."""

    def opening(self, first: list[Frame]) -> bytes:
        """What the stream begins with (``first``: frames before any event)."""
        ...

    def event(self, event: Event | TokenRun) -> bytes:
        """One event of the room (may be ``b""``: nothing to say)."""
        ...

    def closing(self, frame: Frame) -> bytes:
        """The subscription's final frame (the room was deleted, the server stops...)."""
        ...


class RoomEventFormat:
    """The gateway's own: every frame as an event named by its ``type``, each logged
    one with its ``id``, for ``EventSource`` and ``Last-Event-ID``."""

    def opening(self, first: list[Frame]) -> bytes:
        return f"retry: {RETRY_MS}\n\n".encode() + b"".join(map(format_frame, first))

    def event(self, event: Event | TokenRun) -> bytes:
        return event.sse

    def closing(self, frame: Frame) -> bytes:
        return format_frame(frame)


ROOM_EVENTS = RoomEventFormat()


class GenerationFilter:
    """Keeps the events of one generation — the user message it answers, the branch
    it made active, its tokens and its end — and says when it ended."""

    TERMINAL = ("done", "cancelled", "error")

    def __init__(self, started: Started, user_message_id: str | None = None) -> None:
        self.generation_id = started.generation_id
        self.answer_id = started.message_id
        self.user_message_id = user_message_id
        self.ended = False

    def __call__(self, frame: Frame) -> bool:
        if frame.get("generation_id") == self.generation_id:
            if frame["type"] in self.TERMINAL:
                self.ended = True
            return True
        if frame["type"] == "message":
            return frame["message"]["id"] == self.user_message_id
        if frame["type"] == "branch":
            return frame["active_leaf_id"] == self.answer_id
        return False


class EventStream(Response):
    """An SSE response that drains a room subscription until the client leaves.

    ``first`` frames go out before any event. With ``only``, events it rejects are
    skipped and the stream ends once ``only.ended`` (one generation's stream).
    ``event_format`` writes them (the gateway's own events, or another API's).
    """

    def __init__(
        self,
        chat: ChatService,
        subscriber: Subscriber,
        *,
        first: Iterable[Frame] = (),
        only: GenerationFilter | None = None,
        heartbeat: float = 15.0,
        send_timeout: float = 10.0,
        cleanup: contextlib.ExitStack | None = None,
        event_format: StreamFormat = ROOM_EVENTS,
    ) -> None:
        super().__init__(status_code=200, media_type="text/event-stream")
        self.chat = chat
        self.subscriber = subscriber
        self.first = list(first)
        self.only = only
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.cleanup = cleanup or contextlib.ExitStack()
        self.format = event_format
        self.wire: Wire | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        opened = time.monotonic()
        outcome = "gone"
        metrics = self.chat.metrics
        metrics.connections.labels("event-stream").inc()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            try:
                await self._send(send, self.format.opening(self.first))
                wire: Wire | None = scope.get("extensions", {}).get(WIRE_EXTENSION)
                if wire is not None and wire.is_open:  # else: ASGI send (h11, HTTP/1.0)
                    self.wire = wire
                    self.subscriber.direct = self._write_now
                outcome = await self._stream(send, receive)
            except TimeoutError:  # the snapshot was not read
                room_id = self.subscriber.room_id
                log.info("ending the event stream of a slow client of room %s", room_id)
                outcome = "stalled"
            if outcome == "ended":
                with contextlib.suppress(Exception):
                    await self._send(send, b"", more=False)
            elif outcome == "stalled":
                await self._abort(scope, receive, send)
        finally:
            self.chat.joining.leave(self.subscriber)
            self.cleanup.close()
            subscriber = self.subscriber
            connection_closed(
                metrics,
                "event-stream",
                room=subscriber.room_id,
                person=subscriber.person.id if subscriber.person else None,
                sender=sender_of(scope),
                opened=opened,
                reason={"gone": "client_left", "stalled": "slow_client"}.get(outcome, "ended"),
            )

    async def _stream(self, send: Send, receive: Receive) -> Literal["ended", "stalled", "gone"]:
        """Run the writer until the stream ends, the client leaves, or the server
        cuts it (stopping)."""
        writer = asyncio.create_task(self._write(send))
        listener = asyncio.create_task(self._wait_disconnect(receive))
        cut = asyncio.create_task(self.subscriber.cut.wait())
        done = await until_first_done(writer, listener, cut)
        if writer in done:
            return writer.result()
        return "gone" if listener in done else "stalled"

    async def _abort(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Drop a client that does not read: abort its connection, which frees what is
        buffered for it (closing would wait for it to read)."""
        abort = scope.get("extensions", {}).get(ABORT_EXTENSION)
        if abort is None:  # a plain uvicorn: end the response as well as it can be
            with contextlib.suppress(Exception):
                await self._send(send, b"", more=False)
            return
        abort()
        # The server sees the connection lost on its next turn; returning before
        # that would count as a response left incomplete (an error in its log).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await self._wait_disconnect(receive)

    async def _send(self, send: Send, body: bytes, *, more: bool = True) -> None:
        async with asyncio.timeout(self.send_timeout):
            await send({"type": "http.response.body", "body": body, "more_body": more})

    def _write_now(self, event: Event) -> bool:
        """The subscription's :attr:`~gateway.hub.Subscriber.direct` write."""
        wire, only = self.wire, self.only
        assert wire is not None
        if not wire.can_write():
            return not wire.is_open  # gone: nothing to queue for (the listener ends it)
        if only is None:
            self._write_through(wire, event)
        elif not only.ended and only(event.frame):
            self._write_through(wire, event)
            if only.ended:
                self.subscriber.wake()  # the writer ends the stream
        return True

    def _write_through(self, wire: Wire, event: Event) -> None:
        data = self.format.event(event)
        if data:  # an empty write is the end of a chunked body
            wire.write(data)

    async def _write(self, send: Send) -> Literal["ended", "stalled"]:
        """Send what the subscription queues (events written through, see
        :meth:`_write_now`, never pass here), heartbeats while the room is quiet, and
        the subscription's final frame if it has one."""
        subscriber, only, wire = self.subscriber, self.only, self.wire
        try:
            while True:
                if only is not None and only.ended:
                    return "ended"
                try:
                    async with asyncio.timeout(self.heartbeat):
                        await subscriber.wait()
                except TimeoutError:
                    await self._send(send, HEARTBEAT)
                    continue
                if wire is not None and not wire.can_write():
                    # Behind: queued events stay queued, so nothing written through
                    # overtakes them, until the client has read.
                    async with asyncio.timeout(self.send_timeout):
                        await wire.wait_writable()
                    if not wire.is_open:
                        return "ended"
                batch = subscriber.take()
                chunks: list[bytes] = []
                for item in batch:
                    if only is None or only(item.frame):
                        chunks.append(self.format.event(item))
                        if only is not None and only.ended:
                            break
                if subscriber.closed_with is not None:
                    chunks.append(self.format.closing(subscriber.closed_with))
                data = b"".join(chunks)
                if data:  # never empty: that would end a chunked body
                    if wire is not None:
                        wire.write(data)
                    else:
                        await self._send(send, data)
                if (
                    subscriber.closed_with is not None
                    or (only is not None and only.ended)
                    or subscriber.drained  # the server is stopping; all was sent
                ):
                    return "ended"
        except (SlowConsumer, TimeoutError):
            # The client reconnects with Last-Event-ID and gets what it missed.
            log.info("ending the event stream of a slow client of room %s", subscriber.room_id)
            return "stalled"

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> None:
        while True:
            message: dict[str, Any] = await receive()
            if message["type"] == "http.disconnect":
                return


def event_stream(chat: ChatService, subscriber: Subscriber, **options: Any) -> EventStream:
    """An :class:`EventStream` with the chat service's heartbeat and send timeout."""
    settings = chat.settings
    return EventStream(
        chat,
        subscriber,
        heartbeat=settings.sse_heartbeat_interval,
        send_timeout=settings.send_timeout,
        **options,
    )


async def room_events(request: Request) -> Response:
    """``GET /api/rooms/{id}/events``: the room's live stream; with ``Last-Event-ID``
    (or ``?last_event_id=``), first what was missed after it."""
    chat: ChatService = request.state.chat
    raw = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
    after = protocol.parse_event_id(raw)
    held = contextlib.ExitStack()  # this client's connection quota, while streaming
    held.enter_context(chat.quotas.connection(sender_of(request.scope)))
    try:
        viewer = viewer_of(request.scope)
        person = identify(viewer, request.query_params)
        first, subscriber = await chat.joining.join(
            request.path_params["room_id"], after, viewer, person
        )
    except BaseException:
        held.close()
        raise
    return event_stream(chat, subscriber, first=[first], cleanup=held)


routes = [Route("/api/rooms/{room_id:id}/events", room_events, methods=["GET"])]
