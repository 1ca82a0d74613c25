"""Streams that survive a dropped connection: resume by event id, or resync.

A client that drops mid-answer and comes back with the last ``event_id`` it saw must
end up with exactly the stored answer: no token twice, none missing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest
import websockets

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import Client, Gateway, covered_seqs, create_room, numbered, scaled


async def stored_answer(gateway: Gateway, room_id: str) -> dict[str, Any]:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        messages = (await http.get(f"/api/rooms/{room_id}/messages")).json()["messages"]
    return messages[-1]


async def wait_stored(gateway: Gateway, room_id: str, status: str = "complete") -> dict:
    """Poll over HTTP until the room's last message is stored with ``status``."""
    async with asyncio.timeout(scaled(10)):
        while True:
            answer = await stored_answer(gateway, room_id)
            if answer["status"] == status:
                return answer
            await asyncio.sleep(0.02)


def last_event_id(frames: list[dict[str, Any]]) -> int:
    return max(f["event_id"] for f in frames if "event_id" in f)


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_resume_replays_exactly_what_was_missed(
    gateway: Gateway, room: dict, connect: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=60, delay=0.01))
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "story"})
    start = await client.until("start")
    for _ in range(5):
        await client.until("token")
    await client.ws.close()
    seen = last_event_id(client.frames)
    await asyncio.sleep(0.2)  # tokens go on without us

    back = await connect(room["id"], query=f"?last_event_id={seen}")
    resumed = back.frames[0]
    assert resumed["type"] == "resumed"
    assert resumed["after"] == seen
    assert resumed["replayed"] > 0
    done = await back.until("done")

    before = [f for f in client.frames if f["type"] == "token"]
    after = [f for f in back.frames if f["type"] == "token"]
    assert numbered(covered_seqs(before) + covered_seqs(after))
    text = client.text_of(start["generation_id"]) + back.text_of(start["generation_id"])
    assert text == done["message"]["content"]
    assert text == (await stored_answer(gateway, room["id"]))["content"]
    ids = [f["event_id"] for f in back.frames[1:]]
    assert ids == sorted(ids) and ids[0] > seen


async def test_websocket_resume_with_the_newest_id_replays_nothing(
    room: dict, connect: Any
) -> None:
    client = await connect(room["id"], query="?user=u-1")
    newest = client.frames[0]["last_event_id"]
    back = await connect(room["id"], query=f"?last_event_id={newest}&user=u-1")
    # Nothing happened since, and the same person coming back is no news.
    assert back.frames[0] == {
        "type": "resumed",
        "room_id": room["id"],
        "after": newest,
        "replayed": 0,
        "you": {"id": "u-1", "name": "u-1"},
    }
    await back.send({"type": "send", "content": "hi"})
    assert (await back.until("done"))["event_id"] > newest


@pytest.fixture
async def small_buffer(start_gateway: Any, connect: Any) -> tuple[Gateway, dict, Client]:
    """A gateway keeping only 16 events per room, a room, and a client in it."""
    gateway = start_gateway(event_buffer_size=16)
    room = await create_room(gateway)
    return gateway, room, await connect(room["id"], gateway_=gateway)


async def test_websocket_resume_older_than_the_buffer_gets_resync(
    small_buffer: tuple[Gateway, dict, Client], connect: Any, upstream: FakeUpstream
) -> None:
    gateway, room, client = small_buffer
    upstream.script(Scenario(count=60, delay=0.002))
    seen = client.frames[0]["last_event_id"]
    await client.send({"type": "send", "content": "story"})
    done = await client.until("done")

    back = await connect(room["id"], gateway_=gateway, query=f"?last_event_id={seen}")
    resync = back.frames[0]
    assert resync["type"] == "resync"
    assert resync["last_event_id"] == done["event_id"]
    assert [m["content"] for m in resync["messages"]] == ["story", done["message"]["content"]]
    # ... and the live stream follows.
    upstream.script(Scenario(count=3))
    await back.send({"type": "send", "content": "more"})
    assert (await back.until("done"))["message"]["content"] == "tok0 tok1 tok2 "


async def test_resync_mid_answer_carries_the_partial_text_then_the_rest(
    small_buffer: tuple[Gateway, dict, Client], connect: Any, upstream: FakeUpstream
) -> None:
    gateway, room, client = small_buffer
    upstream.script(Scenario(count=80, delay=0.01))
    seen = client.frames[0]["last_event_id"]
    await client.send({"type": "send", "content": "story"})
    for _ in range(30):
        await client.until("token")

    back = await connect(room["id"], gateway_=gateway, query=f"?last_event_id={seen}")
    resync = back.frames[0]
    assert resync["type"] == "resync"
    live = resync["generation"]
    partial = resync["messages"][-1]
    assert partial["status"] == "streaming" and partial["content"]
    done = await back.until("done")
    assert numbered(covered_seqs(back.of_type("token")), live["seq"] + 1)
    assert partial["content"] + back.text_of(live["generation_id"]) == done["message"]["content"]


