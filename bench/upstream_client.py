"""Upstream client benchmark: CPU per streamed chunk of each candidate client.

Streams chat completions from the fake upstream (``gateway.testing.fake_upstream``
in a subprocess, pinned to core 1) with each candidate client (in this process,
pinned to core 0, uvloop as the server uses) and prints this process's CPU time
(``time.process_time()``) per upstream chunk (one content token's SSE event) and per
request, at each concurrency, for two upstream paces: tokens ``--delay`` apart (one
event per network read) and the whole completion in one write (``group=0``: many
events per read). Every candidate does the same work per read: SSE split
(:class:`SSEParser`), one ``orjson`` decode per event, the texts of the read joined,
a read deadline armed and disarmed (:class:`_ReadDeadline`), as the provider does.

Candidates:

- ``sdk``: the gateway's path until issue 13: the ``openai`` SDK's ``post(...,
  stream=True)``, httpx2's ``aiter_raw()`` (httpcore2, anyio, h11);
- ``aiohttp``: ``aiohttp.ClientSession`` (C parser), ``resp.content.readany()``;
- ``raw``: a minimal pooled HTTP/1.1 client: an ``asyncio.Protocol`` feeding
  ``httptools`` (llhttp, in C), one future per read;
- ``provider``: the gateway's :class:`OpenAIProvider` as shipped (whatever it uses),
  everything included.

Figures are medians over ``--runs`` runs; the candidates take turns within each run,
each with a fresh client (connections opened during a short warm-up). Ratios are
against ``sdk`` in the same run. Figures only; nothing passes or fails.

    .venv/bin/python bench/upstream_client.py
    .venv/bin/python bench/upstream_client.py --concurrency 1 200 --runs 5 --clients sdk raw
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay import _loop_name, _raise_exit, launch_fake_upstream, log

from gateway.providers.base import CompletionRequest
from gateway.providers.openai import (
    OpenAIProvider,
    SSEParser,
    _parse_event,
    _ReadDeadline,
)


@dataclass
class Mode:
    name: str
    delay: float
    group: int

    def content(self, tokens: int) -> str:
        return f"[[fake count={tokens} delay={self.delay} group={self.group}]] go"


def request_body(content: str, tokens: int) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0.7,
        "max_tokens": max(1024, tokens),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class Counts:
    """What one client received."""

    __slots__ = ("chars", "reads", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.reads = 0
        self.chars = 0


class Reader:
    """The per-read work every candidate does: events of the read → one text."""

    __slots__ = ("counts", "done", "feed")

    def __init__(self, counts: Counts) -> None:
        self.feed = SSEParser().feed
        self.counts = counts
        self.done = False

    def read(self, data: bytes) -> None:
        counts = self.counts
        counts.reads += 1
        texts = []
        for payload in self.feed(data):
            if payload.startswith(b"[DONE]"):
                self.done = True
                break
            chunk = _parse_event(payload)
            if chunk is not None and chunk.text:
                texts.append(chunk.text)
        if texts:
            counts.tokens += len(texts)
            counts.chars += len("".join(texts))


class Candidate(Protocol):
    label: ClassVar[str]

    async def open(self, base_url: str, connections: int) -> None: ...
    async def stream(self, content: str, tokens: int, counts: Counts) -> None: ...
    async def close(self) -> None: ...


# --------------------------------------------------------------------------- (a) sdk


class SdkClient:
    label: ClassVar[str] = "openai SDK post(stream=True) + httpx2 aiter_raw (before)"

    async def open(self, base_url: str, connections: int) -> None:
        import httpx2
        import openai

        self.httpx2 = httpx2
        self.client = openai.AsyncOpenAI(
            api_key="bench",
            base_url=base_url,
            max_retries=0,
            timeout=httpx2.Timeout(60, connect=10),
        )

    async def stream(self, content: str, tokens: int, counts: Counts) -> None:
        async with asyncio.timeout(60):
            response = await self.client.post(
                "/chat/completions",
                body=request_body(content, tokens),
                cast_to=self.httpx2.Response,
                stream=True,
            )
        chunks = response.aiter_raw()
        deadline = _ReadDeadline(asyncio.get_running_loop())
        reader = Reader(counts)
        try:
            while True:
                deadline.arm(30)
                try:
                    data = await anext(chunks)
                except StopAsyncIteration:
                    return
                finally:
                    deadline.disarm()
                reader.read(data)
        finally:
            deadline.close()
            await chunks.aclose()
            await response.aclose()

    async def close(self) -> None:
        await self.client.close()


# --------------------------------------------------------------------------- (b) aiohttp


class AiohttpClient:
    label: ClassVar[str] = "aiohttp ClientSession + content.readany()"

    async def open(self, base_url: str, connections: int) -> None:
        import aiohttp

        self.url = base_url + "/chat/completions"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        self.headers = {"Authorization": "Bearer bench", "Content-Type": "application/json"}

    async def stream(self, content: str, tokens: int, counts: Counts) -> None:
        body = orjson.dumps(request_body(content, tokens))
        async with asyncio.timeout(60):
            response = await self.session.post(self.url, data=body, headers=self.headers)
        deadline = _ReadDeadline(asyncio.get_running_loop())
        reader = Reader(counts)
        readany = response.content.readany
        try:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            while True:
                deadline.arm(30)
                try:
                    data = await readany()
                finally:
                    deadline.disarm()
                if not data:
                    return
                reader.read(data)
        finally:
            deadline.close()
            response.release()

    async def close(self) -> None:
        await self.session.close()


# --------------------------------------------------------------------------- (c) raw


class _RawConnection(asyncio.Protocol):
    """One HTTP/1.1 connection: httptools parses, a future per wait for data."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.body: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.lost = False
        self.status = 0
        self.keep_alive = True
        self.parser: Any = None

    def begin(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.complete = False
        self.body.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    async def read(self) -> bytes:
        """The body bytes received since the last read; b"" at its end."""
        body = self.body
        while not body:
            if self.complete:
                return b""
            if self.lost:
                raise ConnectionError("connection lost")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        return data


class RawClient:
    label: ClassVar[str] = "asyncio.Protocol + httptools, pooled (minimal)"

    async def open(self, base_url: str, connections: int) -> None:
        from urllib.parse import urlsplit

        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.path = url.path.rstrip("/") + "/chat/completions"
        self.idle: list[_RawConnection] = []

    async def stream(self, content: str, tokens: int, counts: Counts) -> None:
        body = orjson.dumps(request_body(content, tokens))
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Authorization: Bearer bench\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        while self.idle and self.idle[-1].lost:
            self.idle.pop()
        if self.idle:
            conn = self.idle.pop()
        else:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(10):
                _, conn = await loop.create_connection(_RawConnection, self.host, self.port)
        conn.begin()
        conn.transport.write(head + body)  # type: ignore[union-attr]
        deadline = _ReadDeadline(asyncio.get_running_loop())
        reader = Reader(counts)
        reuse = False
        try:
            while True:
                deadline.arm(30)
                try:
                    data = await conn.read()
                finally:
                    deadline.disarm()
                if not data:
                    reuse = conn.keep_alive
                    return
                if conn.status != 200:
                    raise RuntimeError(f"HTTP {conn.status}")
                reader.read(data)
        finally:
            deadline.close()
            if reuse:
                self.idle.append(conn)
            else:
                conn.transport.close()  # type: ignore[union-attr]

    async def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()  # type: ignore[union-attr]


# --------------------------------------------------------------------------- the provider


class ProviderClient:
    label: ClassVar[str] = "gateway OpenAIProvider.stream() as shipped"

    async def open(self, base_url: str, connections: int) -> None:
        self.provider = OpenAIProvider(api_key="bench", base_url=base_url, max_retries=0)

    async def stream(self, content: str, tokens: int, counts: Counts) -> None:
        request = CompletionRequest(
            model="fake-model",
            messages=[{"role": "user", "content": content}],
            temperature=0.7,
            max_tokens=max(1024, tokens),
        )
        async for chunk in self.provider.stream(request):
            counts.reads += 1
            if chunk.text:
                # The provider joins the events of a read; the fake's tokens are
                # "tok{i} ", so spaces count them.
                counts.tokens += chunk.text.count(" ")
                counts.chars += len(chunk.text)

    async def close(self) -> None:
        await self.provider.aclose()


CANDIDATES: dict[str, Callable[[], Candidate]] = {
    "sdk": SdkClient,
    "aiohttp": AiohttpClient,
    "raw": RawClient,
    "provider": ProviderClient,
}


# --------------------------------------------------------------------------- running


@dataclass
class Sample:
    cpu: float
    wall: float
    requests: int
    tokens: int
    reads: int
    errors: int


async def measure(
    make: Callable[[], Candidate],
    base_url: str,
    mode: Mode,
    concurrency: int,
    requests_per_stream: int,
    tokens: int,
) -> Sample:
    client = make()
    await client.open(base_url, concurrency)
    content = mode.content(tokens)
    try:
        # Warm-up: open the connections, run every code path once.
        await asyncio.gather(
            *(client.stream(mode.content(5), 5, Counts()) for _ in range(concurrency))
        )
        counts = Counts()
        errors = 0

        async def worker() -> None:
            nonlocal errors
            for _ in range(requests_per_stream):
                try:
                    await client.stream(content, tokens, counts)
                except Exception as exc:
                    errors += 1
                    log(f"{make.__name__}: {exc!r}")

        gc.collect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await client.close()
    return Sample(cpu, wall, concurrency * requests_per_stream, counts.tokens, counts.reads, errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 200])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between tokens")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--burst-requests",
        type=int,
        default=2000,
        help="requests per measurement in the one-write mode (split over the streams)",
    )
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, _raise_exit)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not args.no_pin:
        os.sched_setaffinity(0, {0})
    import uvloop

    modes = [
        Mode(f"{args.delay * 1000:g} ms gaps", args.delay, 1),
        Mode("one write", 0.0, 0),
    ]
    print(
        f"upstream client benchmark · {os.cpu_count()} CPUs · python {sys.version.split()[0]} · "
        f"{_loop_name()} · {args.tokens} tokens a request · medians of {args.runs} runs\n"
        f"client on core 0, fake upstream on core 1{' (unpinned)' if args.no_pin else ''}",
        flush=True,
    )
    for name in args.clients:
        print(f"  {name}: {CANDIDATES[name].label}")
    results: dict[tuple[str, int, str], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
        upstream = launch_fake_upstream(
            Path(tmp), tokens=args.tokens, delay=args.delay, cpus=None if args.no_pin else "1"
        )
        try:
            for mode in modes:
                for n in args.concurrency:
                    per_stream = 1 if mode.delay else max(1, args.burst_requests // n)
                    for run in range(args.runs):
                        # Take turns, starting with a different candidate each run.
                        order = args.clients[run % len(args.clients) :]
                        order += args.clients[: run % len(args.clients)]
                        for name in order:
                            sample = uvloop.run(
                                measure(
                                    CANDIDATES[name],
                                    upstream.url + "/v1",
                                    mode,
                                    n,
                                    per_stream,
                                    args.tokens,
                                )
                            )
                            results.setdefault((mode.name, n, name), []).append(sample)
                    print_table(mode, n, args.clients, results, args.tokens)
        finally:
            upstream.stop()
    return 0


def print_table(
    mode: Mode, n: int, clients: list[str], results: dict[tuple[str, int, str], list[Sample]],
    tokens: int,
) -> None:  # fmt: skip
    def med(name: str, f: Callable[[Sample], float]) -> float:
        return statistics.median(f(s) for s in results[(mode.name, n, name)])

    def per_token(s: Sample) -> float:
        return s.cpu / max(s.tokens, 1) * 1e6

    base = med(clients[0], per_token) if clients[0] == "sdk" else None
    print(f"\n{mode.name}, {n} concurrent stream(s)")
    print("| client | CPU µs/chunk | × sdk | CPU µs/request | reads/request | tokens ok | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in clients:
        samples = results[(mode.name, n, name)]
        us = med(name, per_token)
        ratio = f"{us / base:.2f}" if base else "—"
        per_request = med(name, lambda s: s.cpu / s.requests * 1e6)
        reads = med(name, lambda s: s.reads / s.requests)
        ok = all(s.tokens == s.requests * tokens for s in samples)
        errors = sum(s.errors for s in samples)
        print(
            f"| {name} | {us:.1f} | {ratio} | {per_request:.0f} | {reads:.1f} | "
            f"{'yes' if ok else 'NO'} | {errors} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())  # Ctrl-C: main's finally stops the fake upstream
