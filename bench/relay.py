"""Relay benchmark: what the gateway adds on top of the upstream it relays.

Starts the fake upstream and the gateway as subprocesses, then for each N:

1. **direct** — N concurrent streams straight against the fake upstream, with a lean
   client (raw asyncio + httptools + orjson by default; no openai SDK), so the
   baseline is the fake plus loopback, nothing else;
2. **relay** — N rooms, one client each, streaming through the gateway (WebSocket
   by default), same token count and delay.

It prints time-to-first-token and inter-token gap (p50/p99) of both side by side,
relayed tokens/s, the gateway's CPU time per token and peak RSS, how many token frames
the gateway merged (``seq_from``) and tokens per frame, and the load generator's own
event-loop lag. Figures only; nothing passes or fails.

The clients read as fast as a browser does. The gateway merges the queued tokens of a
connection that is behind into one frame, so a slow reader makes it send fewer,
larger frames and flatters its tokens/s and CPU per token. Every default client is
therefore a raw asyncio ``Protocol`` that parses each socket read as it arrives and
timestamps it once (all frames in one read share that time, as in
``peer-bench/load.py``): ``ws`` a hand-written WebSocket client (upgrade with
``Sec-WebSocket-Accept`` checked, no extension offered, masked frames, ping → pong),
``sse`` / ``sse-post`` and the direct client httptools + orjson. ``ws-websockets``
runs the ``websockets`` package's client instead, to cross-check: it reads later on a
busy loop and timestamps messages, not reads. Merged frames and the loop lag say
whether a run was limited by the client rather than the gateway.

Pinning: the gateway runs on core 0 (``taskset``); the fake upstream and this
script (the load generator) share core 1, so the gateway's figures are per core.

    .venv/bin/python bench/relay.py --streams 200 500 --tokens 200 --delay 0.02
    .venv/bin/python bench/relay.py --streams 500 --json > results.json
    .venv/bin/python bench/relay.py --streams 200 --transport ws ws-websockets

Extending: a relay transport is a :class:`StreamClient` class registered in
:data:`TRANSPORTS` (``ws``, ``ws-websockets``, ``sse`` and ``sse-post``); a direct
client is registered in :data:`DIRECT_CLIENTS`; the gateway is started by
:func:`launch_gateway` (core list, worker count, env and extra CLI args are
parameters), and its CPU/RSS are summed over its whole process tree.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import gc
import hashlib
import itertools
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

import orjson

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
now = time.perf_counter  # every timestamp in this script comes from this clock


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (for a multi-process gateway)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process (all its threads), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    # After the ")": state=0, ppid=1, ... utime=11, stime=12 (fields 14 and 15 of stat).
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of one process, in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Service:
    """A subprocess started by this script (in its own process group)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [self.proc.pid, *_children(self.proc.pid)]

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the whole process tree."""
        times = [cpu_times(pid) for pid in self.pids()]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def peak_rss_mb(self) -> float:
        return sum(peak_rss_mb(pid) for pid in self.pids())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Anything the group left behind (e.g. workers) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _pinned(cmd: list[str], cpus: str | None) -> list[str]:
    if cpus is None:
        return cmd
    taskset = shutil.which("taskset")
    if taskset is None:
        log("taskset not found: running unpinned (figures are not per core)")
        return cmd
    return [taskset, "-c", cpus, *cmd]


def _spawn(name: str, cmd: list[str], env: dict[str, str], workdir: Path, port: int) -> Service:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killpg takes all of it
        )
    return Service(name, proc, port, log_path)


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Timeout)\w*):")


def log_summary(service: Service) -> dict[str, Any]:
    """How many ERROR/WARNING lines the service logged, and which exceptions ended its
    tracebacks (most common first)."""
    try:
        text = service.log_path.read_text(errors="replace")
    except OSError:
        return {}
    levels = collections.Counter()
    exceptions: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        for level in (" ERROR ", " WARNING ", " CRITICAL "):
            if level in line:
                levels[level.strip()] += 1
        match = _EXCEPTION_LINE.match(line)
        if match:
            exceptions[line[:160]] += 1
    return {"levels": dict(levels), "exceptions": exceptions.most_common(5)}


def wait_http_ready(service: Service, path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    url = service.url + path
    while True:
        if service.proc.poll() is not None:
            raise RuntimeError(
                f"{service.name} exited with {service.proc.returncode}:\n{service.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{service.name} not ready after {timeout} s:\n{service.log_tail()}")
        time.sleep(0.05)


def launch_fake_upstream(
    workdir: Path, *, tokens: int, delay: float, cpus: str | None = "1", port: int | None = None
) -> Service:
    """The fake upstream via its CLI (``record=False`` there: no per-request memory)."""
    port = port or free_port()
    cmd = [
        sys.executable, "-m", "gateway.testing.fake_upstream",
        "--host", "127.0.0.1", "--port", str(port),
        "--count", str(tokens), "--delay", str(delay),
        "--log-level", "warning",
    ]  # fmt: skip
    service = _spawn("fake-upstream", _pinned(cmd, cpus), dict(os.environ), workdir, port)
    wait_http_ready(service, "/v1/models")
    return service


def launch_gateway(
    workdir: Path,
    *,
    upstream_url: str,
    cpus: str | None = "0",
    port: int | None = None,
    model: str = "fake-model",
    env: dict[str, str] | None = None,
    extra_args: Sequence[str] = (),
    command: Sequence[str] | None = None,
) -> Service:
    """``python -m gateway serve`` on a fresh SQLite file in ``workdir``.

    ``cpus`` is a taskset list ("0", "0,1"); ``extra_args`` go after ``serve --port P``
    (e.g. a future ``--workers 2``); ``env`` overrides the benchmark defaults;
    ``command`` replaces ``python -m gateway`` (e.g. another server to compare).
    """
    port = port or free_port()
    values = {
        **os.environ,
        "GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'gateway.db'}",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "OPENAI_BASE_URL": upstream_url,
        "OPENAI_API_KEY": "bench",
        "GATEWAY_DEFAULT_MODEL": model,
        "GATEWAY_LOG_LEVEL": "warning",
        "GATEWAY_UPSTREAM_MAX_RETRIES": "0",
        **(env or {}),
    }
    base = list(command) if command else [sys.executable, "-m", "gateway"]
    cmd = [*base, "serve", "--port", str(port), *extra_args]
    # cwd is the temp dir, so a developer's .env in the checkout cannot leak in.
    service = _spawn("gateway", _pinned(cmd, cpus), values, workdir, port)
    wait_http_ready(service, "/healthz")
    return service


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "p50": ms(percentile(values_s, 50)),
        "p99": ms(percentile(values_s, 99)),
        "max": ms(max(values_s) if values_s else None),
        "n": len(values_s),
    }


class LagMonitor:
    """Sleeps ``interval`` repeatedly on the load generator's loop; records overshoot."""

    def __init__(self, interval: float = 0.010) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        interval, samples = self.interval, self.samples
        while True:
            start = now()
            await asyncio.sleep(interval)
            samples.append(max(0.0, now() - start - interval))

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick())

    async def stop(self) -> dict[str, float | None]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return summary_ms(self.samples)


