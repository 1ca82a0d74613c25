"""A client that stops reading never stalls the others in its room."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from typing import Any

import httpx2

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import create_room, scaled


def open_stalled_socket(port: int, room_id: str) -> socket.socket:
    """Complete a WebSocket handshake on a raw socket, then never read from it."""
    sock = socket.socket()
    # A small receive buffer keeps the kernel from absorbing the whole answer.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws/rooms/{room_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_stalled_reader_is_dropped_and_others_get_every_token(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(send_timeout=0.5, send_queue_size=64)
    room = await create_room(gateway, max_tokens=10_000, context_tokens=20_000)
    # ~8 MB of answer: far more than the socket buffers towards a stalled client hold.
    token = "x" * 1023 + " "
    upstream.script(Scenario(tokens=[token] * 8000, delay=0.0))

    stalled = open_stalled_socket(gateway.server.port, room["id"])
    reader = await connect(room["id"], gateway_=gateway)
    await reader.send({"type": "send", "content": "flood"})
    done = await reader.until("done", timeout=30)
    assert done["message"]["content"] == token * 8000
    assert reader.text_of(done["generation_id"]) == token * 8000

    # The gateway dropped the stalled client: it left the room...
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        deadline = time.monotonic() + scaled(10)
        while (await http.get(f"/api/rooms/{room['id']}")).json()["members"] != 1:
            assert time.monotonic() < deadline, "stalled client still in the room"
            await asyncio.sleep(0.05)
    # ...and its TCP connection ends once the buffered bytes are read.
    stalled.settimeout(scaled(10))
    while await asyncio.to_thread(stalled.recv, 1 << 20):
        pass
    stalled.close()
