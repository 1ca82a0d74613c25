"""A lean, pooled HTTP/1.1 client for one upstream, made for long streamed responses.

Why not httpx2 (under the ``openai`` SDK) or aiohttp on the token path: per network
read httpx2 goes through httpcore2, anyio (a cancel scope per read) and h11's pure
Python parsing; aiohttp is lighter but still wraps each read in its stream reader and
payload machinery. Here an :class:`asyncio.Protocol` feeds ``httptools`` (llhttp, the
parser of Node.js and of uvicorn, in C) and a read is one future:
``bench/upstream_client.py`` measured the CPU per streamed chunk and per request of
all three (docs/benchmarks.md, "Upstream client").

What it does: ``http`` and ``https`` (certificate and host name verified with the
default trust store, or a given :class:`ssl.SSLContext`), any base path, keep-alive
connections reused (at most ``max_connections`` open, idle ones included),
``Content-Length``, chunked and read-until-close bodies, ``gzip`` and ``deflate``
content encodings, a connect timeout. A reused connection that turns out to be closed
before any byte of the answer came is replaced once, at once (servers close idle
connections whenever they like). What it does not: proxies, redirects, HTTP/2,
``Expect: 100-continue``; other timeouts are the caller's (the provider arms one
deadline per read, see ``_ReadDeadline``).

Errors: :class:`ConnectError` (including the connect timeout, :class:`ConnectTimeout`),
:class:`ConnectionClosed`, :class:`BadResponse` and :class:`StatusError`; the provider
maps them onto the gateway's error tree. Nothing here knows about OpenAI.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections.abc import Mapping
from urllib.parse import urlsplit

import httptools

_PAUSE_AT = 1 << 20
"""Body bytes buffered unread before the connection stops reading (flow control)."""
_ERROR_BODY_LIMIT = 1 << 16
"""At most this much of an error response's body is kept for the message."""


class HTTPClientError(Exception):
    """Base of this module's errors."""


class ConnectError(HTTPClientError):
    """Could not open a connection (name resolution, refused, TLS handshake, ...)."""


class ConnectTimeout(ConnectError):
    """Opening a connection took longer than the connect timeout."""


class ConnectionClosed(HTTPClientError):
    """The connection broke before the response was complete."""


class BadResponse(HTTPClientError):
    """The response is not valid HTTP/1.1, or its body cannot be decoded."""


class StatusError(HTTPClientError):
    """The response has a status outside 2xx; ``body`` is its start (at most 64 KiB)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.headers = headers
        self.body = body


class _Connection(asyncio.Protocol):
    """One connection and the exchange in progress on it."""

    __slots__ = (
        "_buffered",
        "_gone",
        "_paused",
        "body",
        "closed",
        "complete",
        "error",
        "head",
        "headers",
        "keep_alive",
        "parser",
        "received",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.head: asyncio.Future[None] | None = None
        """Resolved when the response head is complete."""
        self.waiter: asyncio.Future[None] | None = None
        """Set while a reader waits for body bytes."""
        self.body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.complete = False
        self.received = False
        """Whether any byte of the current response arrived."""
        self.error: HTTPClientError | None = None
        self.closed = False
        """Closing or closed: never reused."""
        self._gone: asyncio.Future[None] | None = None
        """Resolved by ``connection_lost``."""

    # ---------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None or self.complete:  # nothing was asked: the connection is unusable
            self.close()
            return
        self.received = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"malformed HTTP response: {exc}"))
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
        if not self._gone.done():
            self._gone.set_result(None)
        if self.parser is not None and not self.complete:
            if self.head is not None and self.head.done() and self._ends_at_close():
                self.complete = True  # a body without length ends with the connection
            else:
                reason = f": {exc}" if exc is not None else ""
                self._fail(ConnectionClosed(f"the server closed the connection{reason}"))
        self._wake()

    def eof_received(self) -> None:
        self.closed = True  # never reused; the transport closes (connection_lost follows)

    def pause_writing(self) -> None:  # a request body is small: nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # ---------------------------------------------------------------- httptools

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        self.status = parser.get_status_code()
        self.keep_alive = parser.should_keep_alive()
        head = self.head
        if head is not None and not head.done():
            head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_AT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    # ---------------------------------------------------------------- exchange

    def start(self, request: bytes) -> asyncio.Future[None]:
        """Send ``request``; the returned future resolves when the response head came."""
        self.parser = httptools.HttpResponseParser(self)
        self.head = asyncio.get_running_loop().create_future()
        self.body.clear()
        self._buffered = 0
        self.headers = {}
        self.status = 0
        self.complete = self.received = False
        self.error = None
        self.transport.write(request)  # type: ignore[union-attr]
        return self.head

    async def read(self) -> bytes:
        """Body bytes received since the last call (raw, still content-encoded);
        ``b""`` at the end of the body. Raises the error that broke the exchange
        once the bytes before it were read."""
        body = self.body
        while not body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            waiter = self.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self.waiter = None
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        """Close at once: no TLS goodbye, nothing left to flush matters."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Until the socket is really closed (the loop does that on its next turn)."""
        if self.transport is None:
            return
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_future()
        await self._gone

    def _ends_at_close(self) -> bool:
        headers = self.headers
        return "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", ""
        )

    def _fail(self, error: HTTPClientError) -> None:
        if self.error is None:
            self.error = error
        head = self.head
        if head is not None and not head.done():
            head.set_exception(error)
            head.exception()  # retrieved: a caller that went away must not warn
        self.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Decoder:
    """``gzip`` or ``deflate`` (zlib or raw, as servers differ) content decoding."""

    __slots__ = ("_first", "_zlib")

    def __init__(self, encoding: str) -> None:
        self._first = encoding == "deflate"
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else 0)

    def decode(self, data: bytes) -> bytes:
        try:
            if self._first:  # deflate: zlib-wrapped as the RFC says, or raw as some send
                self._first = False
                try:
                    return self._zlib.decompress(data)
                except zlib.error:
                    self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._zlib.decompress(data)
        except zlib.error as exc:
            raise BadResponse(f"the body cannot be decoded: {exc}") from None

    def flush(self) -> bytes:
        try:
            return self._zlib.flush()
        except zlib.error as exc:
            raise BadResponse(f"the body cannot be decoded: {exc}") from None