# --------------------------------------------------------------------------- stream clients


@dataclass
class StreamResult:
    """What one client saw of one answer. Times are ``perf_counter`` seconds, taken once
    per socket read (every frame or event parsed from one read gets that read's time)."""

    t_send: float | None = None
    t_start: float | None = None  # relay only: the gateway announced the generation
    t_first: float | None = None
    t_end: float | None = None
    tokens: int = 0
    frame_times: list[float] = field(default_factory=list)  # one per token-carrying frame
    token_reads: int = 0  # socket reads that carried at least one token
    merged: int = 0  # gateway frames that carried several tokens (``seq_from``)
    merged_tokens: int = 0  # tokens in those frames
    error: str | None = None

    def add_frame(self, tokens: int, t: float) -> None:
        """A frame (event) carrying ``tokens`` tokens, in the socket read taken at ``t``."""
        self.tokens += tokens
        if self.t_first is None:
            self.t_first = t
        times = self.frame_times
        if not times or times[-1] != t:
            self.token_reads += 1
        times.append(t)

    def count_token_frame(self, frame: dict[str, Any], t: float) -> None:
        """A gateway ``token`` frame received at ``t``. Its tokens are counted from its
        text (the fake's tokens are ``"tok{i} "``): a frame carries one upstream read,
        and on a busy machine two tokens sometimes share one; a merged frame
        (``seq_from``) carries several frames' text."""
        tokens = frame["text"].count(" ") or 1
        if frame.get("seq_from") is not None:
            self.merged += 1
            self.merged_tokens += tokens
        self.add_frame(tokens, t)


@dataclass
class StreamSpec:
    """Shared parameters of all streams of one phase."""

    tokens: int  # expected tokens per answer
    timeout: float  # seconds for one whole answer
    content: str = "Say something for the benchmark."


class StreamClient(Protocol):
    """One measured stream. ``prepare`` happens before the barrier (connect, handshake);
    ``run`` sends at once and returns when the answer is complete or failed."""

    async def prepare(self) -> None: ...

    async def run(self) -> StreamResult: ...

    async def close(self) -> None: ...


# ---- direct: raw asyncio + httptools (default) ------------------------------------

_DIRECT_BODY = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "Say something for the benchmark."}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 1024,
}


def max_tokens(tokens: int) -> int:
    """``max_tokens`` sent upstream: the gateway's default, or more for long answers."""
    return max(1024, tokens)


def _direct_body(spec: StreamSpec) -> dict[str, Any]:
    return {
        **_DIRECT_BODY,
        "messages": [{"role": "user", "content": spec.content}],
        "max_tokens": max_tokens(spec.tokens),
    }


def _direct_request(host: str, port: int, spec: StreamSpec) -> bytes:
    body = orjson.dumps(_direct_body(spec))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Authorization: Bearer bench\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _SSEProtocol(asyncio.Protocol):
    """HTTP/1.1 response parsing by httptools (chunked decoding in C), SSE split on
    blank lines, each event decoded by orjson. Nothing else on the per-token path."""

    def __init__(self, result: StreamResult) -> None:
        import httptools

        self.result = result
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.t = 0.0  # time of the socket read being parsed
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # One timestamp per read, for every event in it (httptools calls on_body once
        # per HTTP chunk, and one read often holds several).
        self.t = now()
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # httptools errors, bad JSON
            self._fail(f"bad response: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc!r}")

    def _fail(self, message: str) -> None:
        if not self.finished.done():
            self.result.error = message
            self.finished.set_result(None)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status != 200:
            self._fail(f"HTTP {status}")

    def on_body(self, body: bytes) -> None:
        t = self.t
        buffer = self.buffer + body
        events = buffer.split(b"\n\n")
        self.buffer = events.pop()
        for event in events:
            self.on_event(event, t)

    def on_event(self, event: bytes, t: float) -> None:
        """One upstream chunk: count its content token."""
        if not event.startswith(b"data: ") or event == b"data: [DONE]":
            return
        choices = orjson.loads(event[6:])["choices"]
        if choices and choices[0]["delta"].get("content"):
            self.result.add_frame(1, t)

    def on_message_complete(self) -> None:
        if not self.finished.done():
            self.result.t_end = self.t
            self.finished.set_result(None)


async def wait_finished(protocol: Any, spec: StreamSpec, result: StreamResult) -> StreamResult:
    """Wait until ``protocol`` has the whole answer (or failed), at most the timeout."""
    try:
        async with asyncio.timeout(spec.timeout):
            await asyncio.shield(protocol.finished)
    except TimeoutError:
        result.error = f"timeout after {spec.timeout:g} s"
    return result