async def test_an_id_from_before_a_restart_gets_resync_never_a_wrong_replay(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway()
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await client.send({"type": "send", "content": "before"})
    old = (await client.until("done"))["event_id"]
    await client.ws.close()
    gateway.stop()

    again = start_gateway()
    # The restarted gateway numbers above every old id, even for events it logs before
    # the old client comes back.
    first = await connect(room["id"], gateway_=again)
    await first.send({"type": "send", "content": "after"})
    assert (await first.until("done"))["event_id"] > old

    back = await connect(room["id"], gateway_=again, query=f"?last_event_id={old}")
    if again.settings.redis_url:
        # The Redis broker's log outlives gateway processes: an exact replay.
        assert back.frames[0]["type"] == "resumed"
        await back.until("done")
        # Between them, people came and went (the old client, the first, this one).
        replayed = [f for f in back.frames[1:] if f["type"] != "presence"]
        assert [f["type"] for f in replayed[:2]] == ["message", "start"]
        assert replayed[0]["message"]["content"] == "after"
        return
    assert back.frames[0]["type"] == "resync"
    assert [m["content"] for m in back.frames[0]["messages"]][::2] == ["before", "after"]


async def test_an_id_never_given_out_gets_resync(room: dict, connect: Any) -> None:
    client = await connect(room["id"])
    future = client.frames[0]["last_event_id"] + 1000
    back = await connect(room["id"], query=f"?last_event_id={future}")
    assert back.frames[0]["type"] == "resync"


@pytest.mark.parametrize("value", ["abc", "-5", "1.0"])
async def test_websocket_bad_last_event_id_gets_an_error_and_close_4400(
    gateway: Gateway, room: dict, value: str
) -> None:
    async with websockets.connect(gateway.ws_url(room["id"], f"?last_event_id={value}")) as ws:
        client = Client(ws)
        error = await client.recv()
        assert error["type"] == "error"
        assert error["code"] == "invalid_last_event_id"
        with pytest.raises(websockets.ConnectionClosed):
            await client.recv()
    assert ws.close_code == 4400


# --------------------------------------------------------------------------- SSE


async def test_sse_resume_with_last_event_id_has_no_gap_and_no_duplicate(
    gateway: Gateway, room: dict, open_sse: Any, connect: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=60, delay=0.01))
    stream = await open_sse(f"/api/rooms/{room['id']}/events")
    await stream.next()  # ready
    trigger = await connect(room["id"])
    await trigger.send({"type": "send", "content": "story"})
    start = await stream.until("start")
    for _ in range(5):
        await stream.until("token")
    await stream.response.aclose()  # dropped mid-answer
    seen = stream.events[-1].id
    await asyncio.sleep(0.2)

    back = await open_sse(f"/api/rooms/{room['id']}/events", headers={"last-event-id": str(seen)})
    resumed = await back.next()
    assert resumed.type == "resumed" and resumed.id is None
    done = await back.until("done")

    tokens = [e.data for e in stream.events + back.events if e.type == "token"]
    assert numbered(covered_seqs(tokens))
    text = "".join(t["text"] for t in tokens)
    assert text == done.data["message"]["content"]
    assert text == (await wait_stored(gateway, room["id"]))["content"]
    assert start.data["generation_id"] == done.data["generation_id"]


async def test_sse_resume_after_the_answer_ended_replays_its_end(
    room: dict, open_sse: Any, connect: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=40, delay=0.005))
    stream = await open_sse(f"/api/rooms/{room['id']}/events")
    ready = await stream.next()
    trigger = await connect(room["id"])
    await trigger.send({"type": "send", "content": "story"})
    await trigger.until("done")
    await stream.response.aclose()

    back = await open_sse(
        f"/api/rooms/{room['id']}/events", headers={"last-event-id": str(ready.id)}
    )
    assert (await back.next()).type == "resumed"
    await back.until("done")
    # The trigger's arrival, and this client's own (a new guest) as it comes back.
    replayed = [e for e in back.events[1:] if e.type != "presence"]
    assert [e.type for e in replayed][:2] == ["message", "start"]
    assert replayed[-1].type == "done"
    tokens = [e.data for e in replayed if e.type == "token"]
    assert numbered(covered_seqs(tokens))
    assert "".join(t["text"] for t in tokens) == replayed[-1].data["message"]["content"]
