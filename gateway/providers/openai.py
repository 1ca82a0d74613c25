"""The OpenAI-compatible provider: streams from any server that speaks the Chat
Completions API (OpenAI, vLLM, Ollama, llama.cpp's server, ...).

The official ``openai`` SDK resolves the configuration (API key, base URL, and the
organisation, project and client headers it sends), but the streamed request itself
goes through :mod:`gateway.providers.http1`, a lean pooled HTTP/1.1 client on
``httptools``, and its body is read here: a small SSE parser and ``orjson``, one
:class:`Chunk` per network read. Tokens are the gateway's hot path: on the SDK's own
request path (httpx2, httpcore2, anyio, h11) the upstream read cost ~98 µs of CPU
per chunk at 200 streams, here ~25 (``bench/upstream_client.py``, docs/benchmarks.md).
Retries with backoff and ``Retry-After``, as the SDK does them, are done here.

This module and :mod:`gateway.providers.moderation` import ``openai``; every upstream
failure of a completion is translated into :class:`gateway.errors.UpstreamError` here
(:func:`_translate`).
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import openai
import orjson

from gateway.errors import UpstreamError
from gateway.providers.base import Chunk, CompletionRequest
from gateway.providers.http1 import (
    BadResponse,
    ConnectError,
    ConnectionClosed,
    ConnectTimeout,
    HTTPClientError,
    Response,
    StatusError,
    StreamingClient,
)

_DRAIN_TIMEOUT = 0.1
"""After ``[DONE]``, how long to wait for the end of the body so the connection can be
reused (the SDK does the same); the response is closed after that either way."""
_INITIAL_RETRY_DELAY = 0.5
_MAX_RETRY_DELAY = 8.0
"""Backoff between retries, as the SDK's: 0.5 s doubling up to 8 s, less up to 25 %
jitter, unless the server said how long to wait (``Retry-After``, up to 60 s)."""
_RETRY_STATUSES = frozenset({408, 409, 429})


class SSEParser:
    """Incremental Server-Sent Events parser: bytes in, ``data`` payloads out. No I/O.

    ``feed()`` takes the body in arbitrary pieces and returns the data of every event
    completed by that piece, in order. Lines end with ``\\n`` or ``\\r\\n`` (a lone
    ``\\r`` is not treated as a line end; no Chat Completions server sends one). The
    ``data`` lines of an event are joined with ``\\n``, one space after ``data:`` is
    dropped, and a blank line dispatches the event. Comments (``:``) and the fields
    ``event``, ``id``, ``retry`` and unknown ones are ignored; so is an event without
    data lines. An event not ended by a blank line is never returned.
    """

    __slots__ = ("_data", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        """The unfinished last line."""
        self._data: list[bytes] = []
        """``data`` values of the event being read."""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add ``chunk`` of the body; return the payloads of the events it completes."""
        if self._tail:
            chunk = self._tail + chunk
        lines = chunk.split(b"\n")
        self._tail = lines.pop()
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = []
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line == b"data":
                data.append(b"")
        self._data = data
        return events


