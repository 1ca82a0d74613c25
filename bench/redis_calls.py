"""Redis round trips and commands per answer and per token, with the Redis broker.

Starts one gateway (Redis broker, SQLite, a key prefix of its own) and the fake
upstream, joins a room with one WebSocket client, and sends messages answered with
``--short`` and ``--long`` tokens (``--delay`` seconds apart). Redis's ``MONITOR``
records every command naming the run's prefix: a command sent by a client is one
round trip (nothing here is pipelined), a command run by a script counts towards
"commands". Per token = (long − short) / (long − short tokens); per answer = the
short answer's figure less its tokens' share.

    .venv/bin/python bench/redis_calls.py
    .venv/bin/python bench/redis_calls.py --delay 0 --json   # tokens as fast as they come

Figures only; other clients of the same Redis do not count (they use other prefixes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx2
import orjson
import redis
import websockets

from gateway.app import create_app
from gateway.server import uvicorn_options
from gateway.settings import Settings
from gateway.testing.fake_upstream import FakeUpstream, FakeUpstreamServer, Scenario
from gateway.testing.servers import ThreadedServer


class Monitor:
    """Commands that mention ``prefix``, as MONITOR reports them, from another thread."""

    def __init__(self, url: str, prefix: str) -> None:
        self.prefix = prefix
        self._client = redis.Redis.from_url(url)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(5)

    def _run(self) -> None:
        with self._client.monitor() as monitor:
            self._ready.set()
            for entry in monitor.listen():
                if self.prefix in entry["command"]:
                    with self._lock:
                        self._lines.append(f"{entry['client_address']} {entry['command']}")

    def take(self) -> list[str]:
        with self._lock:
            lines, self._lines = self._lines, []
        return lines


def count(lines: list[str]) -> dict[str, Any]:
    """Round trips (commands from clients) and commands run by scripts, by name."""
    trips: Counter[str] = Counter()
    inner: Counter[str] = Counter()
    for line in lines:
        address, _, command = line.partition(" ")
        name = command.split(" ", 1)[0].strip('"').upper()
        (inner if address == "lua" else trips)[name] += 1
    return {
        "round_trips": sum(trips.values()),
        "commands": sum(trips.values()) + sum(inner.values()),
        "trips": dict(trips),
        "in_scripts": dict(inner),
    }


async def answer(ws: Any, upstream: FakeUpstream, tokens: int, delay: float) -> None:
    upstream.script(Scenario(count=tokens, delay=delay))
    await ws.send(orjson.dumps({"type": "send", "content": "go"}).decode())
    while orjson.loads(await ws.recv())["type"] not in ("done", "error", "cancelled"):
        pass


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"bench-calls-{os.urandom(4).hex()}"
    monitor = Monitor(args.redis_url, prefix)
    with tempfile.TemporaryDirectory() as tmp, FakeUpstreamServer(FakeUpstream()) as upstream:
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            database_url=f"sqlite+aiosqlite:///{Path(tmp) / 'gateway.db'}",
            redis_url=args.redis_url,
            redis_prefix=prefix,
            openai_api_key="bench",
            openai_base_url=upstream.base_url,
            default_model="fake-model",
            checkpoint_interval=3600,  # no orphan sweeps during the answers
            lease_seconds=3600,  # no renewals either
        )
        server = ThreadedServer(create_app(settings), **uvicorn_options(settings)).start()
        try:
            async with httpx2.AsyncClient(base_url=server.url) as http:
                room = (await http.post("/api/rooms", json={"name": "calls"})).json()
            figures = {}
            # One member all along: joining is not part of an answer's cost.
            async with websockets.connect(
                f"ws://127.0.0.1:{server.port}/ws/rooms/{room['id']}"
            ) as ws:
                await ws.recv()  # ready
                for tokens in (args.short, args.long):
                    await answer(ws, upstream.upstream, 2, 0)  # warm caches
                    await asyncio.sleep(0.3)
                    monitor.take()
                    await answer(ws, upstream.upstream, tokens, args.delay)
                    await asyncio.sleep(0.3)  # the release and last batch
                    figures[tokens] = count(monitor.take())
        finally:
            server.stop()
            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
    short, long = figures[args.short], figures[args.long]
    extra = args.long - args.short
    per_token = {k: (long[k] - short[k]) / extra for k in ("round_trips", "commands")}
    per_answer = {k: short[k] - args.short * per_token[k] for k in ("round_trips", "commands")}
    return {
        "delay": args.delay,
        "per_answer": per_answer,
        "per_token": per_token,
        f"answer_of_{args.short}_tokens": short,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=105)
    parser.add_argument("--delay", type=float, default=0.01, help="seconds between tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(result))
        return
    print(f"tokens {args.delay} s apart")
    for what in ("per_answer", "per_token"):
        figures = result[what]
        print(
            f"{what.replace('_', ' ')}: {figures['round_trips']:.2f} round trips, "
            f"{figures['commands']:.2f} commands"
        )
    short = result[f"answer_of_{args.short}_tokens"]
    print(f"one answer of {args.short} tokens: round trips {short['trips']}")
    print(f"  commands run by scripts {short['in_scripts']}")


if __name__ == "__main__":
    main()