class RawDirectClient:
    """A stream straight from the upstream. The connection is opened in ``prepare``,
    so TTFT runs from writing the request to the first content token."""

    label = "raw asyncio + httptools + orjson (no SDK, no httpx)"

    def __init__(self, host: str, port: int, spec: StreamSpec) -> None:
        self.host, self.port, self.spec = host, port, spec
        self.result = StreamResult()
        self.protocol: _SSEProtocol | None = None

    async def prepare(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.protocol = await loop.create_connection(
            lambda: _SSEProtocol(self.result), self.host, self.port
        )

    async def run(self) -> StreamResult:
        protocol = self.protocol
        assert protocol is not None and protocol.transport is not None
        request = _direct_request(self.host, self.port, self.spec)
        self.result.t_send = now()
        protocol.transport.write(request)
        return await wait_finished(protocol, self.spec, self.result)

    async def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()


class Httpx2DirectClient:
    """Alternative direct client on ``httpx2`` streaming (heavier per token; TTFT
    includes the connect). For comparison with the raw client only."""

    label = "httpx2 streaming (aiter_lines + orjson)"
    _clients: ClassVar[dict[Any, Any]] = {}  # one pooled client per event loop

    def __init__(self, host: str, port: int, spec: StreamSpec) -> None:
        self.url = f"http://{host}:{port}/v1/chat/completions"
        self.spec = spec
        self.result = StreamResult()

    @classmethod
    def shared(cls) -> Any:
        loop = asyncio.get_running_loop()
        if loop not in cls._clients:
            import httpx2

            cls._clients[loop] = httpx2.AsyncClient(
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None),
                timeout=httpx2.Timeout(60.0),
            )
        return cls._clients[loop]

    async def prepare(self) -> None:
        self.shared()

    async def run(self) -> StreamResult:
        result = self.result
        body = _direct_body(self.spec)
        try:
            async with asyncio.timeout(self.spec.timeout):
                result.t_send = now()
                async with self.shared().stream(
                    "POST", self.url, json=body, headers={"authorization": "Bearer bench"}
                ) as response:
                    if response.status_code != 200:
                        result.error = f"HTTP {response.status_code}"
                        return result
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        t = now()
                        choices = orjson.loads(line[6:])["choices"]
                        if choices and choices[0]["delta"].get("content"):
                            result.add_frame(1, t)
                result.t_end = now()
        except TimeoutError:
            result.error = f"timeout after {self.spec.timeout:g} s"
        except Exception as exc:
            result.error = repr(exc)
        return result

    async def close(self) -> None:
        pass


DIRECT_CLIENTS: dict[str, type] = {"raw": RawDirectClient, "httpx2": Httpx2DirectClient}


# ---- relay: WebSocket ---------------------------------------------------------------


@dataclass
class RelayTarget:
    """Where relay clients connect: the gateway and one room per stream."""

    base_url: str  # http://127.0.0.1:PORT
    options: dict[str, Any] = field(default_factory=dict)  # transport-specific knobs


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 §5.3: a client masks every frame)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


