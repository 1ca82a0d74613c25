"""Local model benchmark: speed of the bundled model, and what it costs the event loop.

Runs the gateway in this process (uvicorn on this script's event loop, provider
``local``), so the lag of the gateway's own loop can be measured directly:

1. **idle** — a lag probe (``asyncio.sleep(interval)``, recording how late each
   wake-up is) and a prober thread timing WebSocket ``ping``/``pong`` round trips and
   ``GET /healthz`` from its own event loop, with nothing generating: the baseline.
2. **generating** — the same probes while one room streams a long local answer,
   consumed by a WebSocket client; also time-to-first-token and tokens/s.
3. **cancel** — on the provider itself: start a stream, read a few chunks, close
   it, and time until sampling has stopped and the slot is free again.

Figures only; nothing passes or fails.

    .venv/bin/python bench/local_model.py
    .venv/bin/python bench/local_model.py --tokens 400 --runs 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import orjson
import uvicorn
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import create_app  # noqa: E402
from gateway.providers.base import CompletionRequest  # noqa: E402
from gateway.providers.local import LocalProvider, check_available  # noqa: E402
from gateway.server import uvicorn_options  # noqa: E402
from gateway.settings import Settings  # noqa: E402

now = time.perf_counter
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class LagProbe:
    """Samples how late ``asyncio.sleep(interval)`` wakes up on the running loop."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = now()
            await asyncio.sleep(self.interval)
            self.samples.append(now() - start - self.interval)

    def start(self) -> None:
        self.samples = []
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[float]:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.samples


class Prober(threading.Thread):
    """From its own thread and loop: WebSocket ping round trips and REST latency."""

    def __init__(self, url: str, room_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.room_id = url, room_id
        self.ping: list[float] = []
        self.rest: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        ws_url = self.url.replace("http", "ws", 1) + f"/ws/rooms/{self.room_id}"
        async with (
            websockets.connect(ws_url, max_queue=None) as ws,
            httpx2.AsyncClient(base_url=self.url) as http,
        ):
            while orjson.loads(await ws.recv())["type"] != "ready":
                pass
            while not self.stopping.is_set():
                start = now()
                await ws.send('{"type":"ping"}')
                while orjson.loads(await ws.recv())["type"] != "pong":
                    pass
                self.ping.append(now() - start)
                start = now()
                (await http.get("/healthz")).raise_for_status()
                self.rest.append(now() - start)
                await asyncio.sleep(0.01)


async def stream_answer(ws_url: str, content: str, cancel_after: int | None = None) -> dict:
    """Send ``content`` and read the answer; returns timings and token count."""
    async with websockets.connect(ws_url, max_queue=None) as ws:
        while orjson.loads(await ws.recv())["type"] != "ready":
            pass
        sent = now()
        await ws.send(orjson.dumps({"type": "send", "content": content}).decode())
        first = None
        tokens = 0
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "token":
                first = first or now()
                tokens += frame["seq"] - frame.get("seq_from", frame["seq"]) + 1
            elif frame["type"] in ("done", "cancelled", "error"):
                end = now()
                if frame["type"] == "error":
                    raise RuntimeError(frame)
                break
    assert first is not None
    return {
        "ttft": first - sent,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 else float("nan"),
    }


async def create_room(url: str, max_tokens: int, temperature: float) -> str:
    async with httpx2.AsyncClient(base_url=url) as http:
        response = await http.post(
            "/api/rooms",
            json={
                "name": "bench",
                "persona": {
                    "system_prompt": "You are a storyteller.",
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                },
            },
        )
        response.raise_for_status()
        return response.json()["id"]


def summary(name: str, values: list[float], unit: float = 1000) -> str:
    return (
        f"{name:<28} n={len(values):>5}  p50={pct(values, 50) * unit:8.2f}  "
        f"p99={pct(values, 99) * unit:8.2f}  max={max(values, default=float('nan')) * unit:8.2f}"
    )


async def measure_loop(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
        provider="local",
        openai_api_key=None,
        openai_base_url=None,
        log_level="warning",
        local_threads=args.threads,
    )
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        **uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    results: dict[str, Any] = {}
    try:
        room = await create_room(url, args.tokens, 0.7)
        ws_url = f"ws://127.0.0.1:{port}/ws/rooms/{room}"
        await stream_answer(ws_url, "Hello!")  # warm-up: model loaded, caches hot

        probe = LagProbe()
        for phase in ("idle", "generating"):
            prober = Prober(url, await create_room(url, 8, 0.7))
            prober.start()
            probe.start()
            runs = []
            if phase == "idle":
                await asyncio.sleep(args.idle)
            else:
                for _ in range(args.runs):
                    runs.append(await stream_answer(ws_url, PROMPT))
            lag = await probe.stop()
            prober.stopping.set()
            await asyncio.to_thread(prober.join)
            results[phase] = {"loop_lag": lag, "ping": prober.ping, "rest": prober.rest}
            if runs:
                results["answers"] = runs
    finally:
        server.should_exit = True
        await serving
    return results


async def measure_cancel(args: argparse.Namespace) -> list[float]:
    provider = LocalProvider(check_available(None), threads=args.threads)
    request = CompletionRequest(
        model=provider.default_model,
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0.7,
        max_tokens=args.tokens,
    )
    latencies = []
    try:
        for _ in range(args.runs * 2):
            chunks = provider.stream(request)
            seen = 0
            async for chunk in chunks:
                seen += bool(chunk.text)
                if seen == 5:
                    break
            start = now()
            await chunks.aclose()
            # Polled: the slot comes back from the worker thread, with no event to await.
            while provider.free_slots == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
            latencies.append(now() - start)
    finally:
        await provider.aclose()
    return latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="max_tokens per answer")
    parser.add_argument("--runs", type=int, default=3, help="long answers to stream")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle baseline")
    parser.add_argument("--threads", type=int, default=None, help="GATEWAY_LOCAL_THREADS")
    parser.add_argument("--json", action="store_true", help="print raw figures as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        results = await measure_loop(args, Path(tmp))
    results["cancel"] = await measure_cancel(args)

    if args.json:
        print(json.dumps(results, indent=1))
        return
    out = sys.stdout
    print(f"local model: {check_available(None).name}", file=out)
    print("milliseconds:", file=out)
    for phase in ("idle", "generating"):
        for key in ("loop_lag", "ping", "rest"):
            print(summary(f"{phase} {key}", results[phase][key]), file=out)
    idle, busy = results["idle"], results["generating"]
    for key in ("loop_lag", "ping", "rest"):
        base = pct(idle[key], 99)
        print(f"p99 {key} generating/idle: {pct(busy[key], 99) / base:6.2f}x", file=out)
    answers = results["answers"]
    print(summary("time to first token", [a["ttft"] for a in answers]), file=out)
    rates = [a["tokens_per_s"] for a in answers]
    print(
        f"tokens/s: median {statistics.median(rates):.1f} over {len(answers)} answers of "
        f"{[a['tokens'] for a in answers]} tokens",
        file=out,
    )
    print(summary("cancel -> slot free", results["cancel"]), file=out)


if __name__ == "__main__":
    asyncio.run(main())
