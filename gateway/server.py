"""How uvicorn serves the gateway: its options, and the protocol classes it runs.

uvicorn's own protocols are right for well-behaved clients; these subclasses add what
a chat server facing the open Internet needs, and nothing else:

- **A closed connection really ends.** asyncio's ``transport.close()`` waits for the
  write buffer to drain, so a peer that stopped reading kept its socket and every
  byte queued for it for ever. Here a closing transport that moves no bytes for
  :data:`CLOSE_GRACE` seconds is aborted (a slow peer that still reads finishes).
- **A dropped WebSocket hears why.** A close (1013 "too slow", 1012 "restarting")
  is written even while the peer is not reading (uvicorn waits for the buffer to
  drain first, i.e. never), behind what is queued, so a client that reads again in
  time sees it. A missed keepalive pong closes with 1013 (uvicorn: 1011) — a
  stalled client should reconnect, not think the server failed.
- **Invalid UTF-8** in a text frame closes with 1007, logged at INFO (uvicorn logs
  an ERROR with a traceback per connection).
- **Request heads are capped** at :data:`MAX_HEADER_BYTES` (431; httptools has no
  limit at all, h11 answers 400 past ``h11_max_incomplete_event_size``).
- **A burst of connections is accepted at once.** libuv (uvloop's engine) accepts one
  connection per loop iteration since 1.45 ("don't accept() connections in a loop").
  Under load an iteration takes milliseconds, so 500 clients connecting together were
  accepted at about 100 a second and the last waited 3.5 s for their handshake (half
  of them, while the first half's answers streamed). :class:`Server` takes whatever
  else is queued on the listening socket each time a connection arrives, as asyncio's
  own loop does (:class:`Backlog`). Not with ``serve --workers N``: uvicorn's worker
  supervisor builds its own ``uvicorn.Server`` in each worker.
- **Shutdown starts with the app.** uvicorn's ``Server.shutdown()`` asks each
  connection to shut down (WebSockets get 1012 at once) and then waits for open
  responses, and only then runs the lifespan shutdown; an SSE stream never ends by
  itself, so the wait timed out and the answers ended up ``complete``. Here the
  first connection asked to shut down starts the app's drain (the lifespan state's
  ``"drain"``, see :mod:`gateway.app`): running answers end ``interrupted`` and every
  stream flushes that frame and ends (WebSocket close 1012) before uvicorn's own
  steps go on. Hooking the connections rather than subclassing ``uvicorn.Server``
  makes this work in ``--workers N`` processes too, whose ``Server`` uvicorn builds.

Run outside ``chat-gateway serve`` with ``uvicorn --factory gateway.app:create_app
--http gateway.server:HttpToolsProtocol --ws gateway.server:WebSocketProtocol`` (all
but the burst accepting, which needs :class:`Server`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Literal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol as UvicornH11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from gateway.settings import Settings
from gateway.transports import ABORT_EXTENSION, WIRE_EXTENSION

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as UvicornHttpTools
except ImportError:  # pragma: no cover - httptools is optional for uvicorn
    UvicornHttpTools = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

CLOSE_GRACE = 2.0
"""Seconds a closing connection may move no bytes before it is aborted."""

MAX_HEADER_BYTES = 64 * 1024
"""The most a request line plus headers may take (answered 431 past it)."""

DRAIN = "drain"
"""The lifespan state's key for the app's drain: ``() -> asyncio.Task[None]``, the
same task on every call (see :func:`gateway.app.create_app`)."""


def uvicorn_options(
    settings: Settings, *, http: Literal["auto", "httptools", "h11"] = "auto"
) -> dict[str, Any]:
    """The options for ``uvicorn.Config``/``uvicorn.run`` (the CLI, the tests and the
    benchmarks use the same). ``http`` picks the parser, as uvicorn's ``--http``."""
    return {
        "http": http_protocol(http),
        "ws": WebSocketProtocol,
        # Frames above this are refused by uvicorn itself (close 1009); below it,
        # frames over GATEWAY_MAX_FRAME_BYTES get an error frame and stay open.
        "ws_max_size": 4 * 1024 * 1024,
        # Token frames are a few dozen bytes: compressing each costs more CPU
        # (measured 25-35 us per token) than it saves on the wire.
        "ws_per_message_deflate": False,
        # A client that stops answering pings (stalled or gone) is dropped after
        # interval + timeout, also in a quiet room where no send ever times out.
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "timeout_graceful_shutdown": 10,
        # Its lines go through the gateway's own logging (gateway.logs): one format.
        "log_config": None,
    }