class _WsProtocol(asyncio.Protocol):
    """A lean WebSocket client connection, as fast a reader as a browser.

    HTTP/1.1 upgrade (``Sec-WebSocket-Key``, the server's ``Sec-WebSocket-Accept``
    checked; no extension offered, so none may be accepted), then server frames parsed
    incrementally in :meth:`data_received`: text (and binary) messages decoded by
    orjson, fragments joined, ping answered with pong, close answered and reported.
    Every frame parsed from one socket read gets that read's timestamp. ``ready``
    resolves :attr:`joined` (with None, or the error that came first); the ``done`` of
    the generation announced by ``start`` resolves :attr:`finished`."""

    def __init__(self, result: StreamResult, host_port: str, path: str) -> None:
        loop = asyncio.get_running_loop()
        self.result = result
        self.key = base64.b64encode(os.urandom(16))
        self.handshake = (
            f"GET {path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.open = False  # the upgrade is done; frames follow
        self.fragments: bytearray | None = None
        self.close_sent = False
        self.t = 0.0  # time of the socket read being parsed
        self.generation_id: str | None = None
        self.joined: asyncio.Future[str | None] = loop.create_future()  # error, or None
        self.finished: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.handshake)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc!r}" if exc else "connection closed before done")
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, message: str) -> None:
        if not self.joined.done():
            self.joined.set_result(message)
        if not self.finished.done():
            self.result.error = message
            self.finished.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.t = now()
        self.buffer += data
        try:
            if self.open or self._upgrade():
                self._frames()
        except Exception as exc:  # a protocol violation, bad JSON
            self._fail(f"bad data from the server: {exc!r}")
            if self.transport is not None:
                self.transport.close()

    def _upgrade(self) -> bool:
        """Parse the handshake response once it is complete; True when it was."""
        buffer = self.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        status_line, *lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        status = int(status_line.split(b" ", 2)[1])
        if status != 101:
            raise ValueError(f"HTTP {status} instead of 101")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self.key + _WS_GUID).digest())
        if headers.get(b"sec-websocket-accept") != accept:
            raise ValueError("wrong Sec-WebSocket-Accept")
        if headers.get(b"upgrade", b"").lower() != b"websocket":
            raise ValueError("no Upgrade: websocket")
        if b"sec-websocket-extensions" in headers:
            raise ValueError("the server chose an extension that was not offered")
        self.open = True
        return True

    def _frames(self) -> None:
        buffer = self.buffer
        size, pos = len(buffer), 0
        while size - pos >= 2:
            b0, b1 = buffer[pos], buffer[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:
                raise ValueError("masked frame from the server")
            if b0 & 0x70:
                raise ValueError("RSV bits set, no extension was negotiated")
            if size - pos < head + length:
                break
            payload = bytes(buffer[pos + head : pos + head + length])
            pos += head + length
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping → pong, same payload
                self.transport.write(ws_frame(0xA, payload))
                continue
            if opcode == 0xA:  # pong (unsolicited)
                continue
            if opcode == 0x8:
                self._on_close(payload)
                break
            if opcode == 0x0:
                if self.fragments is None:
                    raise ValueError("continuation frame outside a message")
                self.fragments += payload
                if not b0 & 0x80:
                    continue
                payload, self.fragments = bytes(self.fragments), None
            elif opcode in (0x1, 0x2):
                if self.fragments is not None:
                    raise ValueError("new message inside a fragmented one")
                if not b0 & 0x80:
                    self.fragments = bytearray(payload)
                    continue
            else:
                raise ValueError(f"unknown opcode {opcode}")
            self.on_message(payload)
        del buffer[:pos]

    def on_message(self, payload: bytes) -> None:
        data = orjson.loads(payload)
        kind, t, result = data["type"], self.t, self.result
        if kind == "token":
            if self.generation_id is None or data["generation_id"] == self.generation_id:
                result.count_token_frame(data, t)
        elif kind == "start":
            self.generation_id = data["generation_id"]
            result.t_start = t
        elif kind == "done":
            if data["generation_id"] == self.generation_id and not self.finished.done():
                result.t_end = t
                self.finished.set_result(None)
        elif kind == "ready":
            if not self.joined.done():
                self.joined.set_result(None)
        elif kind in ("error", "cancelled"):
            self._fail(f"{kind} frame: {data.get('code')}: {data.get('message')}")

    def _on_close(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        self._fail(f"closed by the server: {code} {payload[2:].decode(errors='replace')}")
        self.send_close(payload[:2])
        self.transport.close()

    def send_close(self, code: bytes = (1000).to_bytes(2, "big")) -> None:
        if not self.close_sent and self.transport is not None:
            self.close_sent = True
            self.transport.write(ws_frame(0x8, code))


class RawWsClient:
    """One room, one lean WebSocket client (:class:`_WsProtocol`: raw asyncio Protocol,
    no extension offered, per-read timestamps), the default ``ws`` transport.

    ``prepare`` connects, upgrades and waits for ``ready``; ``run`` writes one ``send``
    frame and waits for the ``done`` of the generation it started. TTFT: send frame
    written → first socket read carrying a ``token`` frame. Merged frames count
    ``seq - seq_from + 1`` tokens."""

    label = "raw asyncio Protocol + orjson (no extension offered, timestamps per socket read)"

    def __init__(self, target: RelayTarget, room_id: str, spec: StreamSpec) -> None:
        self.host_port = target.base_url.removeprefix("http://")
        self.host, port = self.host_port.rsplit(":", 1)
        self.port = int(port)
        self.path = f"/ws/rooms/{room_id}"
        self.spec = spec
        self.result = StreamResult()
        self.protocol: _WsProtocol | None = None
        self.send_frame = ws_frame(0x1, orjson.dumps({"type": "send", "content": spec.content}))

    async def prepare(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.protocol = await loop.create_connection(
            lambda: _WsProtocol(self.result, self.host_port, self.path), self.host, self.port
        )
        error = await asyncio.wait_for(asyncio.shield(self.protocol.joined), 30)
        if error is not None:
            raise RuntimeError(error)

    async def run(self) -> StreamResult:
        protocol = self.protocol
        assert protocol is not None and protocol.transport is not None
        self.result.t_send = now()
        protocol.transport.write(self.send_frame)
        return await wait_finished(protocol, self.spec, self.result)

    async def close(self) -> None:
        """Close handshake: our close frame, then up to 5 s for the server's."""
        protocol = self.protocol
        if protocol is None or protocol.transport is None:
            return
        if not protocol.transport.is_closing():
            protocol.send_close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.closed), 5)
        protocol.transport.close()


class WebsocketsClient:
    """One room, one ``websockets`` asyncio client (``max_queue=None``): the
    ``ws-websockets`` transport, to cross-check :class:`RawWsClient`.

    Heavier per frame (its reader task queues every message, then this loop picks it
    up), so on a busy load generator it reads later and the gateway merges more tokens
    per frame; timestamps are taken per message as this loop gets it, not per socket
    read. Offers permessage-deflate unless ``--ws-compression none`` (the gateway
    declines it). TTFT: send frame written → first ``token`` frame."""

    label = "websockets asyncio client, max_queue=None (timestamps per message)"

    def __init__(self, target: RelayTarget, room_id: str, spec: StreamSpec) -> None:
        self.url = target.base_url.replace("http://", "ws://") + f"/ws/rooms/{room_id}"
        self.compression = target.options.get("ws_compression", "deflate")
        self.spec = spec
        self.result = StreamResult()
        self.ws: Any = None

    async def prepare(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(
            self.url,
            max_queue=None,
            compression=None if self.compression == "none" else "deflate",
            open_timeout=30,
            ping_interval=None,
            max_size=None,
        )
        first = orjson.loads(await asyncio.wait_for(self.ws.recv(), 30))
        if first.get("type") != "ready":
            raise RuntimeError(f"expected ready, got {first.get('type')!r}")

    async def run(self) -> StreamResult:
        result, ws = self.result, self.ws
        generation_id = None
        loads = orjson.loads
        frame = orjson.dumps({"type": "send", "content": self.spec.content}).decode()
        try:
            async with asyncio.timeout(self.spec.timeout):
                result.t_send = now()
                await ws.send(frame)
                async for raw in ws:
                    t = now()
                    data = loads(raw)
                    kind = data["type"]
                    if kind == "token":
                        if generation_id is not None and data["generation_id"] != generation_id:
                            continue
                        result.count_token_frame(data, t)
                    elif kind == "start":
                        generation_id = data["generation_id"]
                        result.t_start = t
                    elif kind == "done" and data["generation_id"] == generation_id:
                        result.t_end = t
                        break
                    elif kind in ("error", "cancelled"):
                        result.error = f"{kind} frame: {data.get('code')}: {data.get('message')}"
                        break
                else:
                    result.error = "connection closed before done"
        except TimeoutError:
            result.error = f"timeout after {self.spec.timeout:g} s"
        except Exception as exc:
            result.error = repr(exc)
        return result

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)


# ---- relay: SSE ---------------------------------------------------------------------


class _GatewaySSEProtocol(_SSEProtocol):
    """The gateway's event stream: ``id:``/``event:``/``data:`` events, same frames as
    over WebSocket. ``ready`` resolves :attr:`joined`; ``done`` ends the measurement."""

    def __init__(self, result: StreamResult) -> None:
        super().__init__(result)
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_event(self, event: bytes, t: float) -> None:
        _, found, payload = event.rpartition(b"data: ")
        if not found:
            return  # a heartbeat comment or the retry: line
        result = self.result
        data = orjson.loads(payload)
        kind = data["type"]
        if kind == "ready":
            if not self.joined.done():
                self.joined.set_result(None)
        elif kind == "done":
            if not self.finished.done():
                result.t_end = t
                self.finished.set_result(None)
        elif kind == "token":
            result.count_token_frame(data, t)
        elif kind == "start":
            result.t_start = t
        elif kind in ("error", "cancelled"):
            self._fail(f"{kind} event: {data.get('code')}: {data.get('message')}")


class SsePostClient:
    """The ``curl -N`` way: per answer, ``POST /api/rooms/{id}/messages`` with
    ``Accept: text/event-stream`` on one HTTP/1.1 connection, the response streaming
    that generation, read by httptools + orjson (the lean client of the direct phase).
    ``prepare`` only opens the connection, so the room is cold in the gateway's cache,
    unlike the other transports whose clients joined first. TTFT: request written →
    first ``token`` event. Coalesced events count ``seq - seq_from + 1`` tokens."""

    label = "raw asyncio + httptools + orjson, POST .../messages as text/event-stream"

    def __init__(self, target: RelayTarget, room_id: str, spec: StreamSpec) -> None:
        host_port = target.base_url.removeprefix("http://")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.spec = spec
        self.result = StreamResult()
        self.protocol: _GatewaySSEProtocol | None = None
        self.request = self._request(host_port, room_id, "text/event-stream")

    def _request(self, host_port: str, room_id: str, accept: str) -> bytes:
        body = orjson.dumps({"content": self.spec.content})
        return (
            f"POST /api/rooms/{room_id}/messages HTTP/1.1\r\nHost: {host_port}\r\n"
            f"Content-Type: application/json\r\nAccept: {accept}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def _connect(self, request: bytes | None = None) -> _GatewaySSEProtocol:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            lambda: _GatewaySSEProtocol(self.result), self.host, self.port
        )
        if request is not None:
            protocol.transport.write(request)
        return protocol

    async def prepare(self) -> None:
        self.protocol = await self._connect()

    async def run(self) -> StreamResult:
        protocol = self.protocol
        assert protocol is not None and protocol.transport is not None
        self.result.t_send = now()
        protocol.transport.write(self.request)
        return await wait_finished(protocol, self.spec, self.result)

    close = RawDirectClient.close


class SseClient(SsePostClient):
    """The ``EventSource`` way, like a browser without WebSockets: ``prepare`` opens
    ``GET /api/rooms/{id}/events`` and waits for ``ready`` (joining the room, as the
    WebSocket client does); ``run`` posts the message (202) on a second connection and
    reads the answer from the event stream. TTFT: POST written → first ``token``."""

    label = "raw asyncio + httptools + orjson, GET .../events + POST .../messages (202)"

    def __init__(self, target: RelayTarget, room_id: str, spec: StreamSpec) -> None:
        super().__init__(target, room_id, spec)
        host_port = f"{self.host}:{self.port}"
        self.events_request = (
            f"GET /api/rooms/{room_id}/events HTTP/1.1\r\nHost: {host_port}\r\n"
            "Accept: text/event-stream\r\n\r\n"
        ).encode()
        self.request = self._request(host_port, room_id, "application/json")
        self.poster: asyncio.Transport | None = None

    async def prepare(self) -> None:
        self.protocol = await self._connect(self.events_request)
        await asyncio.wait_for(self.protocol.joined, 30)
        loop = asyncio.get_running_loop()
        self.poster, _ = await loop.create_connection(asyncio.Protocol, self.host, self.port)

    async def run(self) -> StreamResult:
        assert self.protocol is not None and self.poster is not None
        self.result.t_send = now()
        self.poster.write(self.request)  # its 202 response is not read
        return await wait_finished(self.protocol, self.spec, self.result)

    async def close(self) -> None:
        await super().close()
        if self.poster is not None:
            self.poster.close()


# Relay transports: name -> client class taking (RelayTarget, room_id, StreamSpec).
TRANSPORTS: dict[str, type] = {
    "ws": RawWsClient,
    "ws-websockets": WebsocketsClient,
    "sse": SseClient,
    "sse-post": SsePostClient,
}


# --------------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    name: str
    client: str
    streams: int
    ok_streams: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    tokens: int = 0
    frames: int = 0  # token-carrying frames (events)
    merged_frames: int = 0  # frames with ``seq_from``: tokens the gateway merged
    merged_tokens: int = 0  # tokens in those frames
    tokens_per_frame: float | None = None
    tokens_per_merged_frame: float | None = None
    token_reads: int = 0  # socket reads (websockets client: messages) carrying tokens
    coalesced_tokens_pct: float | None = None  # tokens read with an earlier one, % (load.py)
    peak_active: int = 0  # most streams between first and last token at the same time
    wall_s: float = 0.0
    send_spread_ms: float = 0.0
    tokens_per_s: float = 0.0
    ttft_ms: dict[str, Any] = field(default_factory=dict)
    send_to_start_ms: dict[str, Any] = field(default_factory=dict)  # relay: request → start
    start_to_first_ms: dict[str, Any] = field(default_factory=dict)  # relay: start → token 1
    last_to_end_ms: dict[str, Any] = field(default_factory=dict)  # last token → done/end
    gap_ms: dict[str, Any] = field(default_factory=dict)
    loadgen_lag_ms: dict[str, Any] = field(default_factory=dict)
    loadgen_cpu_s: float = 0.0
    upstream_cpu_s: float = 0.0
    core1_busy_pct: float = 0.0
    gateway: dict[str, Any] | None = None


async def _gather_bounded(coros: Sequence[Any], limit: int) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def one(coro: Any) -> Any:
        async with semaphore:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)


