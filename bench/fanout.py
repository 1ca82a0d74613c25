"""Fan-out benchmark: one room's streaming answer delivered to many members.

M members (WebSocket clients) join ONE room; member ``i`` connects to gateway process
``i % P``. Member 0 (on process 0, where the answer is generated) sends one message;
the fake upstream answers with T tokens, D seconds apart, and every member receives
every token. For each (member, seq) the script records when the frame carrying that
token arrived (``time.perf_counter``; a merged frame ``seq_from``..``seq`` gives all
its seqs that frame's time), and reports per configuration:

* **delivery lag** of (member, seq) = its receive time − the earliest receive time
  of that seq over all members: p50 / p99 / max over all pairs, and p99 per process
  of the member (do members on the non-generating process lag more?);
* send → first token at the first member;
* members that did not get all T tokens (should be 0);
* gateway CPU seconds (all processes) during the answer, and the load generator's
  event-loop lag p99 and CPU, to judge whether the client was the bottleneck.

Why: several gateway processes share rooms through Redis; the goal is a p99 delivery
lag ≤ 50 ms for 500 members spread over 2 processes. The configurations, each with
fresh processes (fake upstream, gateways, SQLite file, Redis key prefix):

1. ``1p-memory`` — 1 process, memory broker (the baseline);
2. ``1p-redis`` — 1 process, Redis broker;
3. ``2p-redis`` — 2 processes, Redis broker, sharing one SQLite file and prefix.

(``--configs`` takes any ``<P>p-redis``, e.g. ``3p-redis``.) Nothing is pinned: the
gateways, the fake upstream and this load generator share the machine's cores.
Figures only; nothing passes or fails.

    .venv/bin/python bench/fanout.py
    .venv/bin/python bench/fanout.py --members 500 --json

Needs Redis for the ``redis`` configurations (``--redis-url``, default
``redis://127.0.0.1:6379/0``); the keys of each run's prefix are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import os
import re
import resource
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay import (  # the relay benchmark's helpers, shared
    LagMonitor,
    Service,
    _f,
    _gather_bounded,
    _loop_name,
    _raise_exit,
    create_rooms,
    launch_fake_upstream,
    launch_gateway,
    log,
    log_summary,
    max_tokens,
    percentile,
)

now = time.perf_counter  # every timestamp in this script comes from this clock

DEFAULT_CONFIGS = ("1p-memory", "1p-redis", "2p-redis")
_CONFIG_RE = re.compile(r"^(?P<processes>[1-9]\d*)p-(?P<broker>memory|redis)$")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Setup:
    """One configuration: how many gateway processes, and which broker."""

    name: str
    processes: int
    redis: bool

    @property
    def label(self) -> str:
        plural = "es" if self.processes > 1 else ""
        broker = "redis" if self.redis else "memory"
        return f"{self.processes} process{plural}, {broker} broker"


def parse_setup(name: str) -> Setup:
    """``1p-memory``, ``2p-redis``, ... (the memory broker only serves one process)."""
    match = _CONFIG_RE.match(name)
    if match is None:
        raise argparse.ArgumentTypeError(f"{name!r}: expected <P>p-memory or <P>p-redis")
    processes, redis = int(match["processes"]), match["broker"] == "redis"
    if processes > 1 and not redis:
        raise argparse.ArgumentTypeError(f"{name!r}: several processes need the redis broker")
    return Setup(name, processes, redis)


@dataclass
class Options:
    members: int
    tokens: int
    delay: float
    setups: list[Setup]
    redis_url: str
    connect_concurrency: int
    warmup_tokens: int
    timeout: float  # seconds for one whole answer, per member

    @property
    def content(self) -> str:
        return f"go [[fake count={self.tokens} delay={self.delay:g}]]"


# --------------------------------------------------------------------------- members


@dataclass
class Reception:
    """What one member received of one answer. ``seq_times``: seq → receive time."""

    seq_times: dict[int, float] = field(default_factory=dict)
    frames: int = 0  # token-carrying frames
    merged_frames: int = 0  # frames that carried several tokens (``seq_from``)
    error: str | None = None


class Member:
    """One WebSocket client in the room (``websockets`` asyncio client, no compression)."""

    def __init__(self, index: int, process: int, url: str) -> None:
        self.index, self.process, self.url = index, process, url
        self.ws: Any = None
        self.connect_error: str | None = None

    async def connect(self, timeout: float) -> None:
        """Open the socket and wait for ``ready``; failures are kept in ``connect_error``."""
        from websockets.asyncio.client import connect

        try:
            self.ws = await connect(
                self.url,
                compression=None,
                max_size=None,
                max_queue=None,
                open_timeout=timeout,
                ping_interval=None,
                close_timeout=2,
            )
            first = orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))
            if first.get("type") != "ready":
                raise RuntimeError(f"expected ready, got {first.get('type')!r}")
        except Exception as exc:
            self.connect_error = f"connect: {exc!r}"

    async def send(self, content: str, timeout: float = 10.0) -> None:
        frame = orjson.dumps({"type": "send", "content": content}).decode()
        await asyncio.wait_for(self.ws.send(frame), timeout)

    async def read_answer(self, timeout: float) -> Reception:
        """Read until the ``done`` of the next generation; record each token's time."""
        result = Reception()
        times, loads = result.seq_times, orjson.loads
        generation_id = None
        try:
            async with asyncio.timeout(timeout):
                async for raw in self.ws:
                    t = now()
                    frame = loads(raw)
                    kind = frame["type"]
                    if kind == "token":
                        if frame["generation_id"] != generation_id:
                            continue
                        last = frame["seq"]
                        first = frame.get("seq_from", last)
                        for seq in range(first, last + 1):
                            times.setdefault(seq, t)
                        result.frames += 1
                        result.merged_frames += first != last
                    elif kind == "start" and generation_id is None:
                        generation_id = frame["generation_id"]
                    elif kind == "done" and frame.get("generation_id") == generation_id:
                        return result
                    elif kind in ("error", "cancelled"):
                        result.error = f"{kind} frame: {frame.get('code')}: {frame.get('message')}"
                        return result
                result.error = "connection closed before done"
        except TimeoutError:
            result.error = f"timeout after {timeout:g} s"
        except Exception as exc:
            result.error = repr(exc)
        return result

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)