class _ReadDeadline:
    """Times out reads without an ``asyncio.timeout()`` (or a timer) per read.

    :meth:`arm` before a read only stores the new deadline; one timer per stream wakes
    up at the old deadline, sees that it moved and sleeps again until the new one.
    Only when a deadline passes while a read is in progress is the reading task
    cancelled, and :meth:`expired` tells that ``CancelledError`` apart from any
    other, like ``asyncio.timeout()`` does. Added CPU per read, measured with uvloop
    (plain asyncio) on Python 3.11: 0.4 (0.55) µs here, 2.9 (3.9) µs for an
    ``asyncio.timeout()`` per read, 1.4 (2.3) µs for one ``asyncio.timeout()`` per
    stream moved with ``reschedule()`` (which replaces the timer handle each time, and
    must be disarmed around every ``yield``).
    """

    __slots__ = (
        "_cancelling",
        "_handle",
        "_loop",
        "_reading",
        "_task",
        "_timer_at",
        "_when",
        "fired",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._when = 0.0
        """Deadline of the current read."""
        self._timer_at = 0.0
        """When the timer (``_handle``) fires."""
        self._reading = False
        self.fired = False
        """Whether the deadline passed during a read (and the task was cancelled)."""

    def arm(self, timeout: float) -> None:
        """A read is about to start; it must end within ``timeout`` seconds."""
        task = asyncio.current_task()
        self._task = task
        self._cancelling = task.cancelling()  # type: ignore[union-attr]
        self._when = when = self._loop.time() + timeout
        self._reading = True
        if self._handle is None:
            self._start_timer(when)
        elif when < self._timer_at:  # moved earlier (first token in): wake up earlier
            self._handle.cancel()
            self._start_timer(when)

    def disarm(self) -> None:
        """The read ended."""
        self._reading = False

    def expired(self) -> bool:
        """After a read raised: whether this deadline cancelled it (and nothing else did).

        Call once per exception; it consumes the cancellation request made here
        (``Task.uncancel()``). False when the task was also cancelled from outside, so
        that that ``CancelledError`` keeps propagating.
        """
        if not self.fired:
            return False
        self.fired = False
        return self._task.uncancel() <= self._cancelling  # type: ignore[union-attr]

    def close(self) -> None:
        self._reading = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _start_timer(self, when: float) -> None:
        self._timer_at = when
        self._handle = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        self._handle = None
        if not self._reading:
            return  # the next arm() starts a timer again
        remaining = self._when - self._loop.time()
        if remaining > 0.001:  # the deadline moved (or the timer fired a little early)
            self._start_timer(self._when)
            return
        self.fired = True
        self._task.cancel()  # type: ignore[union-attr]


class OpenAIProvider:
    """Streams chat completions from ``base_url`` (or what the SDK resolves: the
    ``OPENAI_BASE_URL`` environment variable, else OpenAI).

    Timeouts: ``first_token_timeout`` bounds the wait for the response (retries
    included) and then each read until the first text; ``token_timeout`` bounds each
    gap between reads after that. Retries (at most ``max_retries``) only happen while no
    response has arrived, so nothing is ever retried after a token reached a client.
    ``ssl_context`` replaces the default trust store for ``https`` (tests use their own
    certificate authority).
    """

    name = "openai"
    default_model = "gpt-4o-mini"

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        connect_timeout: float = 10.0,
        first_token_timeout: float = 60.0,
        token_timeout: float = 30.0,
        max_retries: int = 2,
        max_connections: int = 1000,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.first_token_timeout = first_token_timeout
        self.token_timeout = token_timeout
        self.max_retries = max_retries
        # Local servers (Ollama, vLLM) accept any key, but the SDK insists on one.
        self._sdk = openai.AsyncOpenAI(api_key=api_key or "not-needed", base_url=base_url)
        headers = {
            name: value
            for name, value in {**self._sdk.default_headers, **self._sdk.auth_headers}.items()
            if isinstance(value, str) and name.lower() not in ("accept", "content-type")
        }
        headers["Accept"] = "text/event-stream"
        self._http = StreamingClient(
            str(self._sdk.base_url),
            headers,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            ssl_context=ssl_context,
        )

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        body = orjson.dumps(
            {
                "model": request.model,
                "messages": request.messages,
                "temperature": request.temperature,
                "max_tokens": request.max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        try:
            async with asyncio.timeout(self.first_token_timeout):
                response = await self._request(body, request.headers)
        except TimeoutError:
            raise UpstreamError(
                f"no response from the model within {self.first_token_timeout:g} s",
                code="upstream_timeout",
            ) from None
        except HTTPClientError as exc:
            raise _translate(exc) from exc

        deadline = _ReadDeadline(asyncio.get_running_loop())
        feed = SSEParser().feed
        read = response.read
        timeout = self.first_token_timeout
        try:
            while True:
                deadline.arm(timeout)
                try:
                    data = await read()
                except (asyncio.CancelledError, Exception) as exc:
                    if deadline.expired():
                        raise UpstreamError(
                            f"the model sent nothing for {timeout:g} s", code="upstream_timeout"
                        ) from None
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    raise _translate(exc) from exc
                finally:
                    deadline.disarm()
                if not data:
                    return  # no [DONE]; the caller decides whether the answer is complete
                payloads = feed(data)
                if not payloads:
                    continue
                chunk, done, error = _read_events(payloads)
                if chunk is not None:
                    if chunk.text:  # the role-only opening chunk does not count as a token
                        timeout = self.token_timeout
                    yield chunk
                if error is not None:
                    raise error
                if done:
                    await _drain(read, deadline)
                    return
        finally:
            deadline.close()
            # Closing the response (not draining it) makes the upstream stop generating;
            # a body read to its end leaves the connection to the pool.
            await response.aclose()

    async def _request(self, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST the completion request, retrying as the SDK does; the response once its
        head came."""
        retries = 0
        while True:
            try:
                return await self._http.post("/chat/completions", body, "application/json", headers)
            except HTTPClientError as exc:
                if retries >= self.max_retries or not _retryable(exc):
                    raise
                delay = _retry_delay(exc, retries)
            retries += 1
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._sdk.close()


async def _drain(read: Callable[[], Awaitable[bytes]], deadline: _ReadDeadline) -> None:
    """Read the rest of the body after ``[DONE]`` (normally just the end of the chunked
    encoding, mostly in the same read), so that the connection can be reused; give up
    quietly after a while."""
    try:
        while True:
            deadline.arm(_DRAIN_TIMEOUT)
            try:
                if not await read():
                    return
            finally:
                deadline.disarm()
    except (asyncio.CancelledError, Exception) as exc:
        # A timeout or a broken body: the answer is complete, the connection is just
        # not reused. A cancellation from outside goes on.
        if not deadline.expired() and isinstance(exc, asyncio.CancelledError):
            raise


def _read_events(payloads: list[bytes]) -> tuple[Chunk | None, bool, UpstreamError | None]:
    """The events of one network read as one :class:`Chunk` (their texts joined, the
    last finish reason and usage), whether ``[DONE]`` came, and the error an event
    reported or caused; the chunk holds what came before that error."""
    if len(payloads) == 1 and not payloads[0].startswith(b"[DONE]"):  # the common case
        try:
            return _parse_event(payloads[0]), False, None
        except UpstreamError as exc:
            return None, False, exc
    texts: list[str] = []
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done = False
    error: UpstreamError | None = None
    for payload in payloads:
        if payload.startswith(b"[DONE]"):
            done = True
            break
        try:
            chunk = _parse_event(payload)
        except UpstreamError as exc:
            error = exc
            break
        if chunk is None:
            continue
        if chunk.text:
            texts.append(chunk.text)
        if chunk.finish_reason is not None:
            finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    if not texts and finish_reason is None and usage is None:
        return None, done, error
    text = texts[0] if len(texts) == 1 else "".join(texts)
    return Chunk(text, finish_reason, usage), done, error


def _parse_event(payload: bytes) -> Chunk | None:
    """The :class:`Chunk` in one SSE ``data`` payload, or None when it carries nothing."""
    if not payload:
        return None
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(
            f"the model sent a malformed stream: {exc}: {payload[:200]!r}",
            code="upstream_bad_response",
        ) from None
    try:
        error = event.get("error")
        if error:  # OpenAI reports failures mid-stream like this
            message = error.get("message") if isinstance(error, dict) else None
            if not isinstance(message, str) or not message:
                message = f"an error occurred during streaming: {error!r}"
            raise UpstreamError(f"the model failed: {message}", code="upstream_error")
        usage = event.get("usage")
        choices = event.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            text = (delta.get("content") if delta else None) or ""
            finish_reason = choice.get("finish_reason")
        elif usage is None:
            return None
        else:
            text, finish_reason = "", None
        if (
            type(text) is not str
            or (finish_reason is not None and type(finish_reason) is not str)
            or (usage is not None and type(usage) is not dict)
        ):
            raise TypeError("unexpected types")
    except (AttributeError, TypeError, KeyError, IndexError):
        raise UpstreamError(
            f"the model sent an unexpected chunk: {payload[:200]!r}",
            code="upstream_bad_response",
        ) from None
    if not text and finish_reason is None and usage is None:
        return None  # e.g. the role-only opening chunk
    return Chunk(text, finish_reason, usage)


def _retryable(exc: HTTPClientError) -> bool:
    """Whether the SDK would retry after ``exc``: connection failures, and statuses 408,
    409, 429 and 5xx, unless the server says otherwise (``x-should-retry``)."""
    if not isinstance(exc, StatusError):
        return True
    should = exc.headers.get("x-should-retry")
    if should in ("true", "false"):
        return should == "true"
    return exc.status in _RETRY_STATUSES or exc.status >= 500


def _retry_delay(exc: HTTPClientError, retries: int) -> float:
    """Seconds to wait before retry number ``retries + 1``, as the SDK computes them."""
    headers: Mapping[str, str] = exc.headers if isinstance(exc, StatusError) else {}
    wait = _retry_after(headers)
    if wait is not None and 0 < wait <= 60:
        return wait
    backoff = min(_INITIAL_RETRY_DELAY * 2.0**retries, _MAX_RETRY_DELAY)
    return backoff * (1 - 0.25 * random.random())


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms``, else ``retry-after`` (seconds or an HTTP date), in seconds."""
    try:
        return float(headers["retry-after-ms"]) / 1000
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError):
        return None


def _translate(exc: Exception) -> UpstreamError:
    """Map an exception of the HTTP client onto the gateway's error tree."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, StatusError):
        detail = _detail(exc.status, exc.body)
        if exc.status == 429:
            return UpstreamError(
                f"the model's rate limit was hit: {detail}",
                code="upstream_rate_limited",
                status=429,
            )
        return UpstreamError(
            f"the model answered HTTP {exc.status}: {detail}", code="upstream_error"
        )
    if isinstance(exc, ConnectTimeout):
        return UpstreamError("the model timed out", code="upstream_timeout")
    if isinstance(exc, ConnectError | ConnectionClosed):
        return UpstreamError(f"cannot reach the model: {exc}", code="upstream_unavailable")
    if isinstance(exc, BadResponse):
        return UpstreamError(
            f"the model sent a malformed stream: {exc}", code="upstream_bad_response"
        )
    return UpstreamError(f"the model stream failed: {exc!r}", code="upstream_error")


def _detail(status: int, body: bytes) -> str:
    """The message of an error response, as the SDK words it: the ``message`` of its
    ``error`` object, else ``Error code: N - <body>``."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = body.decode("utf-8", "replace")
    error = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return f"Error code: {status}" + (f" - {data}" if data not in (None, "") else "")
