"""Shared fixtures: a fake upstream and the gateway, both real servers on loopback.

Timeouts scale with ``TEST_TIME_SCALE`` (default 1) for slow machines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from gateway.app import create_app
from gateway.server import uvicorn_options
from gateway.settings import Settings
from gateway.testing.fake_upstream import FakeUpstream, FakeUpstreamServer, Scenario
from gateway.testing.servers import ThreadedServer

TIME_SCALE = float(os.environ.get("TEST_TIME_SCALE", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIME_SCALE


def console_script(name: str) -> str:
    """The venv's ``name`` script: next to the running interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} is not installed (pip install -e '.[test]')"
    return found


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer(FakeUpstream(Scenario(count=8))) as server:
        yield server


@pytest.fixture
def upstream(upstream_server: FakeUpstreamServer) -> FakeUpstream:
    """The fake upstream's state, reset for each test."""
    upstream_server.upstream.reset()
    return upstream_server.upstream


@dataclass
class Gateway:
    """A running gateway: its URLs and settings."""

    server: ThreadedServer
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    def ws_url(self, room_id: str, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.server.port}/ws/rooms/{room_id}{query}"

    def stop(self) -> None:
        self.server.stop()


TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL")
"""Run the suite against PostgreSQL: ``postgresql+asyncpg://user@host/db``; each test
gets a fresh database created from it (and dropped after)."""


def _on_postgres(statement: str) -> None:
    """Run one statement on the server of ``TEST_DATABASE_URL`` (in a thread: a test's
    event loop may be running)."""
    import threading

    import asyncpg  # type: ignore[import-not-found]

    url = str(TEST_DATABASE_URL).replace("postgresql+asyncpg://", "postgresql://", 1)
    errors: list[BaseException] = []

    async def run() -> None:
        connection = await asyncpg.connect(url)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    def target() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database for one test: a SQLite file, or with TEST_DATABASE_URL
    a new PostgreSQL database."""
    if TEST_DATABASE_URL is None:
        yield f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        return
    name = f"gw_test_{os.urandom(6).hex()}"
    _on_postgres(f'CREATE DATABASE "{name}"')
    try:
        yield TEST_DATABASE_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        _on_postgres(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def run_sql(database_url: str, statement: str, **params: Any) -> list[Any]:
    """Run one SQL statement on a gateway's database, behind its back (SQLite or
    PostgreSQL alike); returns the rows."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement), params)
            return list(result.fetchall()) if result.returns_rows else []
    finally:
        await engine.dispose()


TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL")
"""Run the suite with the Redis broker: ``redis://host:6379/0``; each test gets its own
key prefix."""


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, on a Redis server that outlives test runs."""
    return f"gw-test-{os.urandom(6).hex()}"


@pytest.fixture
def make_settings(database_url: str, upstream_server: FakeUpstreamServer, redis_prefix: str) -> Any:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": TEST_REDIS_URL,
            "redis_prefix": redis_prefix,
            "database_url": database_url,
            "openai_api_key": "test-key",
            "openai_base_url": upstream_server.base_url,
            "upstream_max_retries": 0,
            "default_model": "fake-model",
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    return make


@pytest.fixture
def start_gateway(make_settings: Any) -> Iterator[Any]:
    """Start a gateway (call again after stopping to restart on the same database)."""
    started: list[Gateway] = []

    def start(*, http: str = "auto", tracer: Any = None, **overrides: Any) -> Gateway:
        settings = make_settings(**overrides)
        app = create_app(settings, tracing=tracer)
        server = ThreadedServer(app, **uvicorn_options(settings, http=http))  # type: ignore[arg-type]
        gateway = Gateway(server.start(), settings)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.server.server.started and not gateway.server.server.should_exit:
            gateway.stop()


@pytest.fixture
def gateway(start_gateway: Any) -> Gateway:
    return start_gateway()


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as client:
        yield client


async def create_room(gateway: Gateway, **persona: Any) -> dict[str, Any]:
    """Create a room over REST on ``gateway`` and return it."""
    persona.setdefault("system_prompt", "You are terse.")
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as client:
        response = await client.post("/api/rooms", json={"name": "test room", "persona": persona})
    assert response.status_code == 201, response.text
    return response.json()


async def get_messages(gateway: Gateway, room_id: str) -> list[dict[str, Any]]:
    """The room's active branch, as ``GET /api/rooms/{id}/messages`` gives it."""
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as client:
        response = await client.get(f"/api/rooms/{room_id}/messages?limit=1000")
    assert response.status_code == 200, response.text
    return response.json()["messages"]


@pytest.fixture
async def room(gateway: Gateway) -> dict[str, Any]:
    return await create_room(gateway)


def covered_seqs(tokens: list[dict[str, Any]]) -> list[int]:
    """The token seqs a list of token frames carries, expanding merged frames."""
    seqs: list[int] = []
    for frame in tokens:
        seqs.extend(range(frame.get("seq_from", frame["seq"]), frame["seq"] + 1))
    return seqs