async def run_phase(
    name: str,
    clients: Sequence[Any],
    *,
    spec: StreamSpec,
    upstream: Service,
    gateway: Service | None = None,
    connect_concurrency: int = 64,
) -> PhaseResult:
    """Prepare every client, release them all at once, and measure."""
    label = type(clients[0]).label if clients else "?"
    phase = PhaseResult(name=name, client=label, streams=len(clients))
    prepared = await _gather_bounded([c.prepare() for c in clients], connect_concurrency)
    ready = [c for c, r in zip(clients, prepared, strict=True) if not isinstance(r, BaseException)]
    for r in prepared:
        if isinstance(r, BaseException):
            phase.errors += 1
            if len(phase.error_samples) < 5:
                phase.error_samples.append(f"prepare: {r!r}")
    gc.collect()
    gc.freeze()
    await asyncio.sleep(0.2)  # let connection setup work drain on all sides

    lag = LagMonitor()
    lag.start()
    cpu0 = time.process_time(), upstream.cpu_seconds(), gateway.cpu_times() if gateway else (0, 0)
    t0 = now()
    # The barrier: every task is created before any runs, so all sends go out in
    # the same pass of the event loop.
    tasks = [asyncio.create_task(c.run()) for c in ready]
    results: list[StreamResult] = await asyncio.gather(*tasks)
    t1 = now()
    cpu1 = time.process_time(), upstream.cpu_seconds(), gateway.cpu_times() if gateway else (0, 0)
    phase.loadgen_lag_ms = await lag.stop()
    gc.unfreeze()
    await _gather_bounded([c.close() for c in clients], connect_concurrency)

    ttfts, gaps, to_start, start_to_first, last_to_end = [], [], [], [], []
    sends = [r.t_send for r in results if r.t_send is not None]
    ends = [r.t_end or r.frame_times[-1] for r in results if r.t_end or r.frame_times]
    for r in results:
        if r.error is None and r.tokens != spec.tokens:
            r.error = f"got {r.tokens} tokens, expected {spec.tokens}"
        if r.error is not None:
            phase.errors += 1
            if len(phase.error_samples) < 5:
                phase.error_samples.append(r.error)
        else:
            phase.ok_streams += 1
        phase.tokens += r.tokens
        phase.frames += len(r.frame_times)
        phase.merged_frames += r.merged
        phase.merged_tokens += r.merged_tokens
        phase.token_reads += r.token_reads
        if r.t_first is not None and r.t_send is not None:
            ttfts.append(r.t_first - r.t_send)
        if r.t_start is not None and r.t_send is not None:
            to_start.append(r.t_start - r.t_send)
            if r.t_first is not None:
                start_to_first.append(r.t_first - r.t_start)
        times = r.frame_times
        if times and r.t_end is not None:
            last_to_end.append(r.t_end - times[-1])
        gaps.extend(b - a for a, b in itertools.pairwise(times))
    edges = sorted(
        edge
        for r in results
        if r.t_first is not None
        for edge in ((r.t_first, 1), (r.frame_times[-1], -1))
    )
    active = 0
    for _, step in edges:
        active += step
        phase.peak_active = max(phase.peak_active, active)
    start = min(sends) if sends else t0
    end = max(ends) if ends else t1
    phase.wall_s = round(end - start, 4)
    phase.send_spread_ms = round((max(sends) - min(sends)) * 1000, 2) if sends else 0.0
    phase.tokens_per_s = round(phase.tokens / phase.wall_s, 1) if phase.wall_s > 0 else 0.0
    if phase.frames:
        phase.tokens_per_frame = round(phase.tokens / phase.frames, 3)
    if phase.merged_frames:
        phase.tokens_per_merged_frame = round(phase.merged_tokens / phase.merged_frames, 2)
    if phase.tokens:
        coalesced = phase.tokens - phase.token_reads
        phase.coalesced_tokens_pct = round(100 * coalesced / phase.tokens, 2)
    phase.ttft_ms = summary_ms(ttfts)
    phase.gap_ms = summary_ms(gaps)
    phase.last_to_end_ms = summary_ms(last_to_end)
    if to_start:
        phase.send_to_start_ms = summary_ms(to_start)
        phase.start_to_first_ms = summary_ms(start_to_first)
    elapsed = t1 - t0
    phase.loadgen_cpu_s = round(cpu1[0] - cpu0[0], 3)
    phase.upstream_cpu_s = round(cpu1[1] - cpu0[1], 3)
    phase.core1_busy_pct = round(100 * (phase.loadgen_cpu_s + phase.upstream_cpu_s) / elapsed, 1)
    if gateway is not None:
        user, system = cpu1[2][0] - cpu0[2][0], cpu1[2][1] - cpu0[2][1]
        gateway_cpu = user + system
        phase.gateway = {
            "cpu_s": round(gateway_cpu, 3),
            "user_s": round(user, 3),
            "system_s": round(system, 3),
            "cpu_s_per_1k_tokens": round(1000 * gateway_cpu / phase.tokens, 4)
            if phase.tokens
            else None,
            "cpu_us_per_token": round(1e6 * gateway_cpu / phase.tokens, 1)
            if phase.tokens
            else None,
            "busy_pct": round(100 * gateway_cpu / elapsed, 1),
            "peak_rss_mb": round(gateway.peak_rss_mb(), 1),
        }
    return phase


