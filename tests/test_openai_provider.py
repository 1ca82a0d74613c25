"""OpenAIProvider against real servers: the fake upstream, plus a raw TCP server for
bodies the fake cannot send (CRLF, mid-stream error objects, a cut chunked body).
The SSE parser is unit-tested with literal bytes."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import ssl as ssl_module
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme

from gateway.errors import UpstreamError
from gateway.providers.base import Chunk, CompletionRequest
from gateway.providers.openai import OpenAIProvider, SSEParser, _parse_event
from gateway.testing.fake_upstream import FakeUpstream, FakeUpstreamServer, Scenario
from tests.conftest import scaled

REQUEST = CompletionRequest(
    model="fake-model",
    messages=[{"role": "user", "content": "hello there"}],
    temperature=0.5,
    max_tokens=1000,
)


@pytest.fixture
async def make_provider(
    upstream_server: FakeUpstreamServer, upstream: FakeUpstream
) -> AsyncIterator[Callable[..., OpenAIProvider]]:
    """``make_provider(**options)``: a provider for the fake upstream, closed afterwards."""
    providers: list[OpenAIProvider] = []

    def make(base_url: str | None = None, **options: Any) -> OpenAIProvider:
        options.setdefault("max_retries", 0)
        provider = OpenAIProvider(
            api_key="k", base_url=base_url or upstream_server.base_url, **options
        )
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()


async def consume(
    provider: OpenAIProvider, request: CompletionRequest = REQUEST
) -> tuple[list[Chunk], UpstreamError | None]:
    """All chunks of one stream, and the error that ended it (if any)."""
    chunks: list[Chunk] = []
    try:
        async for chunk in provider.stream(request):
            chunks.append(chunk)
    except UpstreamError as exc:
        return chunks, exc
    return chunks, None


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def assert_ordered(chunks: list[Chunk]) -> None:
    """Text never follows the finish reason, nor anything the usage; no empty chunk."""
    finish_at = next(i for i, c in enumerate(chunks) if c.finish_reason)
    assert all(not c.text for c in chunks[finish_at + 1 :])
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.text or c.finish_reason or c.usage for c in chunks)


# --------------------------------------------------------------------------- fake upstream


async def test_streams_tokens_in_order_then_finish_reason_and_usage(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["Hello", ", ", "wörld", ' "quoted"\n'], delay=0.02))
    chunks, error = await consume(make_provider())

    assert error is None
    assert text(chunks) == 'Hello, wörld "quoted"\n'
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert chunks[-1].usage == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert_ordered(chunks)

    (recorded,) = upstream.requests
    assert recorded.headers["authorization"] == "Bearer k"
    assert recorded.body["stream"] is True
    assert recorded.body["stream_options"] == {"include_usage": True}
    assert recorded.body["max_tokens"] == 1000
    assert recorded.body["model"] == "fake-model"
    assert recorded.body["messages"] == REQUEST.messages
    assert recorded.outcome == "completed"


async def test_max_tokens_ends_with_length(make_provider: Any, upstream: FakeUpstream) -> None:
    upstream.script(Scenario(count=10))
    request = CompletionRequest(model="m", messages=REQUEST.messages, temperature=0, max_tokens=3)
    chunks, error = await consume(make_provider(), request)
    assert error is None
    assert text(chunks) == "tok0 tok1 tok2 "
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage["completion_tokens"] == 3


async def test_many_tokens_and_sequential_streams(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    provider = make_provider()
    upstream.script(Scenario(count=500), Scenario(count=3))
    first, error = await consume(provider)
    assert error is None
    assert text(first) == "".join(f"tok{i} " for i in range(500))
    second, error = await consume(provider)
    assert error is None
    assert text(second) == "tok0 tok1 tok2 "


@pytest.mark.parametrize(
    ("scenario", "code", "partial"),
    [
        (Scenario(fault="500"), "upstream_error", ""),
        (Scenario(fault="429"), "upstream_rate_limited", ""),
        (Scenario(count=5, fault="garbage", fault_after=2), "upstream_bad_response", "tok0 tok1 "),
        # A body that ends cleanly without a finish reason is not an error here:
        # gateway.generation raises upstream_truncated when no finish_reason came.
        (Scenario(count=5, fault="truncate", fault_after=3), None, "tok0 tok1 tok2 "),
    ],
    ids=["http-500", "http-429", "garbage", "truncate"],
)
async def test_faults_map_to_upstream_errors(
    make_provider: Any,
    upstream: FakeUpstream,
    scenario: Scenario,
    code: str | None,
    partial: str,
) -> None:
    upstream.script(scenario)
    chunks, error = await consume(make_provider())
    assert text(chunks) == partial
    assert all(c.finish_reason is None for c in chunks)
    if code is None:
        assert error is None
    else:
        assert error is not None
        assert error.code == code
    if code == "upstream_rate_limited":
        assert error is not None and error.status == 429
    if code == "upstream_error":
        assert error is not None and "HTTP 500" in error.message


async def test_first_token_timeout(make_provider: Any, upstream: FakeUpstream) -> None:
    # Headers and the role-only chunk arrive at once, then nothing.
    upstream.script(Scenario(count=5, fault="hang", fault_after=0))
    provider = make_provider(first_token_timeout=scaled(0.3), token_timeout=scaled(0.05))
    started = time.monotonic()
    chunks, error = await consume(provider)
    elapsed = time.monotonic() - started

    assert text(chunks) == ""
    assert error is not None and error.code == "upstream_timeout"
    assert f"{scaled(0.3):g} s" in error.message
    assert scaled(0.3) <= elapsed < scaled(0.3) + scaled(0.5)
    # The timeout's cancellation was consumed; the task is not left half-cancelled.
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    request = upstream.requests[-1]
    upstream.wait_until(lambda: request.disconnected_at is not None, timeout=scaled(2))


async def test_between_token_timeout(make_provider: Any, upstream: FakeUpstream) -> None:
    upstream.script(Scenario(count=5, fault="hang", fault_after=2))
    provider = make_provider(first_token_timeout=scaled(5), token_timeout=scaled(0.3))
    chunks, error = await consume(provider)
    timed_out_at = time.monotonic()

    assert text(chunks) == "tok0 tok1 "
    assert error is not None and error.code == "upstream_timeout"
    assert f"{scaled(0.3):g} s" in error.message
    request = upstream.requests[-1]
    assert request.last_token_at is not None
    assert scaled(0.3) - 0.01 <= timed_out_at - request.last_token_at < scaled(0.3) + scaled(0.5)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    upstream.wait_until(lambda: request.disconnected_at is not None, timeout=scaled(2))


async def test_slow_tokens_within_the_timeout_are_fine(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    # Each gap is below token_timeout, the whole stream far above it.
    upstream.script(Scenario(count=8, delay=0.05, first_delay=0.15))
    provider = make_provider(first_token_timeout=scaled(0.3), token_timeout=scaled(0.1))
    chunks, error = await consume(provider)
    assert error is None
    assert text(chunks) == "".join(f"tok{i} " for i in range(8))


async def test_cancelling_the_consumer_closes_the_response_at_once(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    # 1000 tokens at 10 ms: draining instead of closing would take ten seconds.
    upstream.script(Scenario(count=1000, delay=0.01))
    provider = make_provider()
    texts: list[str] = []
    three = asyncio.Event()

    async def consumer() -> None:
        async for chunk in provider.stream(REQUEST):
            texts.append(chunk.text)
            if "".join(texts).count(" ") >= 3:  # a read may carry several tokens
                three.set()

    task = asyncio.create_task(consumer())
    await asyncio.wait_for(three.wait(), scaled(5))
    cancelled_at = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    request = upstream.requests[-1]
    upstream.wait_until(lambda: request.disconnected_at is not None, timeout=scaled(2))
    assert request.disconnected_at is not None
    assert request.disconnected_at - cancelled_at < scaled(0.1)
    assert request.tokens_sent < 1000
    assert "".join(texts).startswith("tok0 tok1 tok2 ")


async def test_closing_the_iterator_closes_the_response_at_once(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=1000, delay=0.01))
    stream = make_provider().stream(REQUEST)
    texts: list[str] = []
    while "".join(texts).count(" ") < 3:  # a read may carry several tokens
        texts.append((await anext(stream)).text)
    closed_at = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]

    request = upstream.requests[-1]
    upstream.wait_until(lambda: request.disconnected_at is not None, timeout=scaled(2))
    assert request.disconnected_at is not None
    assert request.disconnected_at - closed_at < scaled(0.1)
    assert request.tokens_sent < 1000
    assert "".join(texts).startswith("tok0 tok1 tok2 ")


async def test_unreachable_upstream(make_provider: Any) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    chunks, error = await consume(make_provider(base_url=f"http://127.0.0.1:{port}/v1"))
    assert chunks == []
    assert error is not None and error.code == "upstream_unavailable"


@pytest.mark.parametrize(
    ("max_tokens", "sent", "finish_reason"), [(1000, 50, "stop"), (7, 7, "length")]
)
async def test_events_of_one_read_come_as_one_chunk(
    make_provider: Any, upstream: FakeUpstream, max_tokens: int, sent: int, finish_reason: str
) -> None:
    # The whole completion, role chunk to [DONE], in one write: one read, one chunk.
    upstream.script(Scenario(count=50, group=0))
    request = CompletionRequest(
        model="m", messages=REQUEST.messages, temperature=0, max_tokens=max_tokens
    )
    chunks, error = await consume(make_provider(), request)
    assert error is None
    usage = {"prompt_tokens": 2, "completion_tokens": sent, "total_tokens": 2 + sent}
    assert chunks == [Chunk("".join(f"tok{i} " for i in range(sent)), finish_reason, usage)]


async def test_events_written_together_stay_together_in_order(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    # Three tokens per write, 30 ms apart: each chunk holds whole writes, nothing lost.
    upstream.script(Scenario(count=12, group=3, delay=0.03))
    chunks, error = await consume(make_provider())
    assert error is None
    assert text(chunks) == "".join(f"tok{i} " for i in range(12))
    assert all(c.text.count(" ") % 3 == 0 for c in chunks)
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert chunks[-1].usage == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}
    assert_ordered(chunks)


async def test_retries_a_failed_request_before_the_first_token(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(fault="500"), Scenario(fault="429"), Scenario(count=3))
    started = time.monotonic()
    chunks, error = await consume(make_provider(max_retries=2))
    assert error is None
    assert text(chunks) == "tok0 tok1 tok2 "
    assert [r.outcome for r in upstream.requests] == ["error", "error", "completed"]
    # The SDK's backoff (the fake's "retry-after: 0" is not a wait): 0.5 s, then 1 s,
    # each less up to a quarter.
    assert time.monotonic() - started >= 0.375 + 0.75


async def test_no_retry_once_retries_are_used_up(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(fault="500"), Scenario(fault="500"), Scenario(count=3))
    chunks, error = await consume(make_provider(max_retries=1))
    assert chunks == []
    assert error is not None and error.code == "upstream_error"
    assert len(upstream.requests) == 2


async def test_connections_are_bounded_and_reused(
    make_provider: Any, upstream: FakeUpstream
) -> None:
    provider = make_provider(max_connections=1)
    upstream.script(Scenario(count=5, delay=0.02), Scenario(count=5, delay=0.02))
    results = await asyncio.gather(consume(provider), consume(provider))
    assert [text(chunks) for chunks, _ in results] == ["tok0 tok1 tok2 tok3 tok4 "] * 2
    first, second = upstream.requests
    assert first.completed_at is not None and second.started_at >= first.completed_at


# --------------------------------------------------------------------------- raw server


class RawServer:
    """A real TCP server that answers each HTTP request with fixed bytes.

    ``response`` may be a list: one response per request, the last one repeated.
    ``None`` never answers. After a response, ``then="close"`` closes the connection,
    ``"keep-alive"`` serves the next request on it, ``"hold"`` keeps it open, sending
    nothing more, until the client goes away, and ``"drop-next"`` reads the next
    request on it and closes without answering (a kept-alive connection the server
    closed while the client was reusing it). ``ssl`` serves TLS.
    """

    def __init__(
        self,
        response: bytes | list[bytes] | None,
        *,
        then: str = "close",
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.responses = response if isinstance(response, list) else [response]
        self.then = then
        self.ssl = ssl
        self.requests: list[bytes] = []
        self.connections = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for writer in self._writers:  # connections a client keeps alive end here
            writer.transport.abort()
        await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        body = await reader.readexactly(int(length.group(1))) if length else b""
        return head + body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        self._writers.add(writer)
        self.connections += 1
        try:
            while True:
                self.requests.append(await self._read_request(reader))
                response = self.responses[min(len(self.requests), len(self.responses)) - 1]
                if response is not None:
                    writer.write(response)
                    await writer.drain()
                if response is None or self.then == "hold":
                    await reader.read()  # until the client goes away
                    return
                if self.then == "drop-next":
                    self.requests.append(await self._read_request(reader))
                    return
                if self.then == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ssl_module.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl_module.SSLError):
                await writer.wait_closed()


def sse_response(*pieces: bytes, complete: bool = True, keep_alive: bool = False) -> bytes:
    """An HTTP/1.1 event-stream response, one chunked-encoding chunk per piece."""
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n"
        + (b"" if keep_alive else b"connection: close\r\n")
        + b"\r\n"
    )
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    return head + body + (b"0\r\n\r\n" if complete else b"")


def token_event(content: str, finish_reason: str | None = None, eol: bytes = b"\n") -> bytes:
    delta = f'{{"content":"{content}"}}' if content else "{}"
    finish = f'"{finish_reason}"' if finish_reason else "null"
    payload = f'{{"id":"x","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}'
    return b"data: " + payload.encode() + eol + eol


async def test_crlf_comments_and_split_events_over_http(make_provider: Any) -> None:
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\r\n\r\n'
    pieces = [
        b": keep-alive\r\n\r\n",
        b'data: {"choices":[{"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
        b"\r\n\r\n" + token_event("Hel", eol=b"\r\n")[:20],
        token_event("Hel", eol=b"\r\n")[20:] + token_event("lo", eol=b"\r\n"),
        token_event("", "stop", eol=b"\r\n") + usage + b"data: [DONE]\r\n\r\n",
    ]
    async with RawServer(sse_response(*pieces)) as server:
        chunks, error = await consume(make_provider(base_url=server.base_url))
    assert error is None
    assert text(chunks) == "Hello"
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert chunks[-1].usage == {"prompt_tokens": 1, "completion_tokens": 2}
    assert_ordered(chunks)


async def test_connection_is_reused_after_done(make_provider: Any) -> None:
    response = sse_response(token_event("a", "stop"), b"data: [DONE]\n\n", keep_alive=True)
    async with RawServer(response, then="keep-alive") as server:
        provider = make_provider(base_url=server.base_url)
        for _ in range(3):
            chunks, error = await consume(provider)
            assert error is None and chunks == [Chunk("a", "stop")]
        await provider.aclose()
    assert len(server.requests) == 3
    assert server.connections == 1


async def test_body_not_ended_after_done_is_closed_soon(make_provider: Any) -> None:
    # [DONE] arrives but the body never ends: wait briefly for its end (to reuse the
    # connection), then close it without an error.
    response = sse_response(token_event("a", "stop"), b"data: [DONE]\n\n", complete=False)
    async with RawServer(response, then="hold") as server:
        started = time.monotonic()
        chunks, error = await consume(make_provider(base_url=server.base_url))
        elapsed = time.monotonic() - started
    assert error is None and chunks == [Chunk("a", "stop")]
    assert elapsed < scaled(0.5)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        # Some servers send raw deflate (no zlib wrapper) as "deflate".
        ("deflate", lambda data: zlib.compress(data, wbits=-zlib.MAX_WBITS)),
    ],
    ids=["gzip", "deflate", "raw-deflate"],
)
async def test_encoded_body(
    make_provider: Any, encoding: str, compress: Callable[[bytes], bytes]
) -> None:
    body = compress(token_event("zip") + token_event("", "stop") + b"data: [DONE]\n\n")
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-encoding: %s\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (encoding.encode(), len(body), body)
    )
    async with RawServer(response) as server:
        chunks, error = await consume(make_provider(base_url=server.base_url))
    assert error is None
    assert text(chunks) == "zip"
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert b"accept-encoding: gzip, deflate" in server.requests[0].lower()


@pytest.mark.parametrize(
    ("pieces", "complete", "code", "message"),
    [
        (
            [
                token_event("a"),
                b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n',
            ],
            True,
            "upstream_error",
            "overloaded",
        ),
        ([token_event("a"), token_event("b")[:30]], False, "upstream_unavailable", ""),
        ([token_event("a"), b"data: [1, 2]\n\n"], True, "upstream_bad_response", "[1, 2]"),
        (
            [token_event("a"), b'data: {"choices":[{"delta":{"content":7}}]}\n\n'],
            True,
            "upstream_bad_response",
            "",
        ),
    ],
    ids=["error-object", "cut-chunked-body", "not-an-object", "content-not-a-string"],
)
async def test_mid_stream_failures_over_http(
    make_provider: Any, pieces: list[bytes], complete: bool, code: str, message: str
) -> None:
    async with RawServer(sse_response(*pieces, complete=complete)) as server:
        chunks, error = await consume(make_provider(base_url=server.base_url))
    assert chunks == [Chunk("a")]
    assert error is not None and error.code == code
    assert message in error.message


async def test_no_response_times_out(make_provider: Any) -> None:
    async with RawServer(None) as server:
        provider = make_provider(base_url=server.base_url, first_token_timeout=scaled(0.3))
        started = time.monotonic()
        chunks, error = await consume(provider)
        elapsed = time.monotonic() - started
    assert chunks == []
    assert error is not None and error.code == "upstream_timeout"
    assert error.message == f"no response from the model within {scaled(0.3):g} s"
    assert scaled(0.3) <= elapsed < scaled(0.3) + scaled(0.5)


def status_response(status: bytes, body: bytes, *headers: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n%s\r\n%s"
        % (len(body), b"".join(h + b"\r\n" for h in headers), body)
    )


DONE_RESPONSE = sse_response(token_event("a", "stop"), b"data: [DONE]\n\n", keep_alive=True)


async def test_retry_after_is_honoured(make_provider: Any) -> None:
    limited = status_response(
        b"429 Too Many Requests", b'{"error":{"message":"slow down"}}', b"retry-after: 1"
    )
    async with RawServer([limited, DONE_RESPONSE]) as server:
        started = time.monotonic()
        chunks, error = await consume(make_provider(base_url=server.base_url, max_retries=1))
        elapsed = time.monotonic() - started
    assert error is None and chunks == [Chunk("a", "stop")]
    assert len(server.requests) == 2
    assert elapsed >= 1.0  # the backoff alone would have waited at most 0.5 s


@pytest.mark.parametrize(
    ("response", "code", "message"),
    [
        (
            status_response(b"400 Bad Request", b'{"error":{"message":"no such model"}}'),
            "upstream_error",
            "the model answered HTTP 400: no such model",
        ),
        (
            status_response(b"503 Service Unavailable", b"down", b"x-should-retry: false"),
            "upstream_error",
            "the model answered HTTP 503: Error code: 503 - down",
        ),
        (
            status_response(b"429 Too Many Requests", b"{}", b"x-should-retry: false"),
            "upstream_rate_limited",
            "the model's rate limit was hit: Error code: 429 - {}",
        ),
    ],
    ids=["400", "503-should-not-retry", "429-should-not-retry"],
)
async def test_status_errors_not_retried(
    make_provider: Any, response: bytes, code: str, message: str
) -> None:
    async with RawServer(response) as server:
        chunks, error = await consume(make_provider(base_url=server.base_url, max_retries=2))
    assert chunks == []
    assert error is not None and (error.code, error.message) == (code, message)
    assert len(server.requests) == 1


async def test_request_goes_to_the_base_path_with_the_key(make_provider: Any) -> None:
    async with RawServer(DONE_RESPONSE) as server:
        base_url = f"http://127.0.0.1:{server.port}/some/prefix/v1/"
        chunks, error = await consume(make_provider(base_url=base_url))
    assert error is None and chunks == [Chunk("a", "stop")]
    (request,) = server.requests
    head = request.split(b"\r\n\r\n")[0].decode().lower().split("\r\n")
    assert head[0] == "post /some/prefix/v1/chat/completions http/1.1"
    assert f"host: 127.0.0.1:{server.port}" in head
    assert "authorization: bearer k" in head
    assert "accept: text/event-stream" in head


async def test_a_pooled_connection_closed_by_the_server_is_replaced(make_provider: Any) -> None:
    # The second request goes out on the kept-alive connection, which the server then
    # closes without answering: it is sent again on a new one, not failed (no retries).
    async with RawServer(DONE_RESPONSE, then="drop-next") as server:
        provider = make_provider(base_url=server.base_url)
        for _ in range(2):
            chunks, error = await consume(provider)
            assert error is None and chunks == [Chunk("a", "stop")]
    assert len(server.requests) == 3
    assert server.connections == 2


@pytest.fixture(scope="module")
def tls_ca() -> trustme.CA:
    return trustme.CA()


async def test_https_with_a_verified_certificate(make_provider: Any, tls_ca: trustme.CA) -> None:
    server_ssl = ssl_module.create_default_context(ssl_module.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    client_ssl = ssl_module.create_default_context()
    tls_ca.configure_trust(client_ssl)
    async with RawServer(DONE_RESPONSE, then="keep-alive", ssl=server_ssl) as server:
        provider = make_provider(base_url=server.base_url, ssl_context=client_ssl)
        for _ in range(2):
            chunks, error = await consume(provider)
            assert error is None and chunks == [Chunk("a", "stop")]
        # Not trusted by the default trust store: refused, not sent.
        chunks, error = await consume(make_provider(base_url=server.base_url))
    assert chunks == []
    assert error is not None and error.code == "upstream_unavailable"
    assert "CERTIFICATE_VERIFY_FAILED" in error.message
    assert len(server.requests) == 2
    assert server.connections == 1  # reused; the refused handshake never got this far


# --------------------------------------------------------------------------- SSE parser

SSE_CASES: list[tuple[str, bytes, list[bytes]]] = [
    ("one event", b'data: {"a":1}\n\n', [b'{"a":1}']),
    ("two events", b"data: 1\n\ndata: 2\n\n", [b"1", b"2"]),
    ("crlf", b"data: 1\r\n\r\ndata: 2\r\n\r\n", [b"1", b"2"]),
    ("mixed line ends", b"data: 1\r\n\ndata: 2\n\r\n", [b"1", b"2"]),
    ("multi-line data", b"data: a\ndata: b\r\ndata:\n\n", [b"a\nb\n"]),
    ("no space after colon", b"data:x\n\n", [b"x"]),
    ("only one space stripped", b"data:  x \n\n", [b" x "]),
    ("field without colon", b"data\n\n", [b""]),
    ("comments", b": ping\n\n:\ndata: x\n: more\n\n", [b"x"]),
    (
        "other fields ignored",
        b"event: message\nid: 7\nretry: 100\nfoo: bar\ndatax: no\ndata: x\n\n",
        [b"x"],
    ),
    ("event without data", b"event: ping\n\ndata: x\n\n", [b"x"]),
    ("blank lines", b"\n\n\r\n\ndata: x\n\n\n", [b"x"]),
    ("done", b"data: [DONE]\n\n", [b"[DONE]"]),
    ("colon in value", b"data: a: b\n\n", [b"a: b"]),
    ("unfinished event", b"data: 1\n\ndata: 2\n", [b"1"]),
    ("unfinished line", b"data: 1\n\ndata: 2", [b"1"]),
    ("utf-8", 'data: "wörld ✓"\n\n'.encode(), ['"wörld ✓"'.encode()]),
]


@pytest.mark.parametrize(
    ("stream", "expected"), [c[1:] for c in SSE_CASES], ids=[c[0] for c in SSE_CASES]
)
def test_sse_parser(stream: bytes, expected: list[bytes]) -> None:
    # In one piece, split in two at every byte boundary, and byte by byte.
    assert SSEParser().feed(stream) == expected
    for cut in range(len(stream) + 1):
        parser = SSEParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == expected, cut
    parser = SSEParser()
    events: list[bytes] = []
    for i in range(len(stream)):
        events += parser.feed(stream[i : i + 1])
    assert events == expected


def test_sse_parser_keeps_state_between_events() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"data: b\n") == []
    assert parser.feed(b"\ndata: c") == [b"a\nb"]
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\n\r") == []
    assert parser.feed(b"\n") == [b"c"]
    assert parser.feed(b"") == []


# --------------------------------------------------------------------------- chunk parsing


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"choices":[{"delta":{"content":"hi"},"finish_reason":null}]}', Chunk("hi")),
        (b'{"choices":[{"delta":{"role":"assistant","content":""}}]}', None),
        (b'{"choices":[{"delta":{"content":null},"finish_reason":"stop"}]}', Chunk("", "stop")),
        (b'{"choices":[{"delta":{},"finish_reason":"length"}]}', Chunk("", "length")),
        (b'{"choices":[{"finish_reason":"stop"}]}', Chunk("", "stop")),
        (b'{"choices":[],"usage":{"total_tokens":3}}', Chunk(usage={"total_tokens": 3})),
        (b'{"choices":[],"usage":null}', None),
        (
            b'{"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}],"usage":{"a":1}}',
            Chunk("x", "stop", {"a": 1}),
        ),
        (b"{}", None),
        (b"", None),
    ],
)
def test_parse_event(payload: bytes, expected: Chunk | None) -> None:
    assert _parse_event(payload) == expected


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "upstream_bad_response"),
        (b"[1]", "upstream_bad_response"),
        (b'{"choices":"x"}', "upstream_bad_response"),
        (b'{"choices":[{"delta":"x"}]}', "upstream_bad_response"),
        (b'{"choices":[{"delta":{"content":1}}]}', "upstream_bad_response"),
        (b'{"choices":[{"finish_reason":1}]}', "upstream_bad_response"),
        (b'{"choices":[],"usage":[1]}', "upstream_bad_response"),
        (b'{"error":{"message":"boom"}}', "upstream_error"),
        (b'{"error":"boom"}', "upstream_error"),
    ],
)
def test_parse_event_errors(payload: bytes, code: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        _parse_event(payload)
    assert caught.value.code == code
    if code == "upstream_error":
        assert "boom" in caught.value.message
