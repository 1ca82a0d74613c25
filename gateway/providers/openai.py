"""The OpenAI-compatible provider, on the official ``openai`` SDK.

This module (and :mod:`gateway.providers.moderation`) imports ``openai``; its
exceptions are translated into :class:`gateway.errors.UpstreamError` here. Works with
any server that speaks the Chat Completions API (OpenAI, vLLM, Ollama, llama.cpp's server, ...).

The SDK sends the request through its generic ``post`` (auth, ``base_url``, retries,
HTTP status errors), but the streamed body is read here: raw bytes from httpx2, a
small SSE parser and ``orjson``. The SDK's own stream (SSE decoding in Python, a
``ChatCompletionChunk`` model per token) and an ``asyncio.timeout()`` per chunk cost
several times more CPU per token than this path; tokens are the gateway's hot path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import orjson

from gateway.errors import UpstreamError
from gateway.providers.base import Chunk, CompletionRequest

_DRAIN_TIMEOUT = 0.1
"""After ``[DONE]``, how long to wait for the end of the body so the connection can be
reused (the SDK does the same); the response is closed after that either way."""


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
    """Streams from ``base_url`` with ``AsyncOpenAI(stream=True)``.

    Timeouts: ``first_token_timeout`` bounds the wait for the response and its first
    chunk (SDK retries included); ``token_timeout`` bounds each gap between chunks.
    The SDK retries only while no response has arrived, so nothing is ever retried
    after a token reached a client.
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
    ) -> None:
        self.first_token_timeout = first_token_timeout
        self.token_timeout = token_timeout
        read = max(first_token_timeout, token_timeout)
        self._client = openai.AsyncOpenAI(
            # Local servers (Ollama, vLLM) accept any key, but the SDK insists on one.
            api_key=api_key or "not-needed",
            base_url=base_url,
            max_retries=max_retries,
            # httpx2's read timeout is only a backstop for the timeouts in stream().
            timeout=httpx2.Timeout(read, connect=connect_timeout),
        )

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        body = {
            "model": request.model,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # The SDK's generic ``post`` (its documented way to make raw requests) still
        # adds auth, retries and status errors, but skips the typed-parameter
        # transform of ``chat.completions.create``, which costs ~6 ms of CPU per
        # request for a 40-message history (1 ms for the whole request this way).
        try:
            async with asyncio.timeout(self.first_token_timeout):
                http_response = await self._client.post(
                    "/chat/completions", body=body, cast_to=httpx2.Response, stream=True
                )
        except TimeoutError:
            raise UpstreamError(
                f"no response from the model within {self.first_token_timeout:g} s",
                code="upstream_timeout",
            ) from None
        except Exception as exc:
            raise _translate(exc) from exc

        if http_response.headers.get("content-encoding", "identity") == "identity":
            chunks = http_response.aiter_raw()  # skips httpx2's decoder and re-chunker
        else:
            chunks = http_response.aiter_bytes()
        deadline = _ReadDeadline(asyncio.get_running_loop())
        feed = SSEParser().feed
        timeout = self.first_token_timeout
        try:
            while True:
                deadline.arm(timeout)
                try:
                    data = await anext(chunks)
                except StopAsyncIteration:
                    return  # no [DONE]; the caller decides whether the answer is complete
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
                for payload in feed(data):
                    if payload.startswith(b"[DONE]"):
                        await _drain(chunks, deadline)
                        return
                    chunk = _parse_event(payload)
                    if chunk is None:
                        continue
                    if chunk.text:  # the role-only opening chunk does not count as a token
                        timeout = self.token_timeout
                    yield chunk
        finally:
            deadline.close()
            # Closing the response (not draining it) makes the upstream stop generating.
            try:
                await chunks.aclose()
            finally:
                await http_response.aclose()

    async def aclose(self) -> None:
        await self._client.close()


async def _drain(body: AsyncIterator[bytes], deadline: _ReadDeadline) -> None:
    """Read the rest of the body after ``[DONE]`` (normally just the end of the chunked
    encoding), so that httpx2 can reuse the connection; give up quietly after a while."""
    try:
        while True:
            deadline.arm(_DRAIN_TIMEOUT)
            try:
                await anext(body)
            finally:
                deadline.disarm()
    except StopAsyncIteration:
        pass
    except (asyncio.CancelledError, Exception) as exc:
        # A timeout or a broken body: the answer is complete, the connection is just
        # not reused. A cancellation from outside goes on.
        if not deadline.expired() and isinstance(exc, asyncio.CancelledError):
            raise


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


def _translate(exc: Exception) -> UpstreamError:
    """Map an SDK or transport exception onto the gateway's error tree."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, openai.RateLimitError):
        return UpstreamError(
            f"the model's rate limit was hit: {_detail(exc)}",
            code="upstream_rate_limited",
            status=429,
        )
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return UpstreamError("the model timed out", code="upstream_timeout")
    if isinstance(exc, openai.APIStatusError):
        return UpstreamError(
            f"the model answered HTTP {exc.status_code}: {_detail(exc)}", code="upstream_error"
        )
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return UpstreamError(f"cannot reach the model: {exc}", code="upstream_unavailable")
    if isinstance(exc, json.JSONDecodeError | openai.APIError | ValueError | httpx2.DecodingError):
        return UpstreamError(
            f"the model sent a malformed stream: {exc}", code="upstream_bad_response"
        )
    return UpstreamError(f"the model stream failed: {exc!r}", code="upstream_error")


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return exc.message
