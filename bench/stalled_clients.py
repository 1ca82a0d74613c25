"""What clients that stop reading cost the gateway: its memory, and its sockets.

Starts a gateway process (``python -m gateway.cli serve``, from this checkout or from
``--src`` another one, to compare in one run) on a fresh SQLite file and the fake
upstream, then:

1. **busy room**: 20 raw WebSockets join a room and never read, while one client
   that keeps up streams an ~8 MB answer there;
2. **long history**: a room holding ~4 MB of messages is joined by 20 raw WebSockets
   that never read (the ``ready`` snapshot is what they stall on).

For each it prints the gateway's resident memory (``VmRSS``) before, right after, and
``--settle`` seconds later, and how many of the 20 connections the gateway still holds
(server side ESTABLISHED in ``/proc/net/tcp``)::

    python bench/stalled_clients.py                     # this checkout
    python bench/stalled_clients.py --src /tmp/old-src  # another one (same venv)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx2
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.testing.fake_upstream import (  # noqa: E402
    FakeUpstream,
    FakeUpstreamServer,
    Scenario,
)
from tests.netutil import ESTABLISHED, open_stalled_socket, tcp_state  # noqa: E402

STALLED = 20
FLOOD_TOKEN = "x" * 1023 + " "


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def held(port: int, socks: list[socket.socket]) -> int:
    """How many of ``socks`` the server side still holds ESTABLISHED."""
    return sum(tcp_state(port, sock) == ESTABLISHED for sock in socks)


async def new_room(http: httpx2.AsyncClient) -> str:
    response = await http.post(
        "/api/rooms",
        json={"name": "bench", "persona": {"max_tokens": 10_000, "context_tokens": 20_000}},
    )
    response.raise_for_status()
    return response.json()["id"]


async def busy_room(port: int, pid: int, upstream: FakeUpstream, settle: float) -> None:
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        room = await new_room(http)
    before = rss_mb(pid)
    socks = [open_stalled_socket(port, room) for _ in range(STALLED)]
    upstream.script(Scenario(tokens=[FLOOD_TOKEN] * 8000))
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/rooms/{room}", max_size=None) as ws:
        await ws.recv()
        await ws.send('{"type":"send","content":"flood"}')
        while '"type":"done"' not in str(await ws.recv()):
            pass
    after = rss_mb(pid)
    await asyncio.sleep(settle)
    report("busy room, 8 MB answer", before, after, rss_mb(pid), held(port, socks), settle)
    for sock in socks:
        sock.close()


async def long_history(port: int, pid: int, upstream: FakeUpstream, settle: float) -> None:
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        room = await new_room(http)
        upstream.script(Scenario(tokens=["ok"]))
        for _ in range(128):  # 128 x 32,000 characters: about 4 MB
            response = await http.post(
                f"/api/rooms/{room}/messages",
                json={"content": "y" * 32_000},
                headers={"accept": "text/event-stream"},
            )
            response.raise_for_status()
    before = rss_mb(pid)
    socks = [open_stalled_socket(port, room) for _ in range(STALLED)]
    await asyncio.sleep(1)
    after = rss_mb(pid)
    await asyncio.sleep(settle)
    report("4 MB history, stalled joins", before, after, rss_mb(pid), held(port, socks), settle)
    for sock in socks:
        sock.close()


def report(name: str, before: float, after: float, later: float, holding: int, settle: float):
    print(
        f"{name:30} RSS {before:6.1f} MB -> {after:6.1f} (+{after - before:5.1f}) "
        f"-> {later:6.1f} MB after {settle:.0f} s; "
        f"connections still held: {holding}/{STALLED}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="checkout to run")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds before re-reading")
    args = parser.parse_args()
    with FakeUpstreamServer(FakeUpstream(Scenario())) as upstream_server:
        with tempfile.TemporaryDirectory() as tmp:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            probe.close()
            env = {
                **os.environ,
                "PYTHONPATH": str(args.src),
                "GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/gateway.db",
                "OPENAI_BASE_URL": upstream_server.base_url,
                "OPENAI_API_KEY": "bench",
                "GATEWAY_PROVIDER": "openai",
                "GATEWAY_DEFAULT_MODEL": "fake",
                "GATEWAY_LOG_LEVEL": "warning",
                "GATEWAY_PORT": str(port),
            }
            server = subprocess.Popen(  # noqa: ASYNC220  (a bench: no loop to spare)
                [sys.executable, "-m", "gateway.cli", "serve"], env=env, cwd=tmp
            )
            try:
                async with httpx2.AsyncClient() as http:
                    for _ in range(200):
                        try:
                            if (await http.get(f"http://127.0.0.1:{port}/healthz")).is_success:
                                break
                        except httpx2.TransportError:
                            await asyncio.sleep(0.1)
                print(f"gateway from {args.src}", flush=True)
                await busy_room(port, server.pid, upstream_server.upstream, args.settle)
                await long_history(port, server.pid, upstream_server.upstream, args.settle)
            finally:
                server.terminate()
                server.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
