"""The WebSocket endpoint ``/ws/rooms/{room_id}``.

Each connection runs a reader and a writer; whichever ends first ends the other.
Only the writer sends, draining the connection's bounded queue (see
:mod:`gateway.hub`), so a client that stops reading stalls nobody else.

``?last_event_id=N`` resumes: the events missed after N are replayed, then live
ones follow (or ``resync`` when N is too old; see :mod:`gateway.eventlog`).

Close codes: 4404 unknown or deleted room, or one this client may no longer see (its
access was revoked); 4400 a bad ``last_event_id``; 1013 the client fell too far
behind (reconnect, resuming); 1012 the server is restarting (after the last frames of
the room, e.g. the ``interrupted`` end of an answer); 1009 a frame over the server's
hard size limit (closed by uvicorn).

Every send, the ``ready`` snapshot's too, is bounded by ``GATEWAY_SEND_TIMEOUT``; the
close that follows a timeout is written even though the client does not read, and the
connection is then aborted if it still takes nothing (see :mod:`gateway.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import protocol
from gateway.chat import ChatService
from gateway.errors import (
    CLOSE_ROOM_GONE,
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN_LATER,
    BadRequest,
    GatewayError,
    RateLimited,
    internal_error,
)
from gateway.hub import Event, SlowConsumer, Subscriber
from gateway.metrics import Metrics
from gateway.people import Person, identify
from gateway.settings import Settings
from gateway.transports import WIRE_EXTENSION, Wire, connection_closed, until_first_done
from gateway.transports.guard import sender_of, viewer_of

log = logging.getLogger(__name__)


class Connection:
    """One client in one room."""

    def __init__(
        self, websocket: WebSocket, chat: ChatService, settings: Settings, room_id: str
    ) -> None:
        self.websocket = websocket
        self.chat = chat
        self.settings = settings
        self.room_id = room_id
        self.sender = sender_of(websocket.scope)
        self.viewer = viewer_of(websocket.scope)
        self.person: Person | None = None  # known once the query is checked
        self.wire: Wire | None = websocket.scope.get("extensions", {}).get(WIRE_EXTENSION)
        self.subscriber: Subscriber | None = None
        self.ended = "client_left"  # why the connection ended, for its log line
        self.metrics: Metrics = websocket.state.metrics

    async def serve(self) -> None:
        await self.websocket.accept()
        opened = time.monotonic()
        self.metrics.connections.labels("websocket").inc()
        try:
            with self.chat.quotas.connection(self.sender):
                await self._serve()
        except RateLimited as exc:
            self.ended = exc.code
            self.metrics.refused.labels(exc.code).inc()
            await self.websocket.send_text(protocol.encode(protocol.error_frame(exc)))
            await self.websocket.close(exc.close_code, exc.code)
        finally:
            connection_closed(
                self.metrics,
                "websocket",
                room=self.room_id,
                person=self.person.id if self.person else None,
                sender=self.sender,
                opened=opened,
                reason=self.ended,
            )

    async def _serve(self) -> None:
        try:
            query = self.websocket.query_params
            after = protocol.parse_event_id(query.get("last_event_id"))
            self.person = identify(self.viewer, query)
            ready, subscriber = await self.chat.joining.join(
                self.room_id, after, self.viewer, self.person
            )
            self.subscriber = subscriber
        except GatewayError as exc:
            self.ended = exc.code
            self.metrics.refused.labels(exc.code).inc()
            await self.websocket.send_text(protocol.encode(protocol.error_frame(exc)))
            await self.websocket.close(exc.close_code, exc.code)
            return
        try:
            # A snapshot can be large: a client that does not read it is dropped too.
            async with asyncio.timeout(self.settings.send_timeout):
                await self.websocket.send_text(protocol.encode(ready))
            if self.wire is not None:
                subscriber.direct = self._write_now
            cut = asyncio.create_task(subscriber.cut.wait())
            done = await until_first_done(
                asyncio.create_task(self._read(subscriber)),
                asyncio.create_task(self._write(subscriber)),
                cut,
            )
            for task in done:
                task.result()
            if cut in done:  # the server is stopping and cannot wait for this client
                self.ended = "server_restarting"
                await self._close(CLOSE_SERVICE_RESTART, "server restarting")
        except TimeoutError:
            self.ended = "slow_client"
            log.info("closing a client of room %s that does not read its snapshot", self.room_id)
            await self._close(CLOSE_TRY_AGAIN_LATER, "too slow; reconnect")
        except WebSocketDisconnect:
            pass
        finally:
            self.chat.joining.leave(subscriber)

    async def _close(self, code: int, reason: str) -> None:
        """Close, whatever state the connection is in (the peer may be gone or stalled:
        gateway.server's protocol then writes the close frame behind what is queued)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self.websocket.close(code, reason)

    def _write_now(self, event: Event) -> bool:
        """The subscription's :attr:`~gateway.hub.Subscriber.direct` write."""
        wire = self.wire
        assert wire is not None
        if wire.can_write():
            wire.write(event.websocket)
            return True
        return not wire.is_open  # gone: nothing to queue for (the reader ends it)

    async def _write(self, subscriber: Subscriber) -> None:
        """Send what the subscription queues (events written through, see
        :meth:`_write_now`, never pass here), then its final frame if it has one."""
        send_timeout = self.settings.send_timeout
        wire = self.wire
        try:
            while True:
                await subscriber.wait()
                if wire is not None:
                    if not wire.can_write():
                        # Behind: wait (queued events stay queued, so nothing written
                        # through overtakes them) and only then take them.
                        async with asyncio.timeout(send_timeout):
                            await wire.wait_writable()
                        if not wire.is_open:
                            return
                    batch = subscriber.take()
                    if batch:
                        wire.write(b"".join([item.websocket for item in batch]))
                else:  # a plain uvicorn: every frame through ASGI send
                    for item in subscriber.take():
                        async with asyncio.timeout(send_timeout):
                            await self.websocket.send_text(item.text)
                final = subscriber.closed_with
                if final is not None:
                    await self.websocket.send_text(protocol.encode(final))
                    # Retryable (resync_required, access_check_failed): come back and
                    # resume. Otherwise the room is gone for this client (room_deleted,
                    # room_not_found after its access was revoked).
                    code = CLOSE_TRY_AGAIN_LATER if final.get("retryable") else CLOSE_ROOM_GONE
                    self.ended = final["code"]
                    await self.websocket.close(code, final["code"])
                    return
                if subscriber.drained:  # the server is stopping; all was sent
                    self.ended = "server_restarting"
                    await self._close(CLOSE_SERVICE_RESTART, "server restarting")
                    return
        except (SlowConsumer, TimeoutError):
            self.ended = "slow_client"
            log.info("closing a slow client of room %s", self.room_id)
            await self._close(CLOSE_TRY_AGAIN_LATER, "too slow; reconnect")

    async def _read(self, subscriber: Subscriber) -> None:
        max_bytes = self.settings.max_frame_bytes
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                # receive_text() would raise KeyError and drop the socket without a
                # close frame; say what is wrong and keep the connection instead.
                error = BadRequest(
                    "binary frames are not supported; send JSON text frames",
                    code="binary_not_supported",
                )
                subscriber.push(Event(protocol.error_frame(error)))
                continue
            client_id = None
            try:
                frame = protocol.parse_client_frame(text, max_bytes=max_bytes)
                client_id = getattr(frame, "id", None)
                reply = await self._dispatch(frame)
            except GatewayError as exc:
                self.metrics.refused.labels(exc.code).inc()
                reply = protocol.error_frame(exc, client_id=client_id)
            except Exception:
                log.exception("handling a frame in room %s failed", self.room_id)
                reply = protocol.error_frame(internal_error())
            if reply is not None:
                subscriber.push(Event(reply))

    async def _dispatch(self, frame: protocol.ClientFrame) -> protocol.Frame | None:
        """Run one client frame; returns a frame for this client only, if any."""
        person = self.person
        assert person is not None and self.subscriber is not None
        match frame:
            case protocol.Send(content=content, id=client_id):
                message, started = await self.chat.sending.send(
                    self.room_id, content, client_id, self.sender, person
                )
                self.chat.presence.sent(self.room_id, person)
                if started is None:
                    return {**protocol.message_frame(message, client_id), "duplicate": True}
            case protocol.Edit(message_id=message_id, content=content, id=client_id):
                message, started = await self.chat.sending.edit(
                    self.room_id,
                    message_id,
                    content,
                    author=person,
                    viewer=self.viewer,
                    client_id=client_id,
                    sender=self.sender,
                )
                self.chat.presence.sent(self.room_id, person)
                if started is None:
                    return {**protocol.message_frame(message, client_id), "duplicate": True}
            case protocol.Hide(message_id=message_id, hidden=hidden):
                await self.chat.sending.hide(self.room_id, message_id, hidden, self.viewer)
            case protocol.Typing(active=active):
                self.chat.presence.typing(self.room_id, person, active)
            case protocol.Rename(name=name):
                self.person = self.chat.joining.rename(self.subscriber, name)
            case protocol.Cancel(generation_id=generation_id):
                await self.chat.sending.cancel(self.room_id, generation_id)
            case protocol.Regenerate(message_id=message_id, temperature=temperature):
                await self.chat.sending.regenerate(
                    self.room_id, message_id, temperature, self.sender
                )
            case protocol.Select(message_id=message_id):
                await self.chat.sending.select(self.room_id, message_id)
            case protocol.Ping(id=client_id):
                return protocol.pong_frame(client_id)
        return None


async def room_socket(websocket: WebSocket) -> None:
    state = websocket.state
    connection = Connection(websocket, state.chat, state.settings, websocket.path_params["room_id"])
    await connection.serve()


routes = [WebSocketRoute("/ws/rooms/{room_id:id}", room_socket)]
