"""Local model benchmark: speed of the bundled model, and what it costs the event loop.

Runs the gateway in this process (uvicorn on this script's event loop, provider
``local``), so the lag of the gateway's own loop can be measured directly:

1. **idle** — a lag probe (``asyncio.sleep(interval)``, recording how late each
   wake-up is) and a prober thread timing WebSocket ``ping``/``pong`` round trips and
   ``GET /healthz`` from its own event loop, with nothing generating: the baseline.
2. **generating** — the same probes while one room (a new one each run: a prompt
   the engine has not seen) streams a long local answer, consumed by a WebSocket
   client; also time-to-first-token and tokens/s.
3. **rooms** — N rooms (``--rooms``, default 4) each post a message, one every
   ``--stagger`` seconds, so each later one joins answers already streaming: each
   room's time to first token, the total tokens/s (all rooms' tokens over the span
   from the first token to the last, and over the span where all N stream at once)
   and the loop lag meanwhile.
4. **engine** — the provider alone, without the gateway, its clients or probes in
   the process: one answer, then N answers started ``--stagger`` s apart.
5. **cancel** — on the provider itself: start a stream, read a few chunks, close
   it, and time until sampling has stopped and its sequence is free again.
6. **gap** — on the provider: three answers, the middle one short; the two left,
   after it ended, against two answers alone together (an engine that leaves the
   gap pays llama.cpp a pass per answer each step).
7. **ceiling** — llama.cpp alone, no engine: the time of a decode carrying one
   answer's next token (on the threads the engine gives one token) and of one
   carrying N answers' next tokens (on its batch threads), each after the same
   prompt. N x the first / the second is the most any engine built on llama.cpp can
   gain from decoding N answers together on this machine: phase 4's ratio is judged
   against it.

With ``--baseline-module PATH`` (a copy of an earlier ``gateway/providers/local.py``)
phases 2 to 5 run on that engine too, in the same run, runs taking turns between the
engines so that a machine whose speed drifts shifts both alike.

Figures only; nothing passes or fails.

    .venv/bin/python bench/local_model.py
    .venv/bin/python bench/local_model.py --tokens 400 --runs 5 --json
    .venv/bin/python bench/local_model.py --baseline-module /tmp/local_old.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
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
from gateway.providers.local import (  # noqa: E402
    PREFILL_CHUNK,
    LocalProvider,
    _Model,
    check_available,
    default_batch_threads,
    default_threads,
)
from gateway.server import uvicorn_options  # noqa: E402
from gateway.settings import Settings  # noqa: E402

now = time.perf_counter
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
STORYTELLER = "You are a storyteller."


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


async def read_answer(ws: Any, content: str) -> dict[str, Any]:
    """On an open room WebSocket: send ``content`` and read the answer; returns its
    timings (perf_counter seconds), token count and each token frame's arrival."""
    sent = now()
    await ws.send(orjson.dumps({"type": "send", "content": content}).decode())
    first = None
    tokens = 0
    arrivals: list[tuple[float, int]] = []
    while True:
        frame = orjson.loads(await ws.recv())
        if frame["type"] == "token":
            at = now()
            first = first or at
            count = frame["seq"] - frame.get("seq_from", frame["seq"]) + 1
            tokens += count
            arrivals.append((at, count))
        elif frame["type"] in ("done", "cancelled", "error"):
            end = now()
            if frame["type"] == "error":
                raise RuntimeError(frame)
            break
    assert first is not None
    return {
        "sent": sent,
        "first": first,
        "end": end,
        "ttft": first - sent,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 else float("nan"),
        "arrivals": arrivals,
    }


async def joined(ws_url: str) -> Any:
    """A room WebSocket, past its ``ready`` frame."""
    ws = await websockets.connect(ws_url, max_queue=None)
    while orjson.loads(await ws.recv())["type"] != "ready":
        pass
    return ws


async def stream_answer(ws_url: str, content: str) -> dict[str, Any]:
    """Join the room, send ``content`` and read the answer."""
    ws = await joined(ws_url)
    try:
        answer = await read_answer(ws, content)
    finally:
        await ws.close()
    del answer["arrivals"]
    return answer