class Response:
    """A response whose head came; the body is read with :meth:`read`.

    End it with :meth:`aclose`: a complete body leaves the connection to the pool,
    anything else closes it at once.
    """

    __slots__ = ("_client", "_conn", "_decoder", "_done", "headers", "status")

    def __init__(self, client: StreamingClient, conn: _Connection) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = conn.headers
        encoding = conn.headers.get("content-encoding", "identity").strip().lower()
        self._decoder = _Decoder(encoding) if encoding in ("gzip", "deflate") else None
        self._done = False

    async def read(self) -> bytes:
        """The body bytes of the next network read(s), decoded; ``b""`` at its end."""
        conn = self._conn
        if conn is None or self._done:
            return b""
        data = await conn.read()
        decoder = self._decoder
        if decoder is None:
            if not data:
                self._done = True
            return data
        if data:
            return decoder.decode(data)
        self._done = True
        return decoder.flush()

    async def aclose(self) -> None:
        """Give the connection back when the body was read to its end, else close it
        and return once the socket is closed (so the server sees it at once)."""
        conn, self._conn = self._conn, None
        if conn is not None and not self._client._release(conn):
            await conn.wait_closed()


class StreamingClient:
    """Sends requests to one origin (``base_url``'s scheme, host and port), each path
    under ``base_url``'s path, with ``headers`` on every request."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        connect_timeout: float = 10.0,
        max_connections: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        tls = url.scheme == "https"
        self._port = url.port or (443 if tls else 80)
        self._ssl = (ssl_context or ssl.create_default_context()) if tls else None
        self._prefix = url.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        if url.port is not None:
            host = f"{host}:{url.port}"
        fixed = {"host": host, "accept-encoding": "gzip, deflate", "connection": "keep-alive"}
        fixed.update((name.lower(), value) for name, value in headers.items())
        self._head_lines = "".join(f"{name}: {value}\r\n" for name, value in fixed.items())
        self.connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[_Connection] = []
        self._closed = False

    async def post(
        self, path: str, body: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> Response:
        """POST ``body`` to ``path`` (under the base path), with ``headers`` besides the
        client's; the :class:`Response` once its head came. Raises :class:`StatusError`
        for a status outside 2xx."""
        if self._closed:
            raise ConnectError("the client is closed")
        extra = (
            "".join(f"{name}: {value}\r\n" for name, value in headers.items()) if headers else ""
        )
        request = (
            f"POST {self._prefix}{path} HTTP/1.1\r\n{self._head_lines}{extra}"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode("latin-1") + body
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_connections)
        await self._slots.acquire()
        conn: _Connection | None = None
        try:
            while True:
                conn, reused = await self._connection()
                try:
                    await conn.start(request)
                    break
                except ConnectionClosed:
                    # A kept-alive connection the server had closed meanwhile: once
                    # more on a new one. A new connection failing is an answer.
                    if not reused or conn.received:
                        raise
            if not 200 <= conn.status < 300:
                raise StatusError(conn.status, conn.headers, await _error_body(conn))
            response = Response(self, conn)
            conn = None
            return response
        except BaseException:
            if conn is not None:
                conn.close()
            self._slots.release()
            raise

    async def _connection(self) -> tuple[_Connection, bool]:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    _Connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectTimeout(
                f"connecting to {self._host}:{self._port} took over {self.connect_timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return conn, False

    def _release(self, conn: _Connection) -> bool:
        """Pool ``conn`` (True) or close it (False); its slot is free again either way."""
        if self._slots is not None:
            self._slots.release()
        if conn.reusable() and not self._closed:
            conn.parser = None
            self._idle.append(conn)
            return True
        conn.close()
        return False

    async def aclose(self) -> None:
        """Close the idle connections; responses still open close when they end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


async def _error_body(conn: _Connection) -> bytes:
    """The start of an error response's body (the caller bounds the wait)."""
    parts: list[bytes] = []
    size = 0
    try:
        while size < _ERROR_BODY_LIMIT and (data := await conn.read()):
            parts.append(data)
            size += len(data)
    except HTTPClientError:
        pass  # what came is enough for a message
    body = b"".join(parts)[:_ERROR_BODY_LIMIT]
    encoding = conn.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        try:
            body = _Decoder(encoding).decode(body)
        except BadResponse:
            body = b""
    return body