def expanded(frames: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(event_id, type) of every event, a merged token frame (``seq_from``) counting for
    each token in it: a client that falls behind gets runs of tokens merged."""
    out = []
    for frame in frames:
        merged = frame["seq"] - frame["seq_from"] if "seq_from" in frame else 0
        out.extend((frame["event_id"] - i, frame["type"]) for i in range(merged, -1, -1))
    return out


def numbered(seqs: list[int], first: int = 1) -> bool:
    """Whether ``seqs`` run ``first``, ``first + 1``, ... with no gap or duplicate. How
    many there are depends on the upstream's pace: a token frame carries the text of
    one upstream read, which may hold several tokens."""
    return bool(seqs) and seqs == list(range(first, first + len(seqs)))


class Client:
    """A WebSocket client that keeps every frame it received."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        await self.ws.send(frame)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), scaled(timeout))
        frame = orjson.loads(raw)
        self.frames.append(frame)
        return frame

    async def until(self, *types: str, timeout: float = 5.0) -> dict[str, Any]:
        """Receive until a frame of one of ``types`` arrives; return it."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] in types:
                return frame

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]

    def text_of(self, generation_id: str) -> str:
        return "".join(
            f["text"]
            for f in self.frames
            if f["type"] == "token" and f["generation_id"] == generation_id
        )


@pytest.fixture
async def connect(gateway: Gateway) -> AsyncIterator[Any]:
    """``client = await connect(room_id)`` opens a WebSocket and reads ``ready``."""
    opened: list[ClientConnection] = []

    async def open_client(
        room_id: str, *, gateway_: Gateway | None = None, query: str = ""
    ) -> Client:
        ws = await websockets.connect(
            (gateway_ or gateway).ws_url(room_id, query), max_size=None, max_queue=None
        )
        opened.append(ws)
        client = Client(ws)
        ready = await client.recv()
        assert ready["type"] in ("ready", "resumed", "resync", "error"), ready
        return client

    yield open_client
    for ws in opened:
        await ws.close()


@dataclass
class SSEEvent:
    """One Server-Sent Event: its ``id:`` (if any), ``event:`` and parsed ``data:``."""

    id: int | None
    type: str
    data: dict[str, Any]


def parse_sse(lines: list[str]) -> list[SSEEvent]:
    """The events in complete SSE text lines (comments and ``retry:`` skipped)."""
    events: list[SSEEvent] = []
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                raw_id = fields.get("id")
                events.append(
                    SSEEvent(
                        int(raw_id) if raw_id else None,
                        fields.get("event", "message"),
                        orjson.loads(fields["data"]),
                    )
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    return events


class SSEClient:
    """Reads an SSE response as it arrives, keeping every event (and comment)."""

    def __init__(self, response: httpx2.Response) -> None:
        self.response = response
        self.events: list[SSEEvent] = []
        self.comments: list[str] = []
        self._lines = response.aiter_lines()
        self._pending: list[str] = []

    async def next(self, timeout: float = 5.0) -> SSEEvent:
        """The next event (raises StopAsyncIteration when the stream ends)."""
        async with asyncio.timeout(scaled(timeout)):
            while True:
                line = await anext(self._lines)
                if line.startswith(":"):
                    self.comments.append(line)
                self._pending.append(line)
                if line == "":
                    parsed = parse_sse(self._pending)
                    self._pending = []
                    if parsed:
                        self.events.extend(parsed)
                        return parsed[0]

    async def until(self, *types: str, timeout: float = 5.0) -> SSEEvent:
        while True:
            event = await self.next(timeout)
            if event.type in types:
                return event

    async def rest(self, timeout: float = 10.0) -> list[SSEEvent]:
        """Every event until the server ends the stream."""
        events = []
        with contextlib.suppress(StopAsyncIteration):
            while True:
                events.append(await self.next(timeout))
        return events

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.type == kind]


@pytest.fixture
async def open_sse(gateway: Gateway) -> AsyncIterator[Any]:
    """``stream = await open_sse(path, method="GET", headers=..., json=...)`` starts an
    SSE request on the gateway; the status and headers are checked by the caller."""
    opened: list[contextlib.AbstractAsyncContextManager[httpx2.Response]] = []
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as client:

        async def open_stream(
            path: str, method: str = "GET", *, gateway_: Gateway | None = None, **kwargs: Any
        ) -> SSEClient:
            headers = {"accept": "text/event-stream", **kwargs.pop("headers", {})}
            url = (gateway_ or gateway).url + path
            context = client.stream(method, url, headers=headers, **kwargs)
            opened.append(context)
            return SSEClient(await context.__aenter__())

        yield open_stream
        for context in reversed(opened):
            with contextlib.suppress(Exception):
                await context.__aexit__(None, None, None)


@pytest.fixture
def uvicorn_errors() -> Iterator[list[str]]:
    """The messages uvicorn logs at WARNING and above during the test (its loggers do
    not propagate to the root logger, so ``caplog`` does not see them)."""
    import logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
