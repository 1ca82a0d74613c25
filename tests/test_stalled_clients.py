"""Clients that stop reading are dropped, and their sockets and buffers freed.

Every check looks at the kernel: the server's side of the TCP connection must leave
ESTABLISHED (``/proc/net/tcp``), not merely leave the room.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import httpx2

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import create_room, scaled
from tests.netutil import (
    ESTABLISHED,
    close_code,
    open_stalled_socket,
    read_all,
    server_frames,
    tcp_state,
)

FLOOD_TOKEN = "x" * 1023 + " "


async def wait_closed_by_server(port: int, sock: socket.socket, within: float) -> None:
    """Wait until the server's side of ``sock``'s connection is no longer established."""
    deadline = time.monotonic() + scaled(within)
    while tcp_state(port, sock) == ESTABLISHED:
        assert time.monotonic() < deadline, "the server still holds the stalled connection"
        await asyncio.sleep(0.05)


async def wait_members(gateway: Any, room_id: str, count: int, within: float = 10) -> None:
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        deadline = time.monotonic() + scaled(within)
        while (await http.get(f"/api/rooms/{room_id}")).json()["connections"] != count:
            assert time.monotonic() < deadline, f"room never had {count} members"
            await asyncio.sleep(0.05)


async def flood(connect: Any, gateway: Any, room_id: str, upstream: FakeUpstream) -> None:
    """Run an ~8 MB answer to its end, read by a client that keeps up."""
    upstream.script(Scenario(tokens=[FLOOD_TOKEN] * 8000, delay=0.0))
    reader = await connect(room_id, gateway_=gateway)
    await reader.send({"type": "send", "content": "flood"})
    done = await reader.until("done", timeout=30)
    assert done["message"]["content"] == FLOOD_TOKEN * 8000


async def test_a_stalled_websocket_in_a_busy_room_loses_its_tcp_connection(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(send_timeout=0.5, send_queue_size=64)
    room = await create_room(gateway, max_tokens=10_000, context_tokens=20_000)
    stalled = open_stalled_socket(gateway.server.port, room["id"])
    try:
        await flood(connect, gateway, room["id"], upstream)
        # Not only out of the room: the socket and what was queued for it are freed
        # (before, asyncio's close waited for the client to read, i.e. for ever).
        await wait_closed_by_server(gateway.server.port, stalled, within=10)
    finally:
        stalled.close()


async def test_a_dropped_websocket_that_reads_again_gets_close_1013(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(send_timeout=0.5, send_queue_size=64)
    room = await create_room(gateway, max_tokens=10_000, context_tokens=20_000)
    stalled = open_stalled_socket(gateway.server.port, room["id"])
    try:
        upstream.script(Scenario(tokens=[FLOOD_TOKEN] * 8000, delay=0.0))
        reader = await connect(room["id"], gateway_=gateway)
        await reader.send({"type": "send", "content": "flood"})
        await wait_members(gateway, room["id"], 1)  # the stalled client was dropped
        # It reads again in time: everything queued for it, then the close frame.
        data = await asyncio.to_thread(read_all, stalled, scaled(10))
        assert close_code(server_frames(data)) == 1013
        await reader.until("done", timeout=30)
    finally:
        stalled.close()


async def test_a_stalled_websocket_in_a_quiet_room_is_dropped_by_keepalive_with_1013(
    start_gateway: Any,
) -> None:
    gateway = start_gateway(ws_ping_interval=0.5, ws_ping_timeout=0.5)
    room = await create_room(gateway)
    stalled = open_stalled_socket(gateway.server.port, room["id"])
    try:
        # Nothing is ever sent to the room: only the missed pongs can tell.
        await wait_closed_by_server(gateway.server.port, stalled, within=10)
        frames = server_frames(await asyncio.to_thread(read_all, stalled, scaled(10)))
        assert frames[0][0] == 1 and b'"type":"ready"' in frames[0][1]
        assert close_code(frames) == 1013
    finally:
        stalled.close()


async def test_a_stalled_join_of_a_long_room_gets_a_capped_snapshot_and_is_dropped(
    start_gateway: Any, connect: Any, upstream: FakeUpstream, http: Any
) -> None:
    gateway = start_gateway(
        ready_max_bytes=64 * 1024, ws_ping_interval=0.5, ws_ping_timeout=0.5, send_timeout=0.5
    )
    room = await create_room(gateway, max_tokens=10_000, context_tokens=200_000)
    writer = await connect(room["id"], gateway_=gateway)
    answer = "y" * 1023 + " "
    for i in range(6):  # about 300 KB of history
        upstream.script(Scenario(tokens=[answer] * 50, delay=0.0))
        await writer.send({"type": "send", "content": f"question {i}"})
        await writer.until("done", timeout=30)

    # A new client gets the newest messages only, and is told that there are more.
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as client:
        stored = (await client.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    reader = await connect(room["id"], gateway_=gateway)
    ready = reader.frames[0]
    assert ready["earlier"] is True
    assert 1 <= len(ready["messages"]) < len(stored)
    assert ready["messages"] == stored[-len(ready["messages"]) :]
    assert sum(len(m["content"]) for m in ready["messages"]) <= 64 * 1024 + len(answer) * 50
    assert writer.frames[0]["earlier"] is False  # the room was empty then

    # Twenty clients that join and never read are all dropped, sockets and all.
    stalled = [open_stalled_socket(gateway.server.port, room["id"]) for _ in range(20)]
    try:
        for sock in stalled:
            await wait_closed_by_server(gateway.server.port, sock, within=15)
    finally:
        for sock in stalled:
            sock.close()


def open_stalled_event_stream(port: int, room_id: str) -> socket.socket:
    """``GET /api/rooms/{id}/events`` on a raw socket that then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /api/rooms/{room_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    return sock


async def test_a_stalled_event_stream_is_cut_and_its_connection_freed(
    start_gateway: Any, connect: Any, upstream: FakeUpstream, uvicorn_errors: list[str]
) -> None:
    gateway = start_gateway(send_timeout=0.5, send_queue_size=64)
    room = await create_room(gateway, max_tokens=10_000, context_tokens=20_000)
    stalled = open_stalled_event_stream(gateway.server.port, room["id"])
    try:
        await wait_members(gateway, room["id"], 1)
        await flood(connect, gateway, room["id"], upstream)
        await wait_closed_by_server(gateway.server.port, stalled, within=10)
        await wait_members(gateway, room["id"], 1)  # only the reader is left
    finally:
        stalled.close()
    assert uvicorn_errors == []
