"""Rate limits and quotas: per client (API key, else IP) and per room.

A rejected message is not stored and never reaches the upstream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest
import websockets

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import create_room, scaled

ALICE = {"authorization": "Bearer sk-alice-123456"}
BOB = {"authorization": "Bearer sk-bob-654321"}
KEYS = ["alice=sk-alice-123456", "bob=sk-bob-654321"]


async def post_message(http: httpx2.AsyncClient, room_id: str, headers: dict) -> httpx2.Response:
    return await http.post(
        f"/api/rooms/{room_id}/messages", json={"content": "hi [[fake count=2]]"}, headers=headers
    )


async def stored(http: httpx2.AsyncClient, room_id: str, headers: dict) -> list[dict]:
    return (await http.get(f"/api/rooms/{room_id}/messages", headers=headers)).json()["messages"]


async def answered(http: httpx2.AsyncClient, room_id: str, headers: dict) -> None:
    """Wait until the room's newest answer has ended (the room is idle again)."""
    async with asyncio.timeout(scaled(10)):
        while True:
            messages = await stored(http, room_id, headers)
            if messages and messages[-1]["status"] != "streaming":
                return
            await asyncio.sleep(0.02)


async def test_a_burst_of_100_sends_with_a_limit_of_10_per_minute_lets_exactly_10_through(
    start_gateway: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(api_keys=KEYS, rate_limit_messages="10/minute")
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(30)) as http:
        rooms = [
            (await http.post("/api/rooms", json={"name": f"r{i}"}, headers=ALICE)).json()["id"]
            for i in range(100)
        ]
        responses = await asyncio.gather(*(post_message(http, r, ALICE) for r in rooms))
        codes = [r.status_code for r in responses]
        assert codes.count(202) == 10, codes
        assert codes.count(429) == 90, codes
        refused = next(r for r in responses if r.status_code == 429)
        error = refused.json()["error"]
        assert error["code"] == "rate_limited"
        assert 1 <= error["retry_after"] <= 60
        assert refused.headers["retry-after"] == str(error["retry_after"])

        accepted = [room for room, r in zip(rooms, responses, strict=True) if r.status_code == 202]
        upstream.wait_for_requests(10)
        await asyncio.sleep(0.3)
        assert len(upstream.requests) == 10  # rejected messages never reached the model
        for room in rooms:
            messages = await stored(http, room, ALICE)
            assert len(messages) == (2 if room in accepted else 0)

        # Another key has its own count.
        assert (await post_message(http, rooms[-1], BOB)).status_code == 202


async def test_over_the_limit_on_a_websocket_gets_an_error_frame_and_stays_usable(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(rate_limit_messages="2/minute")
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    for _ in range(2):
        await client.send({"type": "send", "content": "hi [[fake count=1]]"})
        await client.until("done")
    await client.send({"type": "send", "content": "third", "id": "c3"})
    error = await client.until("error")
    assert (error["code"], error["id"], error["retryable"]) == ("rate_limited", "c3", True)
    assert error["retry_after"] >= 1
    await client.send({"type": "ping", "id": "p"})
    assert (await client.until("pong"))["id"] == "p"
    assert len(upstream.requests) == 2
    assert "third" not in [f["message"]["content"] for f in client.of_type("message")]


async def test_a_room_limit_counts_every_client_in_the_room(
    start_gateway: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(api_keys=KEYS, rate_limit_room_messages="2/minute")
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        room = (await http.post("/api/rooms", json={"name": "busy"}, headers=ALICE)).json()
        assert (await post_message(http, room["id"], ALICE)).status_code == 202
        await answered(http, room["id"], ALICE)
        assert (await post_message(http, room["id"], BOB)).status_code == 202
        await answered(http, room["id"], ALICE)
        third = await post_message(http, room["id"], BOB)
        assert third.status_code == 429
        assert "this room" in third.json()["error"]["message"]
        other = (await http.post("/api/rooms", json={"name": "calm"}, headers=BOB)).json()
        assert (await post_message(http, other["id"], BOB)).status_code == 202


async def test_a_busy_room_does_not_use_up_the_quota(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(rate_limit_messages="2/minute")
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    upstream.script(Scenario(count=20, delay=0.02))
    await client.send({"type": "send", "content": "first"})
    await client.until("token")
    await client.send({"type": "send", "content": "too early"})
    assert (await client.until("error"))["code"] == "busy"
    await client.until("done")
    await client.send({"type": "send", "content": "second [[fake count=1]]"})
    assert (await client.until("done"))["message"]["content"] == "tok0 "


async def test_concurrent_generations_per_client_are_capped(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(max_concurrent_generations=1)
    one, two = await create_room(gateway), await create_room(gateway)
    first = await connect(one["id"], gateway_=gateway)
    second = await connect(two["id"], gateway_=gateway)
    upstream.script(Scenario(count=30, delay=0.02))
    await first.send({"type": "send", "content": "long"})
    await first.until("token")
    await second.send({"type": "send", "content": "meanwhile"})
    assert (await second.until("error"))["code"] == "too_many_generations"
    await first.until("done")
    await second.send({"type": "send", "content": "now [[fake count=1]]"})
    assert (await second.until("done"))["message"]["content"] == "tok0 "
    assert len(upstream.requests) == 2


async def test_connections_per_client_are_capped(start_gateway: Any, open_sse: Any) -> None:
    gateway = start_gateway(max_connections_per_client=2)
    room = await create_room(gateway)
    url = gateway.ws_url(room["id"])
    async with websockets.connect(url) as a, websockets.connect(url) as b:
        for ws in (a, b):
            assert '"ready"' in await asyncio.wait_for(ws.recv(), scaled(5))
        async with websockets.connect(url) as refused:
            error = await asyncio.wait_for(refused.recv(), scaled(5))
            assert '"too_many_connections"' in error
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(refused.recv(), scaled(5))
        assert refused.close_code == 1013
        async with httpx2.AsyncClient(base_url=gateway.url) as http:
            response = await http.get(f"/api/rooms/{room['id']}/events")
            assert response.status_code == 429
            assert response.json()["error"]["code"] == "too_many_connections"
    # Closing one frees its place.
    async with websockets.connect(url) as again:
        assert '"ready"' in await asyncio.wait_for(again.recv(), scaled(5))


def test_a_bad_limit_is_a_configuration_error(make_settings: Any) -> None:
    from gateway.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="GATEWAY_RATE_LIMIT_MESSAGES"):
        load_settings(_env_file=None, rate_limit_messages="ten per minute")
