"""Stopping the server mid-answer: every stream hears it at once and ends cleanly."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx2
import pytest
from websockets.exceptions import ConnectionClosed

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import Client, SSEClient, create_room, scaled

STOP_WITHIN = 5  # seconds (scaled): "a few", well under uvicorn's 10 s graceful wait


async def frames_until_closed(client: Client) -> int:
    """Read every frame until the server closes; returns the close code."""
    with pytest.raises(ConnectionClosed):
        while True:
            await client.recv(timeout=10)
    assert client.ws.close_code is not None
    return client.ws.close_code


async def test_stopping_mid_answer_interrupts_it_for_every_websocket_and_event_stream(
    start_gateway: Any,
    connect: Any,
    open_sse: Any,
    upstream: FakeUpstream,
    uvicorn_errors: list[str],
) -> None:
    gateway = start_gateway()
    room = await create_room(gateway)
    clients = [await connect(room["id"], gateway_=gateway) for _ in range(5)]
    stream: SSEClient = await open_sse(f"/api/rooms/{room['id']}/events", gateway_=gateway)
    assert (await stream.next()).type == "ready"

    upstream.script(Scenario(count=2000, delay=0.02))  # 40 s if left to finish
    await clients[0].send({"type": "send", "content": "a long answer"})
    for client in clients:
        await client.until("token")
    await stream.until("token")

    started = time.monotonic()
    stopping = asyncio.create_task(asyncio.to_thread(gateway.stop))
    codes = await asyncio.gather(*(frames_until_closed(c) for c in clients))
    events = await stream.rest(timeout=10)  # until the server ends the stream
    await stopping
    stopped_in = time.monotonic() - started

    for client, code in zip(clients, codes, strict=True):
        errors = client.of_type("error")
        assert [e["code"] for e in errors] == ["interrupted"], client.frames[-3:]
        assert errors[0]["answer"]["status"] == "interrupted"
        assert client.frames[-1] == errors[0]  # the last frame before the close
        assert code == 1012  # service restart: reconnect
    ended = [e for e in events if e.type == "error"]
    assert [e.data["code"] for e in ended] == ["interrupted"]
    assert events[-1].type == "error"

    # The upstream request was closed, not drained.
    request = upstream.requests[-1]
    assert request.disconnected_at is not None
    assert request.tokens_sent < 2000
    assert stopped_in < scaled(STOP_WITHIN), stopped_in
    assert uvicorn_errors == [], uvicorn_errors

    # Stored as interrupted by the shutdown itself, with the text that was streamed.
    again = start_gateway()
    async with httpx2.AsyncClient(base_url=again.url, timeout=scaled(10)) as http:
        stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert stored[-1]["status"] == "interrupted"
    assert stored[-1]["content"] == clients[1].text_of(ended[0].data["generation_id"])