async def rooms_at_once(url: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    """``args.rooms`` rooms, the i-th posting ``i * args.stagger`` s after the first.
    Each room has its own persona: no prompt begins like another's (else the engine
    would find most of it already in its cache)."""
    rooms = [
        await create_room(url, args.tokens, 0.7, f"Room {os.urandom(4).hex()}: {STORYTELLER}")
        for _ in range(args.rooms)
    ]
    sockets = [await joined(f"ws://127.0.0.1:{port}/ws/rooms/{room}") for room in rooms]

    async def post(index: int) -> dict[str, Any]:
        await asyncio.sleep(index * args.stagger)
        return await read_answer(sockets[index], PROMPT)

    try:
        answers = await asyncio.gather(*(post(i) for i in range(args.rooms)))
    finally:
        for ws in sockets:
            await ws.close()
    tokens = sum(a["tokens"] for a in answers)
    start, end = min(a["first"] for a in answers), max(a["end"] for a in answers)
    # Where every room streams: from the last one's first token to the first one's end.
    together_from, together_to = max(a["first"] for a in answers), min(a["end"] for a in answers)
    together = sum(
        count for a in answers for at, count in a["arrivals"] if together_from <= at <= together_to
    )
    span = together_to - together_from
    return {
        "ttft": [a["ttft"] for a in answers],
        "tokens": [a["tokens"] for a in answers],
        "tokens_per_s": tokens / (end - start),
        "together_tokens_per_s": together / span if span > 0.5 else float("nan"),
        "together_seconds": span,
    }


async def create_room(
    url: str, max_tokens: int, temperature: float, system_prompt: str = STORYTELLER
) -> str:
    async with httpx2.AsyncClient(base_url=url) as http:
        response = await http.post(
            "/api/rooms",
            json={
                "name": "bench",
                "persona": {
                    "system_prompt": system_prompt,
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


def load_baseline(path: Path) -> Any:
    """The module at ``path`` (an earlier ``local.py``), imported under its own name."""
    spec = importlib.util.spec_from_file_location("local_baseline", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_provider(engine: str, args: argparse.Namespace) -> Any:
    model = check_available(None)
    if engine == "baseline":
        baseline = load_baseline(args.baseline_module)
        return baseline.LocalProvider(model, threads=args.threads)
    return LocalProvider(
        model,
        threads=args.threads,
        batch_threads=args.batch_threads,
        max_sequences=max(args.rooms, 4),
        prefill_chunk=args.prefill_chunk,
        flash_attention=args.flash_attention,
    )


@dataclass
class Gateway:
    """A gateway serving on this event loop, on one engine."""

    engine: str
    server: uvicorn.Server
    serving: asyncio.Task[None]
    port: int
    room: str = ""  # where the warm-up answer goes
    probe_room: str = ""  # where the prober pings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, room: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/rooms/{room}"


async def start_gateway(args: argparse.Namespace, workdir: Path, engine: str) -> Gateway:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite+aiosqlite:///{workdir / f'{engine}.db'}",
        provider="local",
        openai_api_key=None,
        openai_base_url=None,
        log_level="warning",
        local_threads=args.threads,
    )
    config = uvicorn.Config(
        create_app(settings, provider=make_provider(engine, args)),
        host="127.0.0.1",
        port=0,
        log_level="warning",
        **uvicorn_options(settings),
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for this
        await asyncio.sleep(0.01)
    gateway = Gateway(engine, server, serving, server.servers[0].sockets[0].getsockname()[1])
    gateway.room = await create_room(gateway.url, args.tokens, 0.7)
    gateway.probe_room = await create_room(gateway.url, 8, 0.7)
    await stream_answer(gateway.ws_url(gateway.room), "Hello!")  # warm-up: caches hot
    return gateway


async def probed(gateway: Gateway, work: Any, into: dict[str, list[float]]) -> Any:
    """Run ``work`` (a coroutine) under the lag probe and the prober; their samples
    are added to ``into``."""
    prober = Prober(gateway.url, gateway.probe_room)
    prober.start()
    probe = LagProbe()
    probe.start()
    try:
        return await work
    finally:
        into.setdefault("loop_lag", []).extend(await probe.stop())
        prober.stopping.set()
        await asyncio.to_thread(prober.join)
        into.setdefault("ping", []).extend(prober.ping)
        into.setdefault("rest", []).extend(prober.rest)


async def measure_loop(
    args: argparse.Namespace, workdir: Path, engines: list[str]
) -> dict[str, Any]:
    """Every phase on every engine, runs taking turns between the engines (a machine
    whose speed drifts then shifts them alike)."""
    gateways = [await start_gateway(args, workdir, engine) for engine in engines]
    results: dict[str, Any] = {engine: {} for engine in engines}
    try:
        idle: dict[str, list[float]] = {}
        await probed(gateways[-1], asyncio.sleep(args.idle), idle)
        results[engines[-1]]["idle"] = idle
        for run in range(max(args.runs, args.room_runs)):
            for gateway in gateways:
                mine = results[gateway.engine]
                if run < args.runs:
                    phase = mine.setdefault("generating", {"runs": []})
                    # A new room each time: a prompt the engine has not seen.
                    persona = f"Room {os.urandom(4).hex()}: {STORYTELLER}"
                    room = await create_room(gateway.url, args.tokens, 0.7, persona)
                    answer = stream_answer(gateway.ws_url(room), PROMPT)
                    phase["runs"].append(await probed(gateway, answer, phase))
                if run < args.room_runs:
                    phase = mine.setdefault("rooms", {"runs": []})
                    rooms = rooms_at_once(gateway.url, gateway.port, args)
                    phase["runs"].append(await probed(gateway, rooms, phase))
    finally:
        for gateway in gateways:
            gateway.server.should_exit = True
            await gateway.serving
    return results


async def provider_answer(provider: Any, tokens: int, delay: float = 0.0) -> dict[str, Any]:
    """One answer straight from the provider (no gateway), after ``delay`` seconds."""
    await asyncio.sleep(delay)
    request = CompletionRequest(
        model=provider.default_model,
        messages=[
            {"role": "system", "content": f"Room {os.urandom(4).hex()}: {STORYTELLER}"},
            {"role": "user", "content": PROMPT},
        ],
        temperature=0.7,
        max_tokens=tokens,
    )
    sent, times = now(), []
    async for chunk in provider.stream(request):
        if chunk.text:
            times.append(now())
    assert times
    return {"sent": sent, "first": times[0], "end": now(), "tokens": len(times), "times": times}


def rate_between(answers: list[dict[str, Any]], start: float, end: float) -> float:
    """Tokens/s of ``answers`` together between ``start`` and ``end``."""
    return sum(start < t <= end for a in answers for t in a["times"]) / (end - start)


async def measure_gap(args: argparse.Namespace) -> dict[str, list[float]]:
    """Three answers started 0.3 s apart on consecutive sequences, the middle one
    stopping after 40 tokens: the other two's tokens/s after it ended, beside two
    answers alone together (the same when the engine closed the gap it left)."""
    provider = make_provider("new", args)
    results: dict[str, list[float]] = {"two": [], "after_gap": []}
    try:
        await provider_answer(provider, 5)  # warm-up
        for _ in range(args.room_runs):
            two = await asyncio.gather(*(provider_answer(provider, args.tokens) for _ in range(2)))
            start, end = max(a["first"] for a in two), min(a["end"] for a in two)
            results["two"].append(rate_between(two, start, end))
            first, middle, last = await asyncio.gather(
                provider_answer(provider, args.tokens),
                provider_answer(provider, 40, 0.3),
                provider_answer(provider, args.tokens, 0.6),
            )
            end = min(first["end"], last["end"])
            results["after_gap"].append(rate_between([first, last], middle["end"], end))
    finally:
        await provider.aclose()
    return results


async def measure_engines(args: argparse.Namespace, engines: list[str]) -> dict[str, Any]:
    """The engines alone, without the gateway: one answer, then ``args.rooms`` answers
    started ``args.stagger`` s apart; runs take turns between the engines."""
    providers = {engine: make_provider(engine, args) for engine in engines}
    results: dict[str, Any] = {engine: {"alone": [], "together": []} for engine in engines}
    try:
        for provider in providers.values():
            await provider_answer(provider, args.tokens)  # warm-up
        for _ in range(args.room_runs):
            for engine, provider in providers.items():
                alone = await provider_answer(provider, args.tokens)
                results[engine]["alone"].append(
                    {
                        "ttft": alone["first"] - alone["sent"],
                        "tokens_per_s": (alone["tokens"] - 1) / (alone["end"] - alone["first"]),
                    }
                )
                answers = await asyncio.gather(
                    *(
                        provider_answer(provider, args.tokens, i * args.stagger)
                        for i in range(args.rooms)
                    )
                )
                span = max(a["end"] for a in answers) - min(a["first"] for a in answers)
                results[engine]["together"].append(
                    {
                        "ttft": [a["first"] - a["sent"] for a in answers],
                        "tokens_per_s": sum(a["tokens"] for a in answers) / span,
                    }
                )
    finally:
        for provider in providers.values():
            await provider.aclose()
    return results


async def measure_cancel(args: argparse.Namespace, engine: str) -> list[float]:
    provider = make_provider(engine, args)

    def free() -> int:  # the earlier engine counted slots, this one sequences
        return provider.free_sequences if engine == "new" else provider.free_slots

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
                if seen == 1:
                    all_free = free() + 1
                if seen == 5:
                    break
            start = now()
            await chunks.aclose()
            # Polled: the id comes back from the engine thread, with no event to await.
            while free() < all_free:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
            latencies.append(now() - start)
    finally:
        await provider.aclose()
    return latencies


def measure_ceiling(args: argparse.Namespace, steps: int = 96) -> dict[str, Any]:
    """Decode times straight from llama.cpp (a thread of its own, like the engine's):
    one sequence's next token alone, then the next token of ``args.rooms`` sequences
    at once, blocks of each taking turns; every sequence first reads the same
    storyteller prompt as the other phases."""
    import llama_cpp

    threads = args.threads or default_threads()
    batch_threads = args.batch_threads or args.threads or default_batch_threads()
    model = _Model(
        llama_cpp,
        check_available(None),
        context_tokens=4096,
        max_sequences=args.rooms,
        threads=threads,
        batch_threads=batch_threads,
        flash_attention=args.flash_attention,
    )
    lib, batch = model.lib, model.batch
    messages = [
        {"role": "system", "content": f"Room 0: {STORYTELLER}"},
        {"role": "user", "content": PROMPT},
    ]
    prompt = model.prompt(messages)
    positions = [0] * args.rooms

    def decode(tokens: list[tuple[int, int]]) -> float:
        """Decode ``(sequence, token)`` pairs, each at its sequence's next position,
        logits for all; returns the seconds llama_decode took."""
        for index, (seq_id, token) in enumerate(tokens):
            batch.token[index], batch.pos[index] = token, positions[seq_id]
            batch.n_seq_id[index], batch.seq_id[index][0] = 1, seq_id
            batch.logits[index] = True
            positions[seq_id] += 1
        batch.n_tokens = len(tokens)
        start = now()
        status = lib.llama_decode(model.ctx, batch)
        assert status == 0, status
        return now() - start

    try:
        for seq_id in range(args.rooms):
            decode([(seq_id, token) for token in prompt])
        one: list[float] = []
        together: list[float] = []
        token = prompt[-1]  # which token is fed does not change a decode's cost
        for _ in range(steps // 8):
            one += [decode([(0, token)]) for _ in range(8)]
            together += [decode([(i, token) for i in range(args.rooms)]) for _ in range(8)]
    finally:
        model.close()
    t1, tn = statistics.median(one), statistics.median(together)
    return {
        "threads": threads,
        "batch_threads": batch_threads,
        "one_ms": t1 * 1000,
        "together_ms": tn * 1000,
        "ceiling": args.rooms * t1 / tn,
    }


def report(name: str, results: dict[str, Any], out: Any) -> None:
    print(f"\n== {name} engine", file=out)
    print("milliseconds:", file=out)
    phases = [p for p in ("idle", "generating", "rooms") if p in results]
    for phase in phases:
        for key in ("loop_lag", "ping", "rest"):
            print(summary(f"{phase} {key}", results[phase][key]), file=out)
    if "idle" in results:
        idle, busy = results["idle"], results["generating"]
        for key in ("loop_lag", "ping", "rest"):
            base = pct(idle[key], 99)
            print(f"p99 {key} generating/idle: {pct(busy[key], 99) / base:6.2f}x", file=out)
    answers = results["generating"]["runs"]
    print(summary("one room: first token", [a["ttft"] for a in answers]), file=out)
    rates = [a["tokens_per_s"] for a in answers]
    print(
        f"one room: tokens/s median {statistics.median(rates):.1f} over {len(answers)} "
        f"answers of {[a['tokens'] for a in answers]} tokens",
        file=out,
    )
    runs = results["rooms"]["runs"]
    for i, run in enumerate(runs):
        ttfts = " ".join(f"{t * 1000:6.0f}" for t in run["ttft"])
        print(
            f"rooms run {i}: first token ms [{ttfts}]  tokens {run['tokens']}  "
            f"total {run['tokens_per_s']:6.1f}/s  all at once "
            f"{run['together_tokens_per_s']:6.1f}/s over {run['together_seconds']:.1f} s",
            file=out,
        )
    total = statistics.median(r["tokens_per_s"] for r in runs)
    together = statistics.median(r["together_tokens_per_s"] for r in runs)
    worst_ttft = statistics.median(max(r["ttft"][1:] or r["ttft"]) for r in runs)
    alone = statistics.median(rates)
    print(
        f"rooms (median of {len(runs)}): total {total:.1f} tokens/s ({total / alone:.2f}x one "
        f"room), all at once {together:.1f}/s ({together / alone:.2f}x); slowest first "
        f"token of a joining room {worst_ttft * 1000:.0f} ms",
        file=out,
    )
    alone = statistics.median(r["tokens_per_s"] for r in results["engine"]["alone"])
    runs = results["engine"]["together"]
    together = statistics.median(r["tokens_per_s"] for r in runs)
    joining = statistics.median(max(r["ttft"][1:] or r["ttft"]) for r in runs)
    print(
        f"engine alone (no gateway, median of {len(runs)}): one answer {alone:.1f} tokens/s; "
        f"{len(runs[0]['ttft'])} at once {together:.1f} tokens/s ({together / alone:.2f}x), "
        f"slowest first token of a joining answer {joining * 1000:.0f} ms",
        file=out,
    )
    print(summary("cancel -> sequence free", results["cancel"]), file=out)
    if gap := results.get("gap"):
        two, after = statistics.median(gap["two"]), statistics.median(gap["after_gap"])
        print(
            f"two answers left after a third on the sequence between them ended: "
            f"{after:.1f} tokens/s (two alone together {two:.1f}/s, {after / two:.2f}x)",
            file=out,
        )
    if ceiling := results.get("ceiling"):
        n = len(runs[0]["ttft"])
        print(
            f"llama.cpp alone (no engine): one token {ceiling['one_ms']:.1f} ms on "
            f"{ceiling['threads']} thread(s), {n} answers' tokens {ceiling['together_ms']:.1f} ms "
            f"on {ceiling['batch_threads']}: at most {ceiling['ceiling']:.2f}x one answer's "
            f"tokens/s on this machine (the engine alone reached {together / alone:.2f}x)",
            file=out,
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="max_tokens per answer")
    parser.add_argument("--runs", type=int, default=3, help="long answers to stream")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle baseline")
    parser.add_argument("--threads", type=int, default=None, help="GATEWAY_LOCAL_THREADS")
    parser.add_argument(
        "--batch-threads", type=int, default=None, help="threads for several tokens at once"
    )
    parser.add_argument("--rooms", type=int, default=4, help="rooms answering at once")
    parser.add_argument("--stagger", type=float, default=0.5, help="seconds between rooms")
    parser.add_argument("--room-runs", type=int, default=3, help="runs of the rooms phase")
    parser.add_argument(
        "--prefill-chunk", type=int, default=PREFILL_CHUNK, help="prompt tokens per step"
    )
    parser.add_argument("--flash-attention", action="store_true", help="llama.cpp's FA")
    parser.add_argument(
        "--baseline-module", type=Path, default=None, help="an earlier local.py to compare"
    )
    parser.add_argument("--json", action="store_true", help="print raw figures as JSON")
    args = parser.parse_args()

    engines = ["new"] if args.baseline_module is None else ["baseline", "new"]
    with tempfile.TemporaryDirectory() as tmp:
        results = await measure_loop(args, Path(tmp), engines)
    for engine, figures in (await measure_engines(args, engines)).items():
        results[engine]["engine"] = figures
    for engine in engines:
        results[engine]["cancel"] = await measure_cancel(args, engine)
    results["new"]["gap"] = await measure_gap(args)
    results["new"]["ceiling"] = await asyncio.to_thread(measure_ceiling, args)

    if args.json:
        print(json.dumps(results, indent=1))
        return
    out = sys.stdout
    print(f"local model: {check_available(None).name}", file=out)
    for engine in engines:
        report(engine, results[engine], out)
    if args.baseline_module is not None:
        old, new = results["baseline"], results["new"]

        def median(results: dict[str, Any], key: str) -> float:
            return statistics.median(a[key] for a in results["generating"]["runs"])

        print(
            f"\none room, new/baseline: tokens/s "
            f"{median(new, 'tokens_per_s') / median(old, 'tokens_per_s'):.2f}x, first token "
            f"{median(new, 'ttft') * 1000:.0f} ms vs {median(old, 'ttft') * 1000:.0f} ms",
            file=out,
        )


if __name__ == "__main__":
    asyncio.run(main())
