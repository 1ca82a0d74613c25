"""Everything survives a restart; a crash loses at most about a second of text."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import httpx2

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import create_room, get_messages, run_sql, scaled


async def test_rooms_and_all_versions_survive_a_restart(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    first = start_gateway()
    room = await create_room(first, model="persisted-model", temperature=0.3)
    client = await connect(room["id"], gateway_=first)
    await client.send({"type": "send", "content": "remember me"})
    v1 = (await client.until("done"))["message"]
    await client.send({"type": "regenerate", "message_id": v1["id"], "temperature": 1.1})
    v2 = (await client.until("done"))["message"]
    before = await get_messages(first, room["id"])
    await client.ws.close()
    first.stop()

    second = start_gateway()
    after = await get_messages(second, room["id"])
    assert after == before
    assert after[-1]["siblings"] == [v1["id"], v2["id"]]
    async with httpx2.AsyncClient(base_url=second.url) as http:
        persona = (await http.get(f"/api/rooms/{room['id']}")).json()["persona"]
    assert persona["model"] == "persisted-model"
    assert persona["temperature"] == 0.3

    client = await connect(room["id"], gateway_=second)
    await client.send({"type": "select", "message_id": v1["id"]})
    branch = await client.until("branch")
    assert branch["messages"][-1]["id"] == v1["id"]
    assert branch["messages"][-1]["temperature"] == 0.3
    assert v2["temperature"] == 1.1


async def test_streaming_answer_is_checkpointed_every_interval(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(checkpoint_interval=0.2)
    room = await create_room(gateway)
    upstream.script(Scenario(count=300, delay=0.01))
    client = await connect(room["id"], gateway_=gateway)
    await client.send({"type": "send", "content": "long"})
    start = await client.until("start")

    seen: list[str] = []
    deadline = time.monotonic() + scaled(10)
    while len(seen) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        (row,) = await run_sql(
            gateway.settings.database_url,
            "SELECT content, status FROM messages WHERE id = :id",
            id=start["message_id"],
        )
        if row[1] == "streaming" and row[0] and row[0] not in seen:
            seen.append(row[0])
    # Checkpoints arrive every interval, each a longer prefix of the answer.
    assert len(seen) >= 3
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))
    done = await client.until("done", timeout=10)
    assert all(done["message"]["content"].startswith(text) for text in seen)


async def test_stopping_the_server_mid_answer_stores_it_interrupted(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    first = start_gateway()
    room = await create_room(first)
    upstream.script(Scenario(count=1000, delay=0.01))
    client = await connect(room["id"], gateway_=first)
    await client.send({"type": "send", "content": "long"})
    start = await client.until("start")
    for _ in range(5):
        await client.until("token")
    await asyncio.to_thread(first.stop)
    upstream.wait_until(lambda: upstream.requests[-1].disconnected_at is not None)

    second = start_gateway()
    answer = (await get_messages(second, room["id"]))[-1]
    assert answer["id"] == start["message_id"]
    assert answer["status"] == "interrupted"
    assert answer["content"].startswith("tok0 tok1 tok2 tok3 tok4 ")


async def test_answers_left_streaming_by_a_crash_are_marked_interrupted(
    start_gateway: Any, connect: Any
) -> None:
    first = start_gateway()
    room = await create_room(first)
    client = await connect(room["id"], gateway_=first)
    await client.send({"type": "send", "content": "hi"})
    done = await client.until("done")
    await client.ws.close()
    first.stop()
    # What a crash leaves behind: an answer still marked streaming, with a checkpoint.
    await run_sql(
        first.settings.database_url,
        "UPDATE messages SET status = 'streaming', content = 'half an ans' WHERE id = :id",
        id=done["message"]["id"],
    )

    second = start_gateway()
    answer = (await get_messages(second, room["id"]))[-1]
    assert answer["status"] == "interrupted"
    assert answer["content"] == "half an ans"
    assert answer["error"]["code"] == "interrupted"


async def test_many_rooms_write_concurrently_without_database_locked(
    gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    rooms = [await create_room(gateway) for _ in range(12)]
    clients = [await connect(room["id"]) for room in rooms]
    for client in clients:
        await client.send({"type": "send", "content": "[[fake count=30 delay=0.002]] go"})
    results = await asyncio.gather(
        *(client.until("done", "error", timeout=20) for client in clients)
    )
    assert [r["type"] for r in results] == ["done"] * len(clients)
    assert all(len(r["message"]["content"].split()) == 30 for r in results)
