"""A client that stops reading never stalls the others in its room."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx2

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import create_room, scaled
from tests.netutil import open_stalled_socket


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
        while (await http.get(f"/api/rooms/{room['id']}")).json()["connections"] != 1:
            assert time.monotonic() < deadline, "stalled client still in the room"
            await asyncio.sleep(0.05)
    # ...and its TCP connection ends once the buffered bytes are read.
    stalled.settimeout(scaled(10))
    while await asyncio.to_thread(stalled.recv, 1 << 20):
        pass
    stalled.close()
