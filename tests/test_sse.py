"""Chatting over plain HTTP: Server-Sent Events and the REST actions on messages."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from typing import Any

import httpx2
import pytest

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import (
    Gateway,
    SSEClient,
    covered_seqs,
    create_room,
    expanded,
    numbered,
    parse_sse,
    scaled,
)


def tokens_text(events: list[Any]) -> str:
    return "".join(e.data["text"] for e in events if e.type == "token")


async def stored_messages(http: httpx2.AsyncClient, room_id: str) -> list[dict[str, Any]]:
    response = await http.get(f"/api/rooms/{room_id}/messages")
    assert response.status_code == 200
    return response.json()["messages"]


# --------------------------------------------------------------------------- curl -N


@pytest.mark.slow
def test_curl_gets_tokens_as_they_are_generated(
    gateway: Gateway, room: dict, upstream: FakeUpstream
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    upstream.script(Scenario(count=20, delay=0.05))
    process = subprocess.Popen(
        [
            curl,
            "-sN",
            "--max-time",
            str(scaled(30)),
            "-X",
            "POST",
            f"{gateway.url}/api/rooms/{room['id']}/messages",
            "-H",
            "accept: text/event-stream",
            "-H",
            "content-type: application/json",
            "-d",
            '{"content": "tell me"}',
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    first_token_at: list[float] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("event: token") and not first_token_at:
                first_token_at.append(time.monotonic())
            lines.append(line.rstrip("\n"))

    with process:
        reader = threading.Thread(target=read)
        reader.start()
        assert process.wait(scaled(30)) == 0
        reader.join(scaled(5))

    request = upstream.requests[0]
    assert first_token_at, lines
    # Streamed, not buffered: curl printed a token before the upstream sent its last.
    assert first_token_at[0] < request.token_times[-1]
    events = parse_sse(lines)
    assert [e.type for e in events][:2] == ["message", "start"]
    assert events[-1].type == "done"
    assert tokens_text(events) == "".join(f"tok{i} " for i in range(20))
    assert events[-1].data["message"]["content"] == tokens_text(events)
    ids = [e.id for e in events]
    assert all(ids) and ids == sorted(ids) and len(set(ids)) == len(ids)


# --------------------------------------------------------------------------- POST


async def test_post_message_streams_that_generation_then_closes(
    open_sse: Any, room: dict, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["Hel", "lo", "!"], delay=0.01))
    stream = await open_sse(
        f"/api/rooms/{room['id']}/messages", "POST", json={"content": "hi", "id": "c1"}
    )
    assert stream.response.status_code == 200
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    assert stream.response.headers["x-accel-buffering"] == "no"
    assert stream.response.headers["cache-control"] == "no-cache"
    events = await stream.rest()
    assert [e.type for e in events] == ["message", "start", "token", "token", "token", "done"]
    assert events[0].data["message"]["content"] == "hi"
    assert events[0].data["id"] == "c1"
    assert events[-1].data["message"]["content"] == "Hello!"
    stored = await stored_messages(http, room["id"])
    assert [m["content"] for m in stored] == ["hi", "Hello!"]


async def test_post_message_without_event_stream_returns_202_with_ids(
    room: dict, http: httpx2.AsyncClient, connect: Any, upstream: FakeUpstream
) -> None:
    client = await connect(room["id"])
    response = await http.post(f"/api/rooms/{room['id']}/messages", json={"content": "hi"})
    assert response.status_code == 202
    body = response.json()
    assert body["message"]["content"] == "hi"
    start = await client.until("start")
    assert (start["generation_id"], start["message_id"]) == (
        body["generation_id"],
        body["message_id"],
    )
    await client.until("done")

    # The same client id again: nothing new, the stored message back.
    again = await http.post(f"/api/rooms/{room['id']}/messages", json={"content": "hi", "id": "x1"})
    assert again.status_code == 202
    await client.until("done")
    duplicate = await http.post(
        f"/api/rooms/{room['id']}/messages", json={"content": "hi", "id": "x1"}
    )
    assert duplicate.status_code == 200
    assert duplicate.json() == {"message": again.json()["message"], "duplicate": True}


async def test_regenerate_and_select_over_http(
    open_sse: Any, room: dict, http: httpx2.AsyncClient, connect: Any, upstream: FakeUpstream
) -> None:
    client = await connect(room["id"])
    await http.post(f"/api/rooms/{room['id']}/messages", json={"content": "hi"})
    first = (await client.until("done"))["message"]

    stream = await open_sse(
        f"/api/rooms/{room['id']}/messages/{first['id']}/regenerate",
        "POST",
        json={"temperature": 1.5},
    )
    events = await stream.rest()
    assert [e.type for e in events[:2]] == ["branch", "start"]
    assert events[0].data["active_leaf_id"] == events[1].data["message_id"]
    assert events[-1].type == "done"
    second = events[-1].data["message"]
    assert second["temperature"] == 1.5
    assert second["siblings"] == [first["id"], second["id"]]

    # Without an event stream (and without a body): 202 with the ids.
    response = await http.post(f"/api/rooms/{room['id']}/messages/{first['id']}/regenerate")
    assert response.status_code == 202
    assert set(response.json()) == {"generation_id", "message_id"}
    while (await client.until("done"))["generation_id"] != response.json()["generation_id"]:
        pass  # the streamed regeneration's done came first

    selected = await http.post(f"/api/rooms/{room['id']}/messages/{first['id']}/select")
    assert selected.status_code == 200
    assert selected.json()["active_leaf_id"] == first["id"]
    assert [m["id"] for m in selected.json()["messages"]][-1] == first["id"]
    while (await client.until("branch"))["active_leaf_id"] != first["id"]:
        pass  # the regenerations' branch frames come first


async def test_cancel_over_http_ends_the_stream_with_the_partial_answer(
    open_sse: Any, room: dict, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=200, delay=0.02))
    stream = await open_sse(f"/api/rooms/{room['id']}/messages", "POST", json={"content": "go"})
    start = await stream.until("start")
    await stream.until("token")
    generation_id = start.data["generation_id"]
    response = await http.post(f"/api/rooms/{room['id']}/generations/{generation_id}/cancel")
    assert response.status_code == 202
    events = await stream.rest()
    assert events[-1].type == "cancelled"
    partial = events[-1].data["message"]
    assert partial["status"] == "cancelled"
    assert partial["content"] == tokens_text(stream.events)

    again = await http.post(f"/api/rooms/{room['id']}/generations/{generation_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "not_running"


# --------------------------------------------------------------------------- GET events


async def test_event_stream_starts_with_ready_then_follows_the_room(
    open_sse: Any, room: dict, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    stream = await open_sse(f"/api/rooms/{room['id']}/events")
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    assert stream.response.headers["x-accel-buffering"] == "no"
    ready = await stream.next()
    assert ready.type == "ready"
    assert ready.id == ready.data["last_event_id"]
    await http.post(f"/api/rooms/{room['id']}/messages", json={"content": "hi"})
    done = await stream.until("done")
    logged = stream.events[1:]
    assert all(e.id == e.data["event_id"] for e in logged)
    ids = [event_id for event_id, _ in expanded([e.data for e in logged])]
    assert ids == list(range(ready.id + 1, ready.id + 1 + len(ids)))
    assert done.data["message"]["content"] == tokens_text(logged)


async def test_quiet_event_stream_gets_heartbeats(start_gateway: Any, open_sse: Any) -> None:
    gateway = start_gateway(sse_heartbeat_interval=0.1)
    room = await create_room(gateway)
    stream = await open_sse(f"/api/rooms/{room['id']}/events", gateway_=gateway)
    await stream.next()
    await stream.until("presence")  # its own arrival, announced a moment later
    with pytest.raises(TimeoutError):
        await stream.next(timeout=0.5)
    assert len(stream.comments) >= 2
    assert stream.comments[0] == ": keepalive"


async def test_sse_client_that_disconnects_is_unsubscribed_at_once(
    gateway: Gateway, room: dict, http: httpx2.AsyncClient
) -> None:
    async def members() -> int:
        return (await http.get(f"/api/rooms/{room['id']}")).json()["connections"]

    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as other:
        async with other.stream("GET", f"/api/rooms/{room['id']}/events") as response:
            stream = SSEClient(response)
            await stream.next()
            assert await members() == 1
    async with asyncio.timeout(scaled(2)):
        while await members() != 0:  # noqa: ASYNC110 - polling the server over HTTP
            await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/rooms/room_nope/events"),
        ("POST", "/api/rooms/room_nope/messages"),
        ("POST", "/api/rooms/room_nope/messages/msg_x/regenerate"),
        ("POST", "/api/rooms/room_nope/messages/msg_x/select"),
        ("POST", "/api/rooms/room_nope/generations/gen_x/cancel"),
    ],
)
async def test_unknown_room_is_404_json_before_any_stream(
    http: httpx2.AsyncClient, gateway: Gateway, method: str, path: str
) -> None:
    kwargs: dict[str, Any] = {"json": {"content": "hi"}} if path.endswith("messages") else {}
    response = await http.request(method, path, headers={"accept": "text/event-stream"}, **kwargs)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "room_not_found"
    assert (await http.get("/healthz")).status_code == 200


async def test_unknown_message_and_generation_are_404(http: httpx2.AsyncClient, room: dict) -> None:
    base = f"/api/rooms/{room['id']}"
    for path, code in [
        (f"{base}/messages/msg_nope/regenerate", "message_not_found"),
        (f"{base}/messages/msg_nope/select", "message_not_found"),
        (f"{base}/generations/gen_nope/cancel", "generation_not_found"),
    ]:
        response = await http.post(path, headers={"accept": "text/event-stream"})
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b'{"content": 5}', "invalid_body"),
        (b'{"content": "hi", "extra": 1}', "invalid_body"),
        (b'{"content": "   "}', "empty_message"),
    ],
)
async def test_bad_message_body_is_400_and_stores_nothing(
    http: httpx2.AsyncClient, room: dict, body: bytes, code: str
) -> None:
    response = await http.post(
        f"/api/rooms/{room['id']}/messages",
        content=body,
        headers={"accept": "text/event-stream", "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert await stored_messages(http, room["id"]) == []


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "1e5", "１２", "9" * 40])
async def test_last_event_id_that_is_not_a_number_is_400(
    http: httpx2.AsyncClient, room: dict, value: str
) -> None:
    path = f"/api/rooms/{room['id']}/events"
    responses = [await http.get(path, params={"last_event_id": value})]
    if value.isascii():  # as a header value must be
        responses.append(await http.get(path, headers={"last-event-id": value}))
    for response in responses:
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_last_event_id"


async def test_post_while_generating_is_409_busy_and_stores_nothing(
    http: httpx2.AsyncClient, room: dict, connect: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=50, delay=0.02))
    client = await connect(room["id"])
    await http.post(f"/api/rooms/{room['id']}/messages", json={"content": "first"})
    await client.until("token")
    busy = await http.post(
        f"/api/rooms/{room['id']}/messages",
        json={"content": "second"},
        headers={"accept": "text/event-stream"},
    )
    assert busy.status_code == 409
    assert busy.json()["error"]["code"] == "busy"
    await client.until("done")
    stored = await stored_messages(http, room["id"])
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "first"


# --------------------------------------------------------------------------- same events


async def test_websocket_and_sse_clients_see_the_same_events_in_the_same_order(
    open_sse: Any, connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=30, delay=0.005))
    ws = await connect(room["id"])
    stream = await open_sse(f"/api/rooms/{room['id']}/events")
    ready = await stream.next()
    assert ready.data["last_event_id"] == ws.frames[0]["last_event_id"]
    await ws.send({"type": "send", "content": "hi"})
    await ws.until("done")
    await stream.until("done")

    ws_events = [f for f in ws.frames[1:] if "event_id" in f]
    sse_events = [e.data for e in stream.events[1:]]
    assert expanded(ws_events) == expanded(sse_events)
    assert numbered(covered_seqs([f for f in ws_events if f["type"] == "token"]))
    start = next(f for f in ws_events if f["type"] == "start")
    assert ws.text_of(start["generation_id"]) == tokens_text(stream.events)