def ws_url(gateway: Service, room_id: str) -> str:
    return gateway.url.replace("http://", "ws://") + f"/ws/rooms/{room_id}"


# --------------------------------------------------------------------------- processes


def start_gateways(
    setup: Setup, options: Options, workdir: Path, upstream: Service, prefix: str
) -> list[Service]:
    """``setup.processes`` gateways on one SQLite file (``workdir/gateway.db``).

    Each one's log is renamed to ``gateway-K.log`` once it runs (the open file stays
    its log), as :func:`relay.launch_gateway` always writes ``gateway.log``.
    Returns the gateways started so far if one fails (the caller stops them).
    """
    env = {"GATEWAY_DEFAULT_MAX_TOKENS": str(max_tokens(options.tokens))}
    if setup.redis:
        env |= {"GATEWAY_REDIS_URL": options.redis_url, "GATEWAY_REDIS_PREFIX": prefix}
    gateways: list[Service] = []
    for k in range(setup.processes):
        gateway = launch_gateway(workdir, upstream_url=upstream.url + "/v1", cpus=None, env=env)
        target = workdir / f"gateway-{k}.log"
        gateway.log_path.rename(target)
        gateway.log_path, gateway.name = target, f"gateway-{k}"
        gateways.append(gateway)
    return gateways