GC_YOUNG_THRESHOLD = 20_000
"""Allocations between two collections of the youngest generation (CPython: 700).
Streaming allocates a few short-lived objects per token, nearly all freed at once by
reference counting; a young collection traverses whatever is alive at that moment,
about the same work whenever it runs, so running it less often saves CPU (measured:
the collector took ~8% of the relay's CPU at 700)."""


def tune_gc() -> None:
    """For a serving process, once everything is imported and built: move what exists
    now out of the collector's way for good (``gc.freeze``: full collections no longer
    traverse the libraries' objects), and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def http_protocol(choice: Literal["auto", "httptools", "h11"] = "auto") -> type[asyncio.Protocol]:
    """The HTTP protocol class: httptools when installed (as uvicorn's ``auto``)."""
    if choice == "h11" or (choice == "auto" and UvicornHttpTools is None):
        return H11Protocol
    if UvicornHttpTools is None:
        raise RuntimeError("httptools is not installed")
    return HttpToolsProtocol


def start_drain(app_state: dict[str, Any]) -> asyncio.Task[None] | None:
    """Start (or get) the app's drain; None when the app has none (or not yet)."""
    drain: Callable[[], asyncio.Task[None]] | None = app_state.get(DRAIN)
    return drain() if drain is not None else None


class Backlog:
    """Accepts the connections queued on a server's listening sockets (see the module).

    Each connection is handed to the loop as an accepted socket
    (``loop.connect_accepted_socket``) with the server's own protocol factory; the
    listening sockets are duplicates of the server's, closed before it stops.
    """

    TAKE_AT_ONCE = 256
    """The most taken per listening socket and call; the next connection made takes
    more. Bounded so that, with several processes on one port, one cannot take it all."""

    def __init__(
        self,
        listeners: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
        ssl: Any = None,
    ) -> None:
        self._listeners = listeners
        for listener in listeners:
            listener.setblocking(False)
        self._protocol_factory = protocol_factory
        self._ssl = ssl
        self._accepting: set[asyncio.Task[Any]] = set()

    @classmethod
    def of(
        cls, servers: list[Any], protocol_factory: Callable[[], asyncio.Protocol], ssl: Any = None
    ) -> Backlog:
        """The backlog of the listening sockets of ``servers`` (``loop.create_server``'s)."""
        listeners = [
            socket.socket(fileno=os.dup(sock.fileno()))
            for server in servers
            for sock in server.sockets
        ]
        return cls(listeners, protocol_factory, ssl)

    def take(self) -> int:
        """Accept what is queued now (up to :attr:`TAKE_AT_ONCE` a socket); how many."""
        taken = 0
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            for _ in range(self.TAKE_AT_ONCE):
                try:
                    connection, _ = listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break
                except OSError as exc:  # out of file descriptors, say: the loop's turn
                    log.warning("accepting queued connections failed: %s", exc)
                    break
                connection.setblocking(False)
                task = loop.create_task(
                    loop.connect_accepted_socket(self._protocol_factory, connection, ssl=self._ssl)
                )
                self._accepting.add(task)
                task.add_done_callback(self._accepted)
                taken += 1
        return taken

    def _accepted(self, task: asyncio.Task[Any]) -> None:
        self._accepting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.info("a queued connection failed to start: %r", exc)  # TLS handshake, say

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners = []


BACKLOG = "gateway_backlog"
"""The attribute of uvicorn's ``ServerState`` that holds the server's :class:`Backlog`."""


class Server(uvicorn.Server):
    """uvicorn's server, taking a burst of new connections at once (see the module)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        config = self.config

        def protocol_factory() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        setattr(self.server_state, BACKLOG, Backlog.of(self.servers, protocol_factory, config.ssl))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        backlog: Backlog | None = getattr(self.server_state, BACKLOG, None)
        if backlog is not None:
            backlog.close()  # before uvicorn stops listening: nothing is taken after
        await super().shutdown(sockets)


class ClosingTransport:
    """A connection's transport whose ``close()`` gives up on a peer that reads nothing.

    Everything else is the wrapped transport's. The check is for progress, not a
    deadline: a slow reader still gets all that was queued for it.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._watch: asyncio.TimerHandle | None = None
        # Called for every frame sent: bound here, not looked up through __getattr__.
        self.write = transport.write
        self.is_closing = transport.is_closing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._transport.close()
        if self._watch is None:
            self._schedule(self._transport.get_write_buffer_size())

    def _schedule(self, queued: int) -> None:
        self._watch = self._loop.call_later(CLOSE_GRACE, self._check, queued)

    def _check(self, queued_before: int) -> None:
        queued = self._transport.get_write_buffer_size()
        if queued == 0:
            return  # flushed: asyncio completes the close by itself
        if queued < queued_before:
            self._schedule(queued)  # still reading, slowly
            return
        log.info("aborting a connection whose peer read nothing for %.0f s", CLOSE_GRACE)
        self._transport.abort()  # frees the buffer; the socket closes at once


class ResponseWire:
    """The :class:`~gateway.transports.Wire` of one streamed HTTP/1.1 response on
    uvicorn's httptools protocol: body bytes written as chunks straight to the
    transport (what the cycle's ASGI ``send`` does, minus a message dict and an
    ``await`` per event). Open only between the response's start and its end, and
    only for chunked responses (an HTTP/1.0 client gets ASGI ``send``)."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    @property
    def is_open(self) -> bool:
        cycle = self._cycle
        return (
            cycle.response_started
            and cycle.chunked_encoding
            and not cycle.response_complete
            and not cycle.disconnected
            and not cycle.transport.is_closing()
        )

    def can_write(self) -> bool:
        return not self._cycle.flow.write_paused and self.is_open

    def write(self, body: bytes) -> None:
        self._cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))

    async def wait_writable(self) -> None:
        await self._cycle.flow.drain()  # set again when the connection is lost


class _Guarded:
    """What both HTTP protocols share: the closing transport, the head cap, the abort
    extension and the drain on shutdown. Mixed in before uvicorn's class."""

    transport: Any
    loop: asyncio.AbstractEventLoop
    app_state: dict[str, Any]
    server_state: Any
    app: Any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        backlog: Backlog | None = getattr(self.server_state, BACKLOG, None)
        if backlog is not None:
            backlog.take()
        guarded = ClosingTransport(transport, self.loop)
        super().connection_made(guarded)  # type: ignore[misc]
        inner = self.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})[ABORT_EXTENSION] = guarded.abort
            await inner(scope, receive, send)

        self.app = app

    def shutdown(self) -> None:
        # Open event streams end through the app's drain; idle connections close now.
        start_drain(self.app_state)
        super().shutdown()  # type: ignore[misc]

    _head_tail = b""

    def head_bytes_in(self, data: bytes) -> int:
        """How much of ``data`` is request head: all of it, or up to the blank line
        that ends the head (a body sent in the same write is not head)."""
        tail, self._head_tail = self._head_tail, data[-3:]
        end = (tail + data).find(b"\r\n\r\n")
        return len(data) if end < 0 else max(0, end + 4 - len(tail))

    def refuse_head(self) -> None:
        """Answer 431 and close: the request's head is over :data:`MAX_HEADER_BYTES`."""
        log.info("refused a request whose headers exceed %d bytes", MAX_HEADER_BYTES)
        body = b"request header fields too large"
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