async def create_rooms(base_url: str, n: int, concurrency: int = 16) -> list[str]:
    import httpx2

    async with httpx2.AsyncClient(base_url=base_url, timeout=60) as http:

        async def one(i: int) -> str:
            response = await http.post("/api/rooms", json={"name": f"bench room {i}"})
            if response.status_code != 201:
                raise RuntimeError(f"POST /api/rooms: {response.status_code} {response.text}")
            return response.json()["id"]

        results = await _gather_bounded([one(i) for i in range(n)], concurrency)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


# --------------------------------------------------------------------------- one N


@dataclass
class RunConfig:
    streams: list[int]
    tokens: int
    delay: float
    transports: list[str]
    direct_client: str
    ws_compression: str
    warmup: int
    timeout: float | None
    pin: bool
    gateway_cpus: str
    client_cpus: str
    gateway_env: dict[str, str]  # extra environment for the gateway (settings knobs)
    gateway_args: list[str]  # extra `serve` arguments (e.g. --workers 2)
    hold: float  # seconds to keep the processes alive after each N (for profiling)


async def run_one(n: int, config: RunConfig, workdir: Path) -> dict[str, Any]:
    """Fresh fake upstream + fresh gateway (new database) for this N, torn down after."""
    timeout = config.timeout or 30 + 5 * config.tokens * config.delay
    spec = StreamSpec(tokens=config.tokens, timeout=timeout)
    pin = config.pin
    services: list[Service] = []
    started = now()
    try:
        upstream = await asyncio.to_thread(
            launch_fake_upstream,
            workdir,
            tokens=config.tokens,
            delay=config.delay,
            cpus=config.client_cpus if pin else None,
        )
        services.append(upstream)
        gateway = await asyncio.to_thread(
            launch_gateway,
            workdir,
            upstream_url=upstream.url + "/v1",
            cpus=config.gateway_cpus if pin else None,
            # The gateway caps answers at GATEWAY_DEFAULT_MAX_TOKENS (1024): lift it.
            env={
                "GATEWAY_DEFAULT_MAX_TOKENS": str(max_tokens(config.tokens)),
                **config.gateway_env,
            },
            extra_args=config.gateway_args,
        )
        services.append(gateway)
        log(f"N={n}: upstream pid {upstream.proc.pid}, gateway pid {gateway.proc.pid}")

        direct_cls = DIRECT_CLIENTS[config.direct_client]
        host, port = "127.0.0.1", upstream.port

        # Warm-up: short answers (a directive the fake understands), not measured.
        if config.warmup:
            quick = StreamSpec(
                tokens=10, timeout=30, content="warm up [[fake count=10 delay=0.002]]"
            )
            await run_phase(
                "warmup-direct",
                [direct_cls(host, port, quick) for _ in range(config.warmup)],
                spec=quick,
                upstream=upstream,
            )
            rooms = await create_rooms(gateway.url, config.warmup)
            for transport in config.transports:
                target = RelayTarget(gateway.url, {"ws_compression": config.ws_compression})
                await run_phase(
                    "warmup-relay",
                    [TRANSPORTS[transport](target, r, quick) for r in rooms],
                    spec=quick,
                    upstream=upstream,
                    gateway=gateway,
                )

        log(f"N={n}: direct phase")
        direct = await run_phase(
            "direct",
            [direct_cls(host, port, spec) for _ in range(n)],
            spec=spec,
            upstream=upstream,
        )
        relays = {}
        for transport in config.transports:
            rooms = await create_rooms(gateway.url, n)
            await asyncio.sleep(0.5)
            log(f"N={n}: relay phase ({transport})")
            target = RelayTarget(gateway.url, {"ws_compression": config.ws_compression})
            relays[transport] = await run_phase(
                f"relay-{transport}",
                [TRANSPORTS[transport](target, r, spec) for r in rooms],
                spec=spec,
                upstream=upstream,
                gateway=gateway,
            )
        if config.hold:
            log(f"N={n}: holding for {config.hold:g} s (gateway pid {gateway.proc.pid})")
            await asyncio.sleep(config.hold)
        if gateway.proc.poll() is not None:
            log(f"gateway exited early:\n{gateway.log_tail()}")
        gateway_log = log_summary(gateway)
    finally:
        for service in reversed(services):
            await asyncio.to_thread(service.stop)

    return {
        "streams": n,
        "tokens": config.tokens,
        "delay_s": config.delay,
        "direct": asdict(direct),
        "relay": {name: asdict(phase) for name, phase in relays.items()},
        "derived": {name: _derived(direct, phase) for name, phase in relays.items()},
        "gateway_log": gateway_log,
        "run_s": round(now() - started, 1),
    }