def delete_redis_keys(url: str, prefix: str) -> int:
    """Remove every key of one run's prefix; returns how many."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


def check_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise SystemExit(f"fanout: Redis at {url} is not reachable: {exc}") from None
    finally:
        client.close()


# --------------------------------------------------------------------------- one answer


@dataclass
class Answer:
    """Raw material of one measured answer."""

    t_send: float
    t_end: float
    receptions: list[Reception]
    gateway_cpu_s: list[float]
    loadgen_cpu_s: float
    loadgen_lag_ms: dict[str, Any]


async def run_answer(
    members: Sequence[Member], content: str, timeout: float, gateways: Sequence[Service]
) -> Answer:
    """Every connected member reads; member 0 sends ``content``; wait for all ``done``."""
    connected = [m for m in members if m.ws is not None]
    gc.collect()
    gc.freeze()
    lag = LagMonitor()
    lag.start()
    cpu0 = [sum(g.cpu_times()) for g in gateways], time.process_time()
    readers = [asyncio.create_task(m.read_answer(timeout)) for m in connected]
    await asyncio.sleep(0)  # readers are waiting before the send goes out
    t_send = now()
    try:
        await members[0].send(content)
    except BaseException:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        raise
    results = dict(zip(connected, await asyncio.gather(*readers), strict=True))
    t_end = now()
    cpu1 = [sum(g.cpu_times()) for g in gateways], time.process_time()
    lag_ms = await lag.stop()
    gc.unfreeze()
    receptions = [
        results.get(m) or Reception(error=m.connect_error or "not connected") for m in members
    ]
    return Answer(
        t_send=t_send,
        t_end=t_end,
        receptions=receptions,
        gateway_cpu_s=[round(b - a, 3) for a, b in zip(cpu0[0], cpu1[0], strict=True)],
        loadgen_cpu_s=round(cpu1[1] - cpu0[1], 3),
        loadgen_lag_ms=lag_ms,
    )


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def lag_stats(lags: Sequence[float]) -> dict[str, Any]:
    return {
        "p50": ms(percentile(lags, 50)),
        "p99": ms(percentile(lags, 99)),
        "max": ms(max(lags) if lags else None),
        "n": len(lags),
    }


def analyse(answer: Answer, members: Sequence[Member], tokens: int) -> dict[str, Any]:
    """Delivery lag per (member, seq), first-token time, completeness."""
    earliest: dict[int, float] = {}
    for reception in answer.receptions:
        for seq, t in reception.seq_times.items():
            if t < earliest.get(seq, float("inf")):
                earliest[seq] = t
    lags: list[float] = []
    by_process: dict[int, list[float]] = collections.defaultdict(list)
    wanted = range(1, tokens + 1)
    incomplete = 0
    errors: collections.Counter[str] = collections.Counter()
    for member, reception in zip(members, answer.receptions, strict=True):
        times = reception.seq_times
        own = [t - earliest[seq] for seq, t in times.items()]
        lags.extend(own)
        by_process[member.process].extend(own)
        if reception.error is not None:
            errors[reception.error[:160]] += 1
        if reception.error is not None or not all(seq in times for seq in wanted):
            incomplete += 1
    first = earliest.get(1, min(earliest.values(), default=None))
    last = max(earliest.values(), default=None)
    latest = max((t for r in answer.receptions for t in r.seq_times.values()), default=None)
    wall = answer.t_end - answer.t_send
    return {
        "lag_ms": lag_stats(lags),
        "lag_p99_ms_by_process": {
            str(p): ms(percentile(values, 99)) for p, values in sorted(by_process.items())
        },
        "members_by_process": dict(
            sorted(collections.Counter(str(m.process) for m in members).items())
        ),
        "send_to_first_token_ms": ms(None if first is None else first - answer.t_send),
        "send_to_last_token_first_member_ms": ms(None if last is None else last - answer.t_send),
        "send_to_last_token_any_member_ms": ms(None if latest is None else latest - answer.t_send),
        "members_incomplete": incomplete,
        "errors": errors.most_common(5),
        "frames": sum(r.frames for r in answer.receptions),
        "merged_frames": sum(r.merged_frames for r in answer.receptions),
        "gateway_cpu_s": round(sum(answer.gateway_cpu_s), 3),
        "gateway_cpu_s_by_process": answer.gateway_cpu_s,
        "loadgen_cpu_s": answer.loadgen_cpu_s,
        "loadgen_busy_pct": round(100 * answer.loadgen_cpu_s / wall, 1) if wall > 0 else None,
        "loadgen_lag_ms": answer.loadgen_lag_ms,
        "wall_s": round(wall, 3),
    }


# --------------------------------------------------------------------------- one setup


async def connect_members(
    gateways: Sequence[Service], room_id: str, options: Options
) -> list[Member]:
    """Member ``i`` on process ``i % P``; all connected (or failed) when this returns."""
    members = [
        Member(i, i % len(gateways), ws_url(gateways[i % len(gateways)], room_id))
        for i in range(options.members)
    ]
    await _gather_bounded([m.connect(30) for m in members], options.connect_concurrency)
    return members


async def run_setup(setup: Setup, options: Options, workdir: Path) -> dict[str, Any]:
    """Fresh fake upstream + gateways (+ Redis prefix) for one configuration."""
    prefix = f"bench-fanout-{secrets.token_hex(6)}"
    services: list[Service] = []
    members: list[Member] = []
    started = now()
    try:
        upstream = await asyncio.to_thread(
            launch_fake_upstream, workdir, tokens=options.tokens, delay=options.delay, cpus=None
        )
        services.append(upstream)
        gateways = await asyncio.to_thread(
            start_gateways, setup, options, workdir, upstream, prefix
        )
        services.extend(gateways)
        pids = ", ".join(str(g.proc.pid) for g in gateways)
        log(f"{setup.name}: upstream pid {upstream.proc.pid}, gateway pids {pids}")
        room_id = (await create_rooms(gateways[0].url, 1))[0]

        joining, join_cpu = now(), [sum(g.cpu_times()) for g in gateways]
        members = await connect_members(gateways, room_id, options)
        join_s = now() - joining
        join_cpu_s = sum(sum(g.cpu_times()) for g in gateways) - sum(join_cpu)
        failed = sum(m.connect_error is not None for m in members)
        log(f"{setup.name}: {options.members - failed}/{options.members} members ready")
        if members[0].ws is None:
            raise RuntimeError(f"the sender could not connect: {members[0].connect_error}")

        if options.warmup_tokens:
            warm = f"warm up [[fake count={options.warmup_tokens} delay=0.005]]"
            await run_answer(members, warm, options.timeout, gateways)
            await asyncio.sleep(0.5)
        log(f"{setup.name}: measured answer ({options.tokens} tokens)")
        answer = await run_answer(members, options.content, options.timeout, gateways)
        result = {
            **analyse(answer, members, options.tokens),
            "join_s": round(join_s, 2),
            "join_cpu_s": round(join_cpu_s, 2),
        }
        for gateway in gateways:
            if gateway.proc.poll() is not None:
                log(f"{gateway.name} exited early:\n{gateway.log_tail()}")
    finally:
        await _gather_bounded([m.close() for m in members], options.connect_concurrency)
        for service in reversed(services):
            await asyncio.to_thread(service.stop)
        if setup.redis:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(delete_redis_keys, options.redis_url, prefix)
    return {
        "config": setup.name,
        "label": setup.label,
        "processes": setup.processes,
        "broker": "redis" if setup.redis else "memory",
        "members": options.members,
        "tokens": options.tokens,
        "delay_s": options.delay,
        **result,
        "gateway_logs": {g.name: log_summary(g) for g in services[1:]},
        "run_s": round(now() - started, 1),
    }


def add_ratios(results: list[dict[str, Any]]) -> str | None:
    """``lag_p99_vs_baseline`` on each result: p99 ÷ the first ``1p-memory`` result's
    (else the first result's). Returns the baseline's name."""
    measured = [r for r in results if "failed" not in r]
    if not measured:
        return None
    base = next((r for r in measured if r["config"] == "1p-memory"), measured[0])
    base_p99 = base["lag_ms"]["p99"]
    for r in measured:
        p99 = r["lag_ms"]["p99"]
        r["lag_p99_vs_baseline"] = (
            round(p99 / base_p99, 2) if p99 is not None and base_p99 else None
        )
    return base["config"]


# --------------------------------------------------------------------------- output


COLUMNS: list[tuple[str, int, Callable[[dict[str, Any]], str]]] = [
    ("configuration", 26, lambda r: r["label"]),
    ("lag p50", 8, lambda r: _f(r["lag_ms"]["p50"])),
    ("p99", 7, lambda r: _f(r["lag_ms"]["p99"])),
    ("max", 7, lambda r: _f(r["lag_ms"]["max"])),
    (
        "p99 by process",
        16,
        lambda r: " / ".join(_f(v) for v in r["lag_p99_ms_by_process"].values()),
    ),
    ("p99 ×base", 9, lambda r: _f(r.get("lag_p99_vs_baseline"), 2)),
    ("1st token", 9, lambda r: _f(r["send_to_first_token_ms"])),
    ("incomplete", 10, lambda r: f"{r['members_incomplete']}/{r['members']}"),
    ("merged", 7, lambda r: f"{r['merged_frames']:,}"),
    ("gw CPU s", 8, lambda r: _f(r["gateway_cpu_s"], 2)),
    ("join s", 6, lambda r: _f(r["join_s"], 2)),
    ("join CPU", 8, lambda r: _f(r["join_cpu_s"], 2)),
    ("lg lag p99", 10, lambda r: _f(r["loadgen_lag_ms"]["p99"])),
    ("lg CPU %", 8, lambda r: _f(r["loadgen_busy_pct"], 0)),
]


def format_table(results: list[dict[str, Any]], baseline: str | None) -> str:
    head = "  ".join(
        f"{title:<{width}}" if i == 0 else f"{title:>{width}}"
        for i, (title, width, _) in enumerate(COLUMNS)
    )
    lines = ["", head, "-" * len(head)]
    for r in results:
        if "failed" in r:
            lines.append(f"{r['label']:<{COLUMNS[0][1]}}  failed: {r['failed'][:200]}")
            continue
        lines.append(
            "  ".join(
                f"{fn(r):<{width}}" if i == 0 else f"{fn(r):>{width}}"
                for i, (_, width, fn) in enumerate(COLUMNS)
            )
        )
    lines.append(
        f"\nlag = receive time − earliest receive time of the same seq, in ms, over all "
        f"(member, seq); p99 by process: members on process 0 (the sender's, which "
        f"generates) / 1 / ...; p99 ×base: p99 ÷ {baseline}'s; 1st token: send → first "
        f"token at the first member, ms; merged: token frames carrying several tokens; "
        f"gw CPU s: all gateway processes during the answer; join s: every member "
        f"connected and given its ready (each join is announced to those already in the "
        f"room), and the gateways' CPU seconds meanwhile; lg: this load generator "
        f"(event-loop lag p99 ms, CPU % of the answer's wall time)."
    )
    for r in results:
        if r.get("errors"):
            lines.append(f"{r['config']} errors:")
            lines.extend(f"  {count} × {text}" for text, count in r["errors"])
        for name, summary in r.get("gateway_logs", {}).items():
            if summary.get("levels"):
                lines.append(f"{r['config']} {name} log: {summary['levels']}")
                lines.extend(f"  {count} × {text}" for text, count in summary["exceptions"])
    return "\n".join(lines)


def header(options: Options) -> str:
    return (
        f"fan-out benchmark {datetime.now(UTC):%Y-%m-%d %H:%M UTC} · {os.cpu_count()} CPUs · "
        f"python {sys.version.split()[0]} · load generator loop: {_loop_name()}\n"
        f"one room, {options.members} members (member i on process i % P; member 0 "
        f"sends), one answer of {options.tokens} tokens @ {options.delay * 1000:g} ms\n"
        "pinning: none (gateways, fake upstream and this load generator share all cores)\n"
        f"fresh fake upstream + gateways + SQLite + Redis prefix per configuration; "
        f"redis: {options.redis_url}"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=500, help="members in the room")
    parser.add_argument("--tokens", type=int, default=200, help="tokens in the answer")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between tokens")
    parser.add_argument(
        "--configs",
        nargs="+",
        type=parse_setup,
        default=[parse_setup(name) for name in DEFAULT_CONFIGS],
        metavar="NAME",
        help=f"configurations to run, in order (default: {' '.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--connect-concurrency", type=int, default=50, help="WebSocket handshakes at a time"
    )
    parser.add_argument(
        "--warmup-tokens", type=int, default=10, help="tokens of an unmeasured first answer"
    )
    parser.add_argument("--timeout", type=float, help="seconds per answer (default 30+5×length)")
    parser.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    parser.add_argument(
        "--workdir", type=Path, help="keep databases and process logs here (default: temp dir)"
    )
    return parser.parse_args(argv)


def run_all(options: Options, base: Path) -> list[dict[str, Any]]:
    """Each configuration in its own event loop and working directory; one that fails
    is logged and reported as ``{"config": ..., "failed": ...}``."""
    runner: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    results = []
    for setup in options.setups:
        workdir = base / setup.name
        workdir.mkdir(parents=True, exist_ok=False)
        log(f"{setup.name}: {setup.label}")
        try:
            r = runner(run_setup(setup, options, workdir))
        except Exception as exc:
            log(f"{setup.name} failed: {exc!r}")
            results.append({"config": setup.name, "label": setup.label, "failed": repr(exc)})
            continue
        results.append(r)
        log(
            f"{setup.name}: lag p99 {_f(r['lag_ms']['p99'])} ms, "
            f"incomplete {r['members_incomplete']}, run {r['run_s']:g} s"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(
        members=args.members,
        tokens=args.tokens,
        delay=args.delay,
        setups=args.configs,
        redis_url=args.redis_url,
        connect_concurrency=args.connect_concurrency,
        warmup_tokens=args.warmup_tokens,
        timeout=args.timeout or 30 + 5 * args.tokens * args.delay,
    )
    signal.signal(signal.SIGTERM, _raise_exit)  # run the finally blocks on SIGTERM too
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    if any(s.redis for s in options.setups):
        check_redis(options.redis_url)

    out = sys.stderr if args.json else sys.stdout
    print(header(options), file=out, flush=True)
    started = now()
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            base = args.workdir.resolve() / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fanout-")))
        results = run_all(options, base)
    baseline = add_ratios(results)
    total = now() - started
    if args.json:
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "loop": _loop_name(),
            "pinning": None,
            "members": options.members,
            "tokens": options.tokens,
            "delay_s": options.delay,
            "configs": [asdict(s) for s in options.setups],
            "baseline": baseline,
            "total_s": round(total, 1),
        }
        json.dump({"meta": meta, "results": results}, sys.stdout, indent=2)
        print()
    else:
        print(format_table(results, baseline), file=out)
        print(f"\ntotal time {total:.0f} s", file=out, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; subprocesses stopped")
        sys.exit(130)
