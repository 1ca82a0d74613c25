"""A fake OpenAI-compatible upstream that is a real HTTP server.

Tests and benchmarks point the real ``openai`` SDK (or the gateway) at this
server; it speaks real HTTP/1.1 and Server-Sent Events exactly like OpenAI's
``POST /v1/chat/completions`` (``stream=true`` and ``stream=false``),
``GET /v1/models`` and ``POST /v1/moderations``. It is a raw ASGI app (no
framework) so one core can keep ~1000 streams ticking every 20 ms: every SSE chunk is assembled from
pre-encoded byte templates, and only the token text goes through ``orjson``.

Scenario rules
--------------
Each chat-completion request is served according to a :class:`Scenario`,
chosen per request; the first match wins:

1. the next scenario queued with :meth:`FakeUpstream.script` (FIFO);
2. a directive in the content of the **last user message**, e.g.
   ``[[fake count=50 delay=0.02 first_delay=0.1 fault=hang fault_after=3 usage=0 group=1]]``.
   Any subset of keys may be given; the others come from the default scenario.
   ``tokens=a|b|c`` gives explicit token texts (split on ``|``; values may be
   shell-quoted, e.g. ``tokens="Hello |world"``). ``fault=none`` clears a fault,
   ``usage`` takes ``0/1/true/false``. Giving ``count`` without ``tokens`` drops
   any explicit tokens of the default. A malformed directive gets a 400;
3. the default scenario of the :class:`FakeUpstream`.

Response shape for ``stream=true`` (``content-type: text/event-stream``):

* a chunk with ``delta: {"role": "assistant", "content": ""}`` (sent with the headers);
* after ``first_delay``, one chunk per token, ``delay`` seconds apart
  (tokens are scheduled on absolute deadlines, so they do not drift); with
  ``group=N`` the chunks of N tokens go out in one write, and ``group=0`` writes the
  whole completion, role chunk to ``[DONE]``, in one write;
* a chunk with an empty delta and ``finish_reason`` ``"stop"``, or ``"length"``
  when ``max_completion_tokens``/``max_tokens`` is smaller than the token count
  (then only that many tokens are sent);
* a usage chunk (``"choices": []``) when the request sets
  ``stream_options.include_usage`` and ``scenario.usage`` is true;
* ``data: [DONE]``.

Faults: ``"500"`` and ``"429"`` answer with an OpenAI-style error JSON (429 adds
``retry-after: 0``). ``"hang"``, ``"truncate"`` and ``"garbage"`` strike after
``fault_after`` content tokens (capped at the number of tokens to send, in which
case they replace the finish/usage/[DONE] tail): ``hang`` stops sending but keeps
the connection open until the client goes away, ``truncate`` ends the body cleanly
right there, ``garbage`` sends ``data: {not json`` and ends the body. For
``stream=false``, ``hang`` never answers, ``truncate`` sends the first half of the
JSON body, ``garbage`` sends ``{not json``.

While a response is in progress, a task listens on ``receive()`` for
``http.disconnect``, so a client going away is noticed within milliseconds even
while the fake sleeps in a long ``delay`` or hangs; sending stops at once and
:attr:`RecordedRequest.disconnected_at` is set. A failing ``send`` counts as a
disconnect too.

Every chat-completion request that gets as far as scenario selection (that is:
authorised, valid JSON, valid directive) is recorded in
:attr:`FakeUpstream.requests`. The app runs on the server's event loop in its own
thread; the waiting helpers (:meth:`FakeUpstream.wait_for_requests`,
:meth:`FakeUpstream.wait_until`) are blocking and thread-safe.

Command line (used by the benchmark)::

    python -m gateway.testing.fake_upstream --host 127.0.0.1 --port 9100 --count 200 --delay 0.02
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import importlib.util
import itertools
import re
import shlex
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
import uvicorn

from gateway.testing.servers import ThreadedServer

__all__ = ["FAULTS", "FakeUpstream", "FakeUpstreamServer", "RecordedRequest", "Scenario"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FAULTS: frozenset[str] = frozenset({"500", "429", "hang", "truncate", "garbage"})
"""Valid values of :attr:`Scenario.fault` (besides ``None``)."""

_MID_STREAM_FAULTS = frozenset({"hang", "truncate", "garbage"})


@dataclass
class Scenario:
    """How the fake answers one chat-completion request."""

    count: int = 8
    """Number of content tokens when ``tokens`` is None; token ``i`` is ``f"tok{i} "``."""
    tokens: list[str] | None = None
    """Explicit token texts (take precedence over ``count``)."""
    delay: float = 0.0
    """Seconds between consecutive tokens."""
    first_delay: float = 0.0
    """Seconds before the first token, counted from the response headers."""
    fault: str | None = None
    """``None`` or one of :data:`FAULTS`."""
    fault_after: int = 0
    """For hang/truncate/garbage: content tokens sent before the fault strikes."""
    usage: bool = True
    """Send a usage chunk when the request asks for ``stream_options.include_usage``."""
    group: int = 1
    """Content tokens per write (``delay`` apart); 0: the whole completion (role chunk,
    tokens, finish, usage, ``[DONE]``) in one write after ``first_delay``, as a server
    that buffers does. Lets tests see several events arrive in one network read."""

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {sorted(FAULTS)}")
        if self.group < 0:
            raise ValueError(f"group must be 0 or more, got {self.group}")

    def token_texts(self) -> list[str]:
        """The content tokens this scenario would send (before any ``max_tokens`` cap)."""
        if self.tokens is not None:
            return list(self.tokens)
        return [f"tok{i} " for i in range(self.count)]


FLAG_WORD = "FLAGME"
"""The fake moderation endpoint flags any input containing this word."""
FAIL_WORD = "MODERATIONDOWN"
"""... and fails (HTTP 500) for one containing this."""


@dataclass
class RecordedRequest:
    """What the fake saw and did for one chat-completion request.

    Times are ``time.monotonic()`` values. Fields are written by the server thread
    while the response progresses; reading them from another thread is safe
    (single attribute reads / list appends), use :meth:`FakeUpstream.wait_until`
    to wait for a state.
    """

    body: dict[str, Any]
    """Parsed JSON request body."""
    headers: dict[str, str]
    """Request headers, lower-cased names (repeated headers joined with ``", "``)."""
    scenario: Scenario
    """The scenario chosen for this request."""
    started_at: float
    """When the request arrived."""
    first_token_at: float | None = None
    """When the first content token was written."""
    last_token_at: float | None = None
    """When the latest content token was written."""
    tokens_sent: int = 0
    """Content tokens actually written."""
    completed_at: float | None = None
    """When the full response (for streams: including ``[DONE]``) was written."""
    disconnected_at: float | None = None
    """When the client went away before the response was complete."""
    token_times: list[float] = field(default_factory=list)
    """Time each content token was written."""
    outcome: str | None = None
    """How the response ended: ``"completed"``, ``"error"`` (500/429 fault),
    ``"truncated"``, ``"garbage"`` or ``"disconnected"``; ``None`` while in
    progress (including while hanging)."""


# --------------------------------------------------------------------------- helpers

_DIRECTIVE_RE = re.compile(r"\[\[fake(?P<args>(?:\s[^\]]*)?)\]\]")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class DirectiveError(ValueError):
    """A ``[[fake ...]]`` directive could not be parsed."""


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {value!r}")


_DIRECTIVE_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "count": int,
    "fault_after": int,
    "group": int,
    "delay": float,
    "first_delay": float,
    "fault": lambda v: None if v.lower() in ("", "none") else v,
    "usage": _parse_bool,
    "tokens": lambda v: v.split("|"),
}


def parse_directive(text: str, default: Scenario) -> Scenario | None:
    """Return the scenario described by a ``[[fake ...]]`` directive in ``text``.

    Keys not given are taken from ``default``. Returns None when ``text`` has no
    directive; raises :class:`DirectiveError` on unknown keys or bad values.
    """
    match = _DIRECTIVE_RE.search(text)
    if match is None:
        return None
    try:
        parts = shlex.split(match.group("args"))
    except ValueError as exc:
        raise DirectiveError(f"bad quoting in fake directive: {exc}") from None
    changes: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise DirectiveError(f"expected key=value in fake directive, got {part!r}")
        convert = _DIRECTIVE_CONVERTERS.get(key)
        if convert is None:
            raise DirectiveError(f"unknown key {key!r} in fake directive")
        try:
            changes[key] = convert(value)
        except ValueError:
            raise DirectiveError(f"bad value for {key!r} in fake directive: {value!r}") from None
    if "count" in changes and "tokens" not in changes:
        changes["tokens"] = None
    try:
        return dataclasses.replace(default, **changes)
    except ValueError as exc:  # e.g. an unknown fault, rejected by Scenario
        raise DirectiveError(str(exc)) from None


def _content_text(content: Any) -> str:
    """Text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return " ".join(texts)
    return ""