def _derived(direct: PhaseResult, relay: PhaseResult) -> dict[str, Any]:
    def sub(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 3)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    return {
        "added_ttft_p50_ms": sub(relay.ttft_ms.get("p50"), direct.ttft_ms.get("p50")),
        "added_ttft_p99_ms": sub(relay.ttft_ms.get("p99"), direct.ttft_ms.get("p99")),
        "gap_p99_ratio": ratio(relay.gap_ms.get("p99"), direct.gap_ms.get("p99")),
        "tokens_per_s_ratio": ratio(relay.tokens_per_s, direct.tokens_per_s),
    }


# --------------------------------------------------------------------------- output


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _pair(stats: dict[str, Any]) -> str:
    if not stats:
        return "—"
    return f"{_f(stats['p50'])} / {_f(stats['p99'])}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+,.1f}"


CLIENT_LAG_WARN_MS = 5.0  # load generator lag p99 above this: the client may be the limit
CLIENT_BUSY_WARN_PCT = 90.0  # ... or core 1 (fake upstream + load generator) this busy


def format_result(result: dict[str, Any], config: RunConfig) -> str:
    d = result["direct"]
    lines = [
        "",
        f"== {result['streams']} streams × {result['tokens']} tokens @ "
        f"{result['delay_s'] * 1000:g} ms  (run {result['run_s']:g} s) ==",
    ]
    for name, r in result["relay"].items():
        x = result["derived"][name]
        g = r["gateway"] or {}
        cols = [("direct", d), (f"relay {name}", r)]
        rows = [
            ("TTFT p50 / p99 ms", lambda p: _pair(p["ttft_ms"])),
            ("  send → start frame p50 / p99", lambda p: _pair(p["send_to_start_ms"])),
            ("  start → 1st token p50 / p99", lambda p: _pair(p["start_to_first_ms"])),
            ("gap p50 / p99 ms", lambda p: _pair(p["gap_ms"])),
            ("gap max ms", lambda p: _f(p["gap_ms"]["max"])),
            ("last token → done p50 / p99", lambda p: _pair(p["last_to_end_ms"])),
            ("tokens/s", lambda p: _f(p["tokens_per_s"], 0)),
            ("wall s (1st send → last done)", lambda p: _f(p["wall_s"], 2)),
            ("errors (streams)", lambda p: f"{p['errors']} / {p['streams']}"),
            ("peak streams receiving tokens", lambda p: f"{p['peak_active']:,}"),
            ("token frames", lambda p: f"{p['frames']:,}"),
            ("  merged (seq_from) frames", lambda p: f"{p['merged_frames']:,}"),
            ("  tokens/frame (merged only)", lambda p: "{} ({})".format(
                _f(p["tokens_per_frame"], 3), _f(p["tokens_per_merged_frame"], 2))),
            ("tokens sharing a read %", lambda p: _f(p["coalesced_tokens_pct"])),
            ("loadgen lag p50/p99/max ms", lambda p: "{} / {} / {}".format(
                _f(p["loadgen_lag_ms"]["p50"]), _f(p["loadgen_lag_ms"]["p99"]),
                _f(p["loadgen_lag_ms"]["max"]))),
            ("loadgen CPU s", lambda p: _f(p["loadgen_cpu_s"], 2)),
            ("core 1 busy % (fake+loadgen)", lambda p: _f(p["core1_busy_pct"], 0)),
        ]  # fmt: skip
        width = 30
        lines.append(f"{'':{width}} {cols[0][0]:>20} {cols[1][0]:>20}")
        for title, fn in rows:
            lines.append(f"{title:{width}} {fn(cols[0][1]):>20} {fn(cols[1][1]):>20}")
        lines.append(
            f"added TTFT p50 {_signed(x['added_ttft_p50_ms'])} ms "
            f"(p99 {_signed(x['added_ttft_p99_ms'])}) · "
            f"gap p99 relay/direct {_f(x['gap_p99_ratio'], 2)}× · "
            f"gateway CPU {_f(g.get('cpu_us_per_token'))} µs/token "
            f"({_f(g.get('cpu_s_per_1k_tokens'), 3)} CPU-s per 1k tokens, "
            f"{_f(100 * g['system_s'] / g['cpu_s'] if g.get('cpu_s') else None, 0)} % kernel; "
            f"core 0 busy {_f(g.get('busy_pct'), 0)} %) · peak RSS {_f(g.get('peak_rss_mb'))} MB"
        )
        lag_p99 = r["loadgen_lag_ms"].get("p99")
        if (lag_p99 or 0) > CLIENT_LAG_WARN_MS or r["core1_busy_pct"] > CLIENT_BUSY_WARN_PCT:
            lines.append(
                f"  ! load generator lag p99 {_f(lag_p99)} ms, core 1 busy "
                f"{_f(r['core1_busy_pct'], 0)} %: the client side (or other load on the "
                "machine) may limit these figures; a client that reads late gets more "
                "tokens merged per frame"
            )
        for sample in (d["error_samples"] + r["error_samples"])[:3]:
            lines.append(f"  error: {sample}")
    summary = result.get("gateway_log") or {}
    if summary.get("levels"):
        lines.append(f"gateway log: {summary['levels']}")
        for text, count in summary["exceptions"]:
            lines.append(f"  {count} × {text}")
    return "\n".join(lines)


