"""Bad input gets an error frame with a stable code; the connection stays usable."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
import websockets

from tests.conftest import create_room

BAD_FRAMES = [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_frame"),
    ('{"content": "no type"}', "unknown_type"),
    ('{"type": "shout"}', "unknown_type"),
    ('{"type": "send"}', "invalid_frame"),
    ('{"type": "send", "content": 42}', "invalid_frame"),
    ('{"type": "send", "content": "x", "extra": 1}', "invalid_frame"),
    ('{"type": "send", "content": "   "}', "empty_message"),
    ('{"type": "regenerate"}', "invalid_frame"),
    ('{"type": "regenerate", "message_id": "m", "temperature": "hot"}', "invalid_frame"),
    ('{"type": "select", "message_id": ""}', "invalid_frame"),
    ('{"type": "cancel", "generation_id": 7}', "invalid_frame"),
]


@pytest.mark.parametrize(("raw", "code"), BAD_FRAMES)
async def test_bad_frame_gets_error_and_connection_survives(
    connect: Any, room: dict, raw: str, code: str
) -> None:
    client = await connect(room["id"])
    await client.send(raw)
    error = await client.until("error")
    assert error["code"] == code
    assert error["message"]
    await client.send({"type": "ping", "id": "still-here"})
    assert (await client.until("pong"))["id"] == "still-here"


async def test_binary_frame_is_refused_without_dropping_the_socket(
    connect: Any, room: dict
) -> None:
    client = await connect(room["id"])
    await client.send(b'{"type": "ping"}')
    assert (await client.until("error"))["code"] == "binary_not_supported"
    await client.send({"type": "ping"})
    await client.until("pong")


async def test_oversize_frame_gets_error(connect: Any, room: dict, gateway: Any) -> None:
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "x" * (gateway.settings.max_frame_bytes + 10)})
    assert (await client.until("error"))["code"] == "frame_too_large"
    await client.send({"type": "ping"})
    await client.until("pong")


async def test_message_over_the_character_limit_is_not_stored(
    start_gateway: Any, connect: Any
) -> None:
    gateway = start_gateway(max_message_chars=10)
    room = await create_room(gateway)
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        client = await connect(room["id"], gateway_=gateway)
        await client.send({"type": "send", "content": "y" * 11})
        assert (await client.until("error"))["code"] == "message_too_long"
        messages = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert messages == []


async def test_unknown_room_gets_error_then_close_4404(gateway: Any) -> None:
    async with websockets.connect(gateway.ws_url("room_missing")) as ws:
        frame = await ws.recv()
        assert '"room_not_found"' in frame
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


async def test_frame_over_the_hard_limit_closes_with_1009(connect: Any, room: dict) -> None:
    client = await connect(room["id"])
    with pytest.raises(websockets.ConnectionClosed) as closed:
        # The server may close while the frame is still being written.
        await client.send("x" * (5 * 1024 * 1024))
        await client.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