if UvicornHttpTools is not None:

    class HttpToolsProtocol(_Guarded, UvicornHttpTools):  # type: ignore[misc]
        """uvicorn's httptools protocol with the gateway's guards (see the module)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Bytes of the current request's head seen so far; None once it is parsed.
            self._head_bytes: int | None = 0

        def data_received(self, data: bytes) -> None:
            if self._head_bytes is not None:
                # httptools buffers a header however long it is: count before feeding.
                self._head_bytes += self.head_bytes_in(data)
                if self._head_bytes > MAX_HEADER_BYTES:
                    self._head_bytes = None
                    self.refuse_head()
                    return
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._head_bytes, self._head_tail = None, b""
            super().on_headers_complete()
            self.scope.setdefault("extensions", {})[WIRE_EXTENSION] = ResponseWire(self.cycle)

        def on_message_complete(self) -> None:
            self._head_bytes = 0  # the next request on this connection has a new head
            super().on_message_complete()

else:  # pragma: no cover
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class H11Protocol(_Guarded, UvicornH11Protocol):
    """uvicorn's h11 protocol with the gateway's guards (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # bytes received while waiting for a request's head

    def data_received(self, data: bytes) -> None:
        # h11 alone refuses a head over h11_max_incomplete_event_size with a 400;
        # count here to answer 431, as for httptools.
        if self.conn.their_state is h11.IDLE:
            self._head_bytes += self.head_bytes_in(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._head_bytes = 0
                self.refuse_head()
                return
        else:
            self._head_bytes, self._head_tail = 0, b""
        super().data_received(data)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with the gateway's guards (see the module), and
    the :class:`~gateway.transports.Wire` of the connection for the app's hot path."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:  # the app's task is created, not started
            self.scope["extensions"][WIRE_EXTENSION] = self  # type: ignore[index]

    # --- Wire -----------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return (
            self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and not self.transport.is_closing()
            and self.conn.state is State.OPEN
        )

    def can_write(self) -> bool:
        return self.writable.is_set() and self.is_open

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def wait_writable(self) -> None:
        await self.writable.wait()  # uvicorn's flow control; set again when lost

    def connection_made(self, transport: Any) -> None:
        # Reached through an HTTP protocol's upgrade, which passes its own (already
        # closing-guarded) transport; guard it here too when used on its own.
        if not isinstance(transport, ClosingTransport):
            transport = ClosingTransport(transport, self.loop)
        super().connection_made(transport)

    def shutdown(self) -> None:
        drain = None
        if self.handshake_complete and not self.close_sent and not self.disconnected:
            drain = start_drain(self.app_state)
        if drain is None:
            super().shutdown()
            return
        # The app ends this stream itself (the answers' last frames, then close 1012);
        # uvicorn's own 1012 follows for a connection the app could not end.
        drain.add_done_callback(lambda _: self._shutdown_after_drain())

    def _shutdown_after_drain(self) -> None:
        if not self.disconnected:
            super().shutdown()

    async def send(self, message: Any) -> None:
        if (
            message["type"] == "websocket.close"
            and not self.writable.is_set()
            and self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and self.initial_response is None
        ):
            # The peer stopped reading: uvicorn would wait for the buffer to drain
            # before writing the close frame, i.e. for ever. Queue the frame behind
            # the rest and close; the transport is aborted if nothing moves.
            code = message.get("code", 1000)
            reason = message.get("reason") or ""
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.conn.send_close(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()
            return
        await super().send(message)

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                # The client's bug, not ours: one line, no traceback.
                log.info("closing a WebSocket that sent invalid UTF-8 (1007)")
                self.frames = []
                self.conn.fail(1007, "invalid UTF-8")
                self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def keepalive_timeout(self) -> None:
        self.pong_timer = None
        self.pending_ping_payload = None
        if self.close_sent or self.transport.is_closing():
            return
        log.info("closing a WebSocket that missed a keepalive pong (1013)")
        # 1013 "try again later", as for any client that fell behind: reconnect.
        self.conn.fail(1013, "keepalive ping timeout")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.close()