def _loop_name() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    return f"uvloop {uvloop.__version__}"


def header(config: RunConfig) -> str:
    direct = DIRECT_CLIENTS[config.direct_client].label
    relays = ", ".join(f"{t}: {TRANSPORTS[t].label}" for t in config.transports)
    pin = (
        f"gateway on core {config.gateway_cpus}; fake upstream + load generator on core "
        f"{config.client_cpus}"
        if config.pin
        else "unpinned"
    )
    return (
        f"relay benchmark {datetime.now(UTC):%Y-%m-%d %H:%M UTC} · {os.cpu_count()} CPUs · "
        f"python {sys.version.split()[0]} · load generator loop: {_loop_name()}\n"
        f"pinning: {pin}\ndirect client: {direct}\nrelay client: {relays}"
        + (
            f" (ws-websockets offers permessage-deflate: "
            f"{'yes' if config.ws_compression == 'deflate' else 'no'})"
            if "ws-websockets" in config.transports
            else ""
        )
        + "\n"
        + (f"gateway env: {config.gateway_env}\n" if config.gateway_env else "")
        + (f"gateway args: {config.gateway_args}\n" if config.gateway_args else "")
        + "fresh fake upstream + gateway + SQLite per N; TTFT = request/send frame written → "
        "first token; gap = between token-carrying frames; one timestamp per socket read"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--tokens", type=int, default=200, help="tokens per answer")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds between tokens")
    parser.add_argument(
        "--transport", nargs="+", default=["ws"], choices=sorted(TRANSPORTS), dest="transports"
    )
    parser.add_argument("--direct-client", default="raw", choices=sorted(DIRECT_CLIENTS))
    parser.add_argument(
        "--ws-compression",
        default="deflate",
        choices=["deflate", "none"],
        help="ws-websockets only: offer permessage-deflate like browsers do (default), or "
        "not (the lean ws client offers no extension; the gateway declines it anyway)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="warm-up streams per side")
    parser.add_argument("--timeout", type=float, help="seconds per stream (default 30+5×length)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--gateway-cpus", default="0", help="taskset list for the gateway")
    parser.add_argument(
        "--client-cpus", default="1", help="taskset list for the fake upstream and this script"
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra gateway environment, e.g. GATEWAY_CHECKPOINT_INTERVAL=5 (repeatable)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes (`serve --workers N`; more than 1 needs --gateway-env "
        "GATEWAY_REDIS_URL=redis://...)",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    parser.add_argument(
        "--hold", type=float, default=0.0, help="keep processes alive N s after each run"
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep databases and process logs here (default: temp dir)"
    )
    return parser.parse_args(argv)


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = RunConfig(
        streams=args.streams,
        tokens=args.tokens,
        delay=args.delay,
        transports=args.transports,
        direct_client=args.direct_client,
        ws_compression=args.ws_compression,
        warmup=args.warmup,
        timeout=args.timeout,
        pin=not args.no_pin,
        gateway_cpus=args.gateway_cpus,
        client_cpus=args.client_cpus,
        gateway_env=dict(item.split("=", 1) for item in args.gateway_env),
        gateway_args=["--workers", str(args.workers)] if args.workers > 1 else [],
        hold=args.hold,
    )
    signal.signal(signal.SIGTERM, _raise_exit)  # run the finally blocks on SIGTERM too
    # Each stream holds several descriptors on each side; children inherit this.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if config.pin:
        os.sched_setaffinity(0, {int(c) for c in config.client_cpus.split(",")})
    runner: Callable[..., Any] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run

    out = sys.stderr if args.json else sys.stdout
    print(header(config), file=out, flush=True)
    results = []
    started = now()
    with contextlib.ExitStack() as stack:
        if args.workdir is not None:
            base = args.workdir.resolve()
            base.mkdir(parents=True, exist_ok=True)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-relay-")))
        for n in config.streams:
            workdir = base / f"n{n}"
            if workdir.exists():
                shutil.rmtree(workdir)
            workdir.mkdir()
            result = runner(run_one(n, config, workdir))
            results.append(result)
            print(format_result(result, config), file=out, flush=True)
    total = now() - started
    print(f"\ntotal time {total:.0f} s", file=out, flush=True)
    if args.json:
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "config": asdict(config),
            "direct_client": DIRECT_CLIENTS[config.direct_client].label,
            "total_s": round(total, 1),
        }
        json.dump({"meta": meta, "results": results}, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; subprocesses stopped")
        sys.exit(130)