def _last_user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _prompt_tokens(body: dict[str, Any]) -> int:
    """Rough prompt size: the word count of all message contents."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    return sum(
        len(_content_text(m.get("content")).split()) for m in messages if isinstance(m, dict)
    )


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None when the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _json_response_start(
    status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> Message:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if extra:
        headers.extend(extra)
    return {"type": "http.response.start", "status": status, "headers": headers}


def _error_body(message: str, type_: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


_MODELS_BODY = orjson.dumps(
    {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}
)
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]
_DONE = b"data: [DONE]\n\n"
_GARBAGE_EVENT = b"data: {not json\n\n"
_TOKEN_SUFFIX = b'},"finish_reason":null}]}\n\n'

# JSON-encoded default tokens ("tok{i} "), shared by all requests; grown on demand.
_default_token_json: list[bytes] = []


def _default_tokens_json(n: int) -> list[bytes]:
    cache = _default_token_json
    if len(cache) < n:
        cache.extend(orjson.dumps(f"tok{i} ") for i in range(len(cache), n))
    return cache[:n]


class _Plan:
    """Everything needed to answer one request, computed once up front."""

    __slots__ = (
        "finish_reason",
        "include_usage",
        "model",
        "n_send",
        "prompt_tokens",
        "scenario",
        "stream",
        "tokens",
    )

    def __init__(self, body: dict[str, Any], scenario: Scenario) -> None:
        self.scenario = scenario
        model = body.get("model")
        self.model = model if isinstance(model, str) else "fake-model"
        self.stream = body.get("stream") is True
        options = body.get("stream_options")
        self.include_usage = bool(
            self.stream and isinstance(options, dict) and options.get("include_usage")
        )
        self.tokens = scenario.tokens
        total = len(scenario.tokens) if scenario.tokens is not None else max(scenario.count, 0)
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < total:
            self.n_send, self.finish_reason = limit, "length"
        else:
            self.n_send, self.finish_reason = total, "stop"
        self.prompt_tokens = _prompt_tokens(body)

    def token_json(self) -> list[bytes]:
        """JSON-encoded (quoted, escaped) texts of the tokens to send."""
        if self.tokens is None:
            return _default_tokens_json(self.n_send)
        return [orjson.dumps(t) for t in self.tokens[: self.n_send]]

    def token_text(self) -> str:
        if self.tokens is None:
            return "".join(f"tok{i} " for i in range(self.n_send))
        return "".join(self.tokens[: self.n_send])

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


class _Disconnected(Exception):
    """Internal: sending failed because the client went away."""


# --------------------------------------------------------------------------- the app


class FakeUpstream:
    """The fake OpenAI-compatible upstream, as an ASGI application.

    ``default`` is the scenario used when neither a scripted scenario nor a
    directive applies (see the module docstring). With ``record=False`` requests
    are not kept in :attr:`requests` (for long benchmark runs; the waiting helpers
    are then of no use).
    """

    def __init__(self, default: Scenario | None = None, *, record: bool = True) -> None:
        self.default: Scenario = default if default is not None else Scenario()
        self.record = record
        self.requests: list[RecordedRequest] = []
        """Recorded chat-completion requests, in arrival order."""
        self.moderations: list[list[str]] = []
        """The inputs of each ``/v1/moderations`` request, in arrival order."""
        self.moderation_delay = 0.0
        """Seconds each ``/v1/moderations`` answer takes (0: at once)."""
        self._script: collections.deque[Scenario] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._id_prefix = f"chatcmpl-fake{time.time_ns() % 10**9:09d}"

    # ---------------------------------------------------------------- test helpers

    def script(self, *scenarios: Scenario) -> None:
        """Queue scenarios for the next requests (FIFO), ahead of directives and the default."""
        with self._cond:
            self._script.extend(scenarios)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least ``n`` requests arrived; return a snapshot of all of them.

        Raises :class:`TimeoutError` after ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise TimeoutError(f"expected {n} request(s), got {len(self.requests)}")
            return list(self.requests)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate()`` is true, polling every few ms.

        Wakes early whenever a request arrives or ends. Raises
        :class:`TimeoutError` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            with self._cond:
                self._cond.wait(min(remaining, 0.005))

    def reset(self) -> None:
        """Forget recorded requests and scripted scenarios (the default is kept)."""
        with self._cond:
            self.requests.clear()
            self.moderations.clear()
            self.moderation_delay = 0.0
            self._script.clear()

    # ---------------------------------------------------------------- ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif kind == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path == "/v1/chat/completions" and method == "POST":
            await self._chat(scope, receive, send)
        elif path == "/v1/models" and method == "GET":
            await self._send_json(send, 200, _MODELS_BODY)
        elif path == "/v1/moderations" and method == "POST":
            await self._moderate(receive, send)
        else:
            body = _error_body(
                f"Unknown request URL: {method} {path}", "invalid_request_error", "unknown_url"
            )
            await self._send_json(send, 404, body)

    @staticmethod
    async def _send_json(
        send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        await send(_json_response_start(status, body, extra))
        await send({"type": "http.response.body", "body": body, "more_body": False})

    # ---------------------------------------------------------------- moderations

    async def _moderate(self, receive: Receive, send: Send) -> None:
        """``POST /v1/moderations``: flags an input containing :data:`FLAG_WORD`
        (category ``violence``); answers 500 for one containing :data:`FAIL_WORD`."""
        raw = await _read_body(receive)
        if raw is None:
            return
        body = orjson.loads(raw)
        inputs = body.get("input", "")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        self.moderations.append(texts)
        if self.moderation_delay:
            await asyncio.sleep(self.moderation_delay)
        if any(FAIL_WORD in text for text in texts):
            error = _error_body("moderation is down", "server_error", None)
            await self._send_json(send, 500, error)
            return
        results = []
        for text in texts:
            flagged = FLAG_WORD in text
            results.append(
                {
                    "flagged": flagged,
                    "categories": {"violence": flagged, "harassment": False},
                    "category_scores": {"violence": 0.97 if flagged else 0.01, "harassment": 0.0},
                }
            )
        model = body.get("model", "fake-moderation")
        response = {"id": "modr-fake", "model": model, "results": results}
        await self._send_json(send, 200, orjson.dumps(response))

    # ---------------------------------------------------------------- chat completions

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

        auth = headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            body = _error_body(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                "invalid_request_error",
                "invalid_api_key",
            )
            await self._send_json(send, 401, body)
            return

        raw = await _read_body(receive)
        if raw is None:
            return
        try:
            body = orjson.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
        except ValueError as exc:
            error = _error_body(f"Invalid JSON body: {exc}", "invalid_request_error", None)
            await self._send_json(send, 400, error)
            return

        try:
            scenario = self._choose_scenario(body)
        except DirectiveError as exc:
            error = _error_body(str(exc), "invalid_request_error", "invalid_fake_directive")
            await self._send_json(send, 400, error)
            return

        rec = RecordedRequest(
            body=body, headers=headers, scenario=scenario, started_at=time.monotonic()
        )
        if self.record:
            with self._cond:
                self.requests.append(rec)
                self._cond.notify_all()

        if scenario.fault == "500":
            error = _error_body(
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            )
            await self._send_json(send, 500, error)
            self._finish(rec, "error")
            return
        if scenario.fault == "429":
            error = _error_body(
                "Rate limit reached for requests (fake upstream).",
                "requests",
                "rate_limit_exceeded",
            )
            await self._send_json(send, 429, error, [(b"retry-after", b"0")])
            self._finish(rec, "error")
            return

        plan = _Plan(body, scenario)
        if plan.stream:
            work = self._stream(send, rec, plan)
        else:
            work = self._complete(send, rec, plan)
        await self._watched(receive, rec, work)

    def _choose_scenario(self, body: dict[str, Any]) -> Scenario:
        with self._cond:
            if self._script:
                return self._script.popleft()
            default = self.default
        directive = parse_directive(_last_user_text(body), default)
        return directive if directive is not None else default

    def _finish(self, rec: RecordedRequest, outcome: str, at: float | None = None) -> None:
        """Record how a response ended and wake waiting test threads."""
        with self._cond:
            if rec.outcome is not None:
                return
            rec.outcome = outcome
            when = at if at is not None else time.monotonic()
            if outcome == "disconnected":
                rec.disconnected_at = when
            elif outcome == "completed":
                rec.completed_at = when
            self._cond.notify_all()

    async def _watched(
        self, receive: Receive, rec: RecordedRequest, work: Coroutine[Any, Any, None]
    ) -> None:
        """Run ``work`` (which writes the response) while watching for a disconnect.

        Whichever ends first wins: a disconnect cancels ``work`` at once, even in
        the middle of a sleep or a hang.
        """
        sender = asyncio.create_task(work)
        watcher = asyncio.create_task(self._wait_disconnect(receive))
        try:
            await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also reached on cancellation (server shutdown): leave no task behind.
            for task in (sender, watcher):
                if not task.done():
                    task.cancel()
        if sender.done() and not sender.cancelled():
            exc = sender.exception()
            if isinstance(exc, _Disconnected):
                self._finish(rec, "disconnected")
            elif exc is not None:
                raise exc
        else:
            self._finish(rec, "disconnected", watcher.result())

    @staticmethod
    async def _wait_disconnect(receive: Receive) -> float:
        """Wait for ``http.disconnect``; return the monotonic time it was seen."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return time.monotonic()

    @staticmethod
    async def _send(send: Send, message: Message) -> None:
        try:
            await send(message)
        except OSError as exc:  # includes uvicorn's ClientDisconnected
            raise _Disconnected from exc

    async def _stream(self, send: Send, rec: RecordedRequest, plan: _Plan) -> None:
        """Write an SSE chat-completion stream for ``plan``."""
        scenario = plan.scenario
        created = int(time.time())
        head = b"".join(
            (
                b'data: {"id":"',
                f"{self._id_prefix}{next(self._ids):08x}".encode(),
                b'","object":"chat.completion.chunk","created":',
                str(created).encode(),
                b',"model":',
                orjson.dumps(plan.model),
                b",",
            )
        )
        token_prefix = head + b'"choices":[{"index":0,"delta":{"content":'
        token_suffix = _TOKEN_SUFFIX
        tokens = plan.token_json()
        n_send = plan.n_send
        fault = scenario.fault if scenario.fault in _MID_STREAM_FAULTS else None
        stop_at = min(max(scenario.fault_after, 0), n_send) if fault else n_send

        send_raw = self._send
        await send_raw(
            send, {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS}
        )
        # What is written next; in whole mode (group 0) everything waits for one write.
        whole = scenario.group == 0
        group = scenario.group or max(stop_at, 1)
        pending = [
            head
            + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            + b'"finish_reason":null}]}\n\n'
        ]
        if not whole:
            await send_raw(
                send, {"type": "http.response.body", "body": pending.pop(), "more_body": True}
            )

        monotonic = time.monotonic
        sleep = asyncio.sleep
        delay = scenario.delay
        deadline = monotonic() + scenario.first_delay
        token_times = rec.token_times
        for start in range(0, stop_at, group):
            if start:
                deadline += delay
            wait = deadline - monotonic()
            if wait > 0:
                await sleep(wait)
            end = min(start + group, stop_at)
            pending.extend(token_prefix + tokens[i] + token_suffix for i in range(start, end))
            if not whole:
                body = pending[0] if len(pending) == 1 else b"".join(pending)
                pending.clear()
                await send_raw(
                    send, {"type": "http.response.body", "body": body, "more_body": True}
                )
            now = monotonic()
            token_times.extend([now] * (end - start))
            if start == 0:
                rec.first_token_at = now
            rec.last_token_at = now
            rec.tokens_sent = end

        if fault == "hang":
            if pending:
                await send_raw(
                    send,
                    {"type": "http.response.body", "body": b"".join(pending), "more_body": True},
                )
            await asyncio.Future()  # until the watcher sees the disconnect and cancels us
        elif fault == "truncate":
            await send_raw(
                send,
                {"type": "http.response.body", "body": b"".join(pending), "more_body": False},
            )
            self._finish(rec, "truncated")
            return
        elif fault == "garbage":
            pending.append(_GARBAGE_EVENT)
            await send_raw(
                send,
                {"type": "http.response.body", "body": b"".join(pending), "more_body": False},
            )
            self._finish(rec, "garbage")
            return

        tail = [
            *pending,
            head,
            b'"choices":[{"index":0,"delta":{},"finish_reason":"',
            plan.finish_reason.encode(),
            b'"}]}\n\n',
        ]
        if plan.include_usage and scenario.usage:
            tail += [
                head,
                b'"choices":[],"usage":',
                orjson.dumps(plan.usage(n_send)),
                b"}\n\n",
            ]
        tail.append(_DONE)
        await send_raw(
            send, {"type": "http.response.body", "body": b"".join(tail), "more_body": False}
        )
        self._finish(rec, "completed")

    async def _complete(self, send: Send, rec: RecordedRequest, plan: _Plan) -> None:
        """Write a non-streaming ``chat.completion`` JSON for ``plan``."""
        scenario = plan.scenario
        thinking = scenario.first_delay + scenario.delay * max(plan.n_send - 1, 0)
        if scenario.fault == "hang":
            await asyncio.Future()  # until the client goes away
        if thinking > 0:
            await asyncio.sleep(thinking)
        body = orjson.dumps(
            {
                "id": f"{self._id_prefix}{next(self._ids):08x}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": plan.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": plan.token_text()},
                        "logprobs": None,
                        "finish_reason": plan.finish_reason,
                    }
                ],
                "usage": plan.usage(plan.n_send),
            }
        )
        outcome = "completed"
        if scenario.fault == "truncate":
            body, outcome = body[: len(body) // 2], "truncated"
        elif scenario.fault == "garbage":
            body, outcome = b"{not json", "garbage"
        await self._send(send, _json_response_start(200, body))
        await self._send(send, {"type": "http.response.body", "body": body, "more_body": False})
        if outcome == "completed":
            now = time.monotonic()
            rec.token_times.extend([now] * plan.n_send)
            if plan.n_send:
                rec.first_token_at = rec.last_token_at = now
            rec.tokens_sent = plan.n_send
        self._finish(rec, outcome)


# --------------------------------------------------------------------------- server


def _http_impl() -> str:
    """The fastest available uvicorn HTTP implementation."""
    return "httptools" if importlib.util.find_spec("httptools") is not None else "h11"


class FakeUpstreamServer:
    """Run a :class:`FakeUpstream` under uvicorn in a daemon thread.

    Use as a context manager; ``__enter__`` returns once the server accepts
    connections. With ``port=0`` a free port is picked (the socket is bound at
    construction and handed to uvicorn, so there is no race for the port).
    """

    def __init__(
        self, upstream: FakeUpstream | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream: FakeUpstream = upstream if upstream is not None else FakeUpstream()
        self.host = host
        self._server = ThreadedServer(
            self.upstream,
            host=host,
            port=port,
            lifespan="off",
            ws="none",
            http=_http_impl(),
            access_log=False,
            # A stream left hanging must not block shutdown forever.
            timeout_graceful_shutdown=1,
        )
        self.port: int = self._server.port

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of the server, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> FakeUpstreamServer:
        self._server.start(timeout=10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop(timeout=10)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    """Serve a fake upstream from the command line (for benchmarks)."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway.testing.fake_upstream",
        description="Fake OpenAI-compatible upstream (chat completions with SSE streaming).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--count", type=int, default=8, help="tokens per response")
    parser.add_argument(
        "--tokens", default=None, help="explicit tokens separated by '|' (overrides --count)"
    )
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--first-delay", type=float, default=0.0, help="seconds before token 1")
    parser.add_argument("--fault", choices=sorted(FAULTS), default=None)
    parser.add_argument("--fault-after", type=int, default=0)
    parser.add_argument("--no-usage", action="store_true", help="never send a usage chunk")
    parser.add_argument(
        "--group", type=int, default=1, help="tokens per write; 0: the whole completion at once"
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    default = Scenario(
        count=args.count,
        tokens=args.tokens.split("|") if args.tokens is not None else None,
        delay=args.delay,
        first_delay=args.first_delay,
        fault=args.fault,
        fault_after=args.fault_after,
        usage=not args.no_usage,
        group=args.group,
    )
    # Long benchmark runs would otherwise accumulate every request in memory.
    upstream = FakeUpstream(default, record=False)
    config = uvicorn.Config(
        upstream,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifespan="off",
        ws="none",
        http=_http_impl(),
        access_log=False,
        backlog=4096,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
