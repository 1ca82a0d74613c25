"""Several gateway processes as one: the Redis broker, against real services.

Each test starts 2–3 ``chat-gateway serve`` processes on their own ports, sharing one
database (a SQLite file, or PostgreSQL with TEST_DATABASE_URL) and one Redis server
(under a key prefix of the test's own), and the session's fake upstream. Clients
connect to different processes, as they would behind a load balancer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
import websockets

from gateway.testing.fake_upstream import FakeUpstream, FakeUpstreamServer, Scenario
from tests.conftest import (
    Client,
    SSEClient,
    console_script,
    covered_seqs,
    expanded,
    numbered,
    run_sql,
    scaled,
)
from tests.processes import Served, free_port, gateway_env
from tests.test_metrics import sample

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def redis_unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("redis") is None:
        return "needs the redis extra (pip install -e '.[redis]')"
    try:
        socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1).close()
    except OSError:
        return f"needs Redis on {REDIS_HOST}:{REDIS_PORT} (.ci/run starts one)"
    return None


REDIS_MISSING = redis_unavailable()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_MISSING is not None, reason=str(REDIS_MISSING)),
]


@pytest.fixture
def cluster(
    tmp_path: Path,
    database_url: str,
    redis_prefix: str,
    upstream: FakeUpstream,
    upstream_server: FakeUpstreamServer,
) -> Iterator[Any]:
    """``a, b = cluster(2)`` starts gateway processes sharing the database and Redis."""
    started: list[Served] = []

    def start(count: int = 2, redis_url: str | None = None, **env: str) -> list[Served]:
        environment = gateway_env(
            database_url,
            upstream_server,
            GATEWAY_REDIS_URL=redis_url or f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
            GATEWAY_REDIS_PREFIX=redis_prefix,
            GATEWAY_LEASE_SECONDS="2",
            GATEWAY_CHECKPOINT_INTERVAL="0.2",
            **env,
        )
        processes = []
        for _ in range(count):
            served = Served(
                [console_script("chat-gateway"), "serve"],
                environment,
                tmp_path,
                f"gateway{len(started) + 1}",
            )
            started.append(served)
            processes.append(served)
        for served in processes:
            served.wait_healthy()
        return processes

    try:
        yield start
    finally:
        for served in started:
            served.kill()


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    """``client = await connect(served, room_id)``: a WebSocket past its first frame."""
    opened: list[Any] = []

    async def open_client(served: Served, room_id: str, query: str = "") -> Client:
        ws = await websockets.connect(
            f"ws://127.0.0.1:{served.port}/ws/rooms/{room_id}{query}", max_size=None
        )
        opened.append(ws)
        client = Client(ws)
        first = await client.recv(timeout=10)
        assert first["type"] in ("ready", "resumed", "resync"), first
        return client

    yield open_client
    for ws in opened:
        await ws.close()


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=scaled(10)) as client:
        yield client


async def new_room(http: httpx2.AsyncClient, served: Served, **persona: Any) -> dict[str, Any]:
    response = await http.post(f"{served.url}/api/rooms", json={"name": "r", "persona": persona})
    assert response.status_code == 201, response.text
    return response.json()


async def stored(http: httpx2.AsyncClient, served: Served, room_id: str) -> list[dict]:
    response = await http.get(f"{served.url}/api/rooms/{room_id}/messages")
    return response.json()["messages"]


def after_id(frames: list[dict[str, Any]], after: int) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("event_id", 0) > after]


def logged(frames: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """``(event_id, type)`` of every broadcast frame, in the order received, a merged
    token frame counting for each token in it (a client behind gets runs merged)."""
    return expanded([f for f in frames if "event_id" in f])


# --------------------------------------------------------------------------- fan-out


async def test_a_client_on_a_sees_tokens_of_a_generation_on_b_with_the_same_event_ids(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(count=50, delay=0.005))
    room = await new_room(http, a)
    on_a, on_b = await connect(a, room["id"]), await connect(b, room["id"])
    await on_b.send({"type": "send", "content": "hello"})
    done_a, done_b = await on_a.until("done"), await on_b.until("done")

    after = on_b.frames[0]["last_event_id"]  # on_a's ready may be older
    assert logged(after_id(on_a.frames, after)) == logged(after_id(on_b.frames, after))
    ids = [event_id for event_id, _ in logged(on_a.frames[1:])]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert ids[0] > on_a.frames[0]["last_event_id"]
    tokens = on_a.of_type("token")
    assert numbered(covered_seqs(tokens))
    assert "".join(t["text"] for t in tokens) == done_a["message"]["content"]
    assert done_a["message"] == done_b["message"]
    assert [m["status"] for m in await stored(http, a, room["id"])] == ["complete", "complete"]


async def test_one_generation_per_room_across_processes(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(count=200, delay=0.01))
    room = await new_room(http, a)
    on_a = await connect(a, room["id"])
    await on_a.send({"type": "send", "content": "long one"})
    await on_a.until("token")
    response = await http.post(
        f"{b.url}/api/rooms/{room['id']}/messages", json={"content": "me too"}
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "busy"
    await on_a.send({"type": "cancel"})
    await on_a.until("cancelled")
    assert len(await stored(http, b, room["id"])) == 2  # the refused message was not kept


async def test_a_client_joining_on_a_mid_answer_from_b_gets_the_text_so_far_then_the_rest(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(count=60, delay=0.01))
    room = await new_room(http, a)
    on_b = await connect(b, room["id"])
    await on_b.send({"type": "send", "content": "story"})
    for _ in range(10):
        await on_b.until("token")
    late = await connect(a, room["id"])
    ready = late.frames[0]
    live = ready["generation"]
    assert live is not None and live["seq"] >= 10
    done = await late.until("done")
    rest = late.of_type("token")
    assert numbered(covered_seqs(rest), live["seq"] + 1)  # no gap, no duplicate
    assert live["text"] + "".join(t["text"] for t in rest) == done["message"]["content"]


# ---------------------------------------------------------------------------- cancel


async def test_cancel_sent_to_a_stops_the_upstream_request_that_b_opened(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(count=500, delay=0.01))
    room = await new_room(http, a)
    on_a, on_b = await connect(a, room["id"]), await connect(b, room["id"])
    await on_b.send({"type": "send", "content": "go on and on"})
    start = await on_a.until("start")
    await on_a.until("token")
    (request,) = upstream.wait_for_requests(1)

    response = await http.post(
        f"{a.url}/api/rooms/{room['id']}/generations/{start['generation_id']}/cancel"
    )
    assert response.status_code == 202, response.text
    asked = time.monotonic()
    cancelled_a, cancelled_b = await on_a.until("cancelled"), await on_b.until("cancelled")
    assert cancelled_a["message"] == cancelled_b["message"]
    assert cancelled_a["message"]["status"] == "cancelled"

    async def upstream_saw_disconnect() -> bool:
        return request.disconnected_at is not None

    await eventually(upstream_saw_disconnect, timeout=5)
    assert request.outcome == "disconnected"  # B closed the upstream response
    assert request.disconnected_at - asked < scaled(2)
    assert len(on_a.of_type("token")) < 500
    answer = (await stored(http, a, room["id"]))[-1]
    assert answer["status"] == "cancelled"
    assert answer["content"] == cancelled_a["message"]["content"]


async def test_cancelling_an_unknown_generation_is_not_found_on_any_process(
    cluster: Any, http: httpx2.AsyncClient
) -> None:
    a, _ = cluster(2)
    room = await new_room(http, a)
    response = await http.post(f"{a.url}/api/rooms/{room['id']}/generations/gen_nope/cancel")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "generation_not_found"


# ---------------------------------------------------------------------------- resume


async def test_websocket_resume_lands_on_another_process(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(count=80, delay=0.01))
    room = await new_room(http, a)
    watcher = await connect(a, room["id"])
    leaving = await connect(a, room["id"])
    await watcher.send({"type": "send", "content": "story"})
    for _ in range(20):
        await leaving.until("token")
    last = leaving.frames[-1]["event_id"]
    await leaving.ws.close()

    back = await connect(b, room["id"], f"?last_event_id={last}")
    assert back.frames[0]["type"] == "resumed"
    done = await back.until("done")
    seen = leaving.of_type("token") + back.of_type("token")
    assert numbered(covered_seqs(seen))
    assert "".join(t["text"] for t in seen) == done["message"]["content"]
    await watcher.until("done")
    assert logged(back.frames[1:]) == [e for e in logged(watcher.frames[1:]) if e[0] > last]


async def test_sse_last_event_id_resume_lands_on_another_process(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(count=40, delay=0.005))
    room = await new_room(http, a)
    events = f"/api/rooms/{room['id']}/events"
    async with http.stream("GET", a.url + events) as response:
        stream = SSEClient(response)
        ready = await stream.next()
    trigger = await connect(b, room["id"])
    await trigger.send({"type": "send", "content": "story"})
    await trigger.until("done")

    headers = {"last-event-id": str(ready.id)}
    async with http.stream("GET", b.url + events, headers=headers) as response:
        back = SSEClient(response)
        assert (await back.next()).type == "resumed"
        await back.until("done")
    # The people who came and went meanwhile (the trigger; this client itself).
    replayed = [e for e in back.events[1:] if e.type != "presence"]
    assert [e.type for e in replayed][:2] == ["message", "start"]
    # The same ids as on B (a replayed burst of tokens may arrive merged into fewer
    # frames, each with the id of the last it carries).
    ids = [e.id for e in replayed]
    sent = [f["event_id"] for f in trigger.frames[1:]]
    assert set(ids) <= set(sent) and ids == sorted(ids) and ids[-1] == sent[-1]
    assert numbered(covered_seqs([e.data for e in replayed if e.type == "token"]))


# ------------------------------------------------------------------- a process dies


async def test_killing_the_process_mid_answer_lets_another_take_over(
    cluster: Any,
    connect: Any,
    http: httpx2.AsyncClient,
    upstream: FakeUpstream,
    database_url: str,
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(count=1000, delay=0.01), Scenario(tokens=["second ", "try"]))
    room = await new_room(http, a)
    on_a, on_b = await connect(a, room["id"]), await connect(b, room["id"])
    await on_b.send({"type": "send", "content": "long story"})
    for _ in range(20):
        await on_b.until("token")
    b.kill()  # SIGKILL: no shutdown, no final write; its lease stops being renewed
    last_on_b = max(f.get("event_id", 0) for f in on_b.frames)

    error = await on_a.until("error", timeout=20)  # within the lease (2 s) and a sweep
    assert error["code"] == "interrupted"
    answer = error["answer"]
    assert answer["status"] == "interrupted"
    published = on_a.text_of(error["generation_id"])
    assert answer["content"] == published  # what it had streamed is kept
    assert len(published) > 0
    rows = await run_sql(
        database_url, "SELECT status, content FROM messages WHERE id = :id", id=answer["id"]
    )
    assert rows == [("interrupted", published)]

    # Clients of the dead process reconnect elsewhere and resume where they were.
    back = await connect(a, room["id"], f"?last_event_id={last_on_b}")
    assert back.frames[0]["type"] == "resumed"
    resumed_error = await back.until("error")
    assert resumed_error["event_id"] == error["event_id"]

    # And anyone can answer again.
    await on_a.send({"type": "regenerate", "message_id": answer["id"]})
    done = await on_a.until("done")
    assert done["message"]["content"] == "second try"
    assert done["message"]["siblings"] == [answer["id"], done["message"]["id"]]


async def freeze(served: Served, database_url: str, room_id: str) -> None:
    """SIGSTOP ``served`` at a moment it holds no write lock on the room's messages. A
    process frozen inside a write (its answer's checkpoint, every 0.2 s here) keeps any
    other process from storing the room's answer until it wakes: SQLite locks the whole
    file, PostgreSQL the rows. The takeover then waits for it (seen failing so, under
    load, with the test's 20 s wait)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    waits = {"timeout": 0} if database_url.startswith("sqlite") else {}
    if database_url.startswith("postgresql"):
        waits = {"server_settings": {"lock_timeout": "200"}}
    engine = create_async_engine(database_url, connect_args=waits)
    try:
        for _ in range(100):
            os.killpg(served.process.pid, signal.SIGSTOP)
            try:
                async with engine.connect() as connection:
                    update = "UPDATE messages SET content = content WHERE room_id = :room_id"
                    await connection.execute(text(update), {"room_id": room_id})
                    await connection.rollback()
                return
            except Exception:  # locked by the frozen process: let it finish first
                os.killpg(served.process.pid, signal.SIGCONT)
                await asyncio.sleep(0.01)
        raise AssertionError("the process always held a write lock on the room")
    finally:
        await engine.dispose()


async def test_a_frozen_process_whose_answer_was_taken_over_stops_it_when_it_wakes(
    cluster: Any,
    connect: Any,
    http: httpx2.AsyncClient,
    upstream: FakeUpstream,
    database_url: str,
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(count=2000, delay=0.01))
    room = await new_room(http, a)
    on_a = await connect(a, room["id"])
    on_b = await connect(b, room["id"])
    await on_b.send({"type": "send", "content": "long story"})
    for _ in range(10):
        await on_a.until("token")
    await freeze(b, database_url, room["id"])  # a long pause: its lease expires
    try:
        error = await on_a.until("error", timeout=20)  # a takes the answer over
        assert error["code"] == "interrupted"
    finally:
        os.killpg(b.process.pid, signal.SIGCONT)
    request = upstream.requests[-1]
    # Awake, b finds its lease gone with the answer ended elsewhere: it stops streaming
    # (closing the upstream request) instead of publishing into an ended answer.
    upstream.wait_until(lambda: request.disconnected_at is not None, timeout=scaled(10))
    assert request.disconnected_at is not None
    assert request.tokens_sent < 2000
    await asyncio.sleep(scaled(0.5))
    after = [f for f in on_a.frames[on_a.frames.index(error) + 1 :] if f["type"] == "token"]
    assert after == []
    rows = await run_sql(
        database_url, "SELECT status FROM messages WHERE id = :id", id=error["answer"]["id"]
    )
    assert rows == [("interrupted",)]
    # The room is free on both processes.
    upstream.script(Scenario(tokens=["again"]))
    await on_b.send({"type": "send", "content": "and now?"})
    assert (await on_b.until("done", timeout=10))["message"]["content"] == "again"


async def test_a_restarted_process_leaves_other_processes_answers_alone(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, _ = cluster(2)
    upstream.script(Scenario(count=150, delay=0.01))
    room = await new_room(http, a)
    on_a = await connect(a, room["id"])
    await on_a.send({"type": "send", "content": "keep going"})
    await on_a.until("token")
    (c,) = cluster(1)  # starts while A streams: must not mark A's answer interrupted
    done = await on_a.until("done", timeout=20)
    assert done["message"]["status"] == "complete"
    assert [m["status"] for m in await stored(http, c, room["id"])] == ["complete", "complete"]


# --------------------------------------------------------------- rooms and their state


async def test_a_persona_changed_on_a_is_used_by_b_and_announced_everywhere(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    room = await new_room(http, a, system_prompt="old persona")
    on_b = await connect(b, room["id"])
    await on_b.send({"type": "send", "content": "one"})
    await on_b.until("done")  # B has the room cached now

    response = await http.patch(
        f"{a.url}/api/rooms/{room['id']}", json={"persona": {"system_prompt": "new persona"}}
    )
    assert response.status_code == 200
    changed = await on_b.until("room")
    assert changed["room"]["persona"]["system_prompt"] == "new persona"
    upstream.reset()
    await on_b.send({"type": "send", "content": "two"})
    await on_b.until("done")
    (request,) = upstream.wait_for_requests(1)
    assert request.body["messages"][0] == {"role": "system", "content": "new persona"}
    # B's cached history was refreshed too: the prompt carries the whole branch.
    assert [m["content"] for m in request.body["messages"][1:]][::2] == ["one", "two"]


async def test_messages_sent_alternately_to_two_processes_form_one_history(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b, c = cluster(3)
    room = await new_room(http, a)
    clients = [await connect(p, room["id"]) for p in (a, b, c)]
    for i, client in enumerate(clients * 2):
        await client.send({"type": "send", "content": f"m{i}", "id": f"c{i}"})
        while (await client.until("message")).get("id") != f"c{i}":
            pass
        start = await client.until("start")
        while (await client.until("done"))["generation_id"] != start["generation_id"]:
            pass
    history = await stored(http, b, room["id"])
    assert [m["content"] for m in history][::2] == [f"m{i}" for i in range(6)]
    assert all(m["parent_id"] == p["id"] for p, m in itertools.pairwise(history))
    for client in clients:  # each saw every message, whichever process took it
        while not any(
            f["type"] == "done" and f["generation_id"] == start["generation_id"]
            for f in client.frames
        ):
            await client.recv()
        assert [f["message"]["content"] for f in client.of_type("message")][-6:] == [
            f"m{i}" for i in range(6)
        ]


async def test_deleting_a_room_on_a_disconnects_its_clients_on_b(
    cluster: Any, connect: Any, http: httpx2.AsyncClient
) -> None:
    a, b = cluster(2)
    room = await new_room(http, a)
    on_b = await connect(b, room["id"])
    assert (await http.delete(f"{a.url}/api/rooms/{room['id']}")).status_code == 204
    error = await on_b.until("error")
    assert error["code"] == "room_deleted"
    with pytest.raises(websockets.ConnectionClosed):
        await on_b.recv()
    assert on_b.ws.close_code == 4404


async def test_a_room_made_private_on_a_disconnects_the_keys_shut_out_on_b(
    cluster: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    alice = {"authorization": "Bearer sk-alice-0123456789"}
    bob = {"authorization": "Bearer sk-bob-9876543210"}
    a, b = cluster(
        2, GATEWAY_API_KEYS="alice=sk-alice-0123456789,bob=sk-bob-9876543210,carol=sk-carol-0"
    )
    upstream.script(Scenario(count=400, delay=0.005))
    response = await http.post(f"{a.url}/api/rooms", json={"name": "r"}, headers=alice)
    rid = response.json()["id"]

    async def token(served: Any, headers: dict[str, str]) -> str:
        minted = await http.post(f"{served.url}/api/tokens", headers=headers)
        return minted.json()["token"]

    async def join(served: Any, headers: dict[str, str], query: str = "") -> Client:
        url = f"ws://127.0.0.1:{served.port}/ws/rooms/{rid}?token={await token(served, headers)}"
        client = Client(await stack.enter_async_context(websockets.connect(url + query)))
        assert (await client.recv(timeout=10))["type"] == "ready"
        return client

    async with contextlib.AsyncExitStack() as stack:
        owner, bob_ws = await join(a, alice), await join(b, bob)
        events = f"{b.url}/api/rooms/{rid}/events?token={await token(b, bob)}"
        bob_sse = SSEClient(await stack.enter_async_context(http.stream("GET", events)))
        assert (await bob_sse.next(timeout=10)).type == "ready"
        await owner.send({"type": "send", "content": "a long one"})
        await bob_ws.until("token")
        await bob_sse.until("token")

        patched = await http.patch(
            f"{a.url}/api/rooms/{rid}", json={"private": True}, headers=alice
        )
        assert patched.status_code == 200
        changed = (await owner.until("room"))["event_id"]
        error = await bob_ws.until("error", timeout=1)
        assert error["code"] == "room_not_found"
        with pytest.raises(websockets.ConnectionClosed):
            await bob_ws.recv(timeout=1)
        assert bob_ws.ws.close_code == 4404
        streamed = await bob_sse.rest(timeout=1)
        assert (streamed[-1].type, streamed[-1].data["code"]) == ("error", "room_not_found")
        assert max(f.get("event_id", 0) for f in bob_ws.frames) < changed
        assert max(e.id or 0 for e in bob_sse.events) < changed
        assert (await owner.until("token"))["event_id"] > changed  # the owner goes on

        # B had the room cached as public: it must not let Bob back in by it.
        last = max(f.get("event_id", 0) for f in bob_ws.frames)
        url = f"ws://127.0.0.1:{b.port}/ws/rooms/{rid}?token={await token(b, bob)}"
        async with websockets.connect(f"{url}&last_event_id={last}") as ws:
            assert (await Client(ws).recv())["code"] == "room_not_found"
        assert ws.close_code == 4404
        sent = await http.post(
            f"{b.url}/api/rooms/{rid}/messages", json={"content": "hi"}, headers=bob
        )
        assert sent.status_code == 404
        await owner.send({"type": "cancel"})
        await owner.until("cancelled")


async def test_rate_limits_are_shared_through_the_brokers_redis(
    cluster: Any, http: httpx2.AsyncClient
) -> None:
    key = f"sk-{os.urandom(8).hex()}"
    a, b = cluster(2, GATEWAY_API_KEYS=f"shared={key}", GATEWAY_RATE_LIMIT_MESSAGES="3/minute")
    headers = {"authorization": f"Bearer {key}"}
    codes = []
    for served in [a, b, a, b, a, b]:
        room = await http.post(f"{served.url}/api/rooms", json={"name": "r"}, headers=headers)
        response = await http.post(
            f"{served.url}/api/rooms/{room.json()['id']}/messages",
            json={"content": "hi"},
            headers=headers,
        )
        codes.append(response.status_code)
    assert codes == [202, 202, 202, 429, 429, 429]


# ------------------------------------------------------------------------- people


async def presence_about(client: Client, person_id: str, timeout: float = 5.0) -> str:
    """``joined`` or ``left``: the next ``presence`` event naming ``person_id``."""
    while True:
        frame = await client.until("presence", timeout=timeout)
        for change in ("joined", "left"):
            if any(person["id"] == person_id for person in frame[change]):
                return change


async def test_people_on_two_processes_see_each_other_names_presence_and_typing(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(tokens=["hello"]))
    room = await new_room(http, a)
    alice = await connect(a, room["id"], "?name=Alice&user=u-alice")
    bob = await connect(b, room["id"], "?name=Bob&user=u-bob")
    assert sorted(m["name"] for m in bob.frames[0]["members"]) == ["Alice", "Bob"]
    assert await presence_about(alice, "u-bob") == "joined"

    # Bob's second tab, on the other process: still one Bob.
    bob_again = await connect(a, room["id"], "?name=Bob&user=u-bob")
    assert sorted(m["name"] for m in bob_again.frames[0]["members"]) == ["Alice", "Bob"]

    await bob.send({"type": "typing"})
    typing = await alice.until("typing")
    assert typing["person"] == {"id": "u-bob", "name": "Bob"} and "event_id" not in typing

    await alice.send({"type": "send", "content": "hi Bob"})
    message = await bob.until("message")
    assert message["message"]["author"] == {"id": "u-alice", "name": "Alice", "kind": "user"}
    await bob.until("done")

    await bob.ws.close()  # the tab on a is still open: Bob stays
    await bob_again.send({"type": "ping"})
    await bob_again.until("pong")
    fetched = (await http.get(f"{b.url}/api/rooms/{room['id']}")).json()
    assert sorted(m["name"] for m in fetched["members"]) == ["Alice", "Bob"]
    await bob_again.ws.close()
    assert await presence_about(alice, "u-bob") == "left"


async def test_the_people_of_a_process_that_died_leave_the_room(
    cluster: Any, connect: Any, http: httpx2.AsyncClient
) -> None:
    a, b = cluster(2)
    room = await new_room(http, a)
    alice = await connect(a, room["id"], "?name=Alice&user=u-alice")
    await connect(b, room["id"], "?name=Bob&user=u-bob")
    await presence_about(alice, "u-bob")
    b.kill()  # SIGKILL: Bob's leave is never announced by b
    # Within the lease (2 s) and a sweep.
    assert await presence_about(alice, "u-bob", timeout=20) == "left"
    fetched = (await http.get(f"{a.url}/api/rooms/{room['id']}")).json()
    assert [m["name"] for m in fetched["members"]] == ["Alice"]


async def test_an_edit_on_one_process_is_a_branch_selectable_on_the_other(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    a, b = cluster(2)
    upstream.script(Scenario(tokens=["one"]), Scenario(tokens=["two"]))
    room = await new_room(http, a)
    alice = await connect(a, room["id"], "?name=Alice&user=u-alice")
    watcher = await connect(b, room["id"], "?name=Bob&user=u-bob")
    await alice.send({"type": "send", "content": "first"})
    original = (await alice.until("message"))["message"]
    await alice.until("done")
    await alice.send({"type": "edit", "message_id": original["id"], "content": "second"})
    branch = await watcher.until("branch")
    assert branch["messages"][-2]["siblings"] == [original["id"], branch["messages"][-2]["id"]]
    assert (await watcher.until("done"))["message"]["content"] == "two"
    await alice.until("done")
    await watcher.send({"type": "edit", "message_id": original["id"], "content": "mine now"})
    assert (await watcher.until("error"))["code"] == "not_author"
    await watcher.send({"type": "select", "message_id": original["id"]})
    back = await alice.until("branch")
    assert [m["content"] for m in back["messages"]] == ["first", "one"]


# ----------------------------------------------------------------- serve --workers


def test_serve_with_workers_runs_that_many_processes_as_one_gateway(
    tmp_path: Path,
    database_url: str,
    redis_prefix: str,
    upstream: FakeUpstream,
    upstream_server: FakeUpstreamServer,
) -> None:
    env = gateway_env(
        database_url,
        upstream_server,
        GATEWAY_REDIS_URL=f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        GATEWAY_REDIS_PREFIX=redis_prefix,
    )
    served = Served(
        [console_script("chat-gateway"), "serve", "--workers", "2"], env, tmp_path, "workers"
    )
    try:
        served.wait_healthy()
        deadline = time.monotonic() + scaled(30)
        while served.logs().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, served.logs()
            time.sleep(0.05)
        with httpx2.Client(base_url=served.url, timeout=scaled(10)) as client:
            assert client.get("/readyz").json()["status"] == "ready"
            room = client.post("/api/rooms", json={"name": "r"}).json()
            # Whichever worker takes each request, the room is one.
            for i in range(4):
                response = client.post(
                    f"/api/rooms/{room['id']}/messages",
                    json={"content": f"m{i}"},
                    headers={"accept": "text/event-stream"},
                )
                assert response.status_code == 200
                assert "event: done" in response.text
            messages = client.get(f"/api/rooms/{room['id']}/messages").json()["messages"]
        assert [m["content"] for m in messages][::2] == [f"m{i}" for i in range(4)]
        # /metrics counts every worker's answers, whichever worker is asked (a new
        # connection each time: the kernel spreads them over the workers).
        for _ in range(6):
            text = httpx2.get(f"{served.url}/metrics", timeout=scaled(10)).text
            assert sample(text, "gateway_answers_total", status="complete") == 4, text
            assert sample(text, "gateway_tokens_total") == 4 * 8
            assert sample(text, "gateway_generations_running") == 0
        assert served.terminate() == 0, served.logs()
        assert served.logs().count("Application shutdown complete") == 2
    finally:
        served.kill()


# ------------------------------------------------------------------- Redis outages


@contextlib.contextmanager
def private_redis(tmp_path: Path) -> Iterator[Any]:
    """A Redis server of this test's own (it will be stopped and started again)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs the redis-server binary (apt-get install redis-server)")
    port = free_port()

    def launch() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            # Its data survives a restart (the append-only file), as a production Redis'
            # would: this is Redis briefly away, not Redis losing everything.
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + scaled(10)
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return process
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    class Server:
        url = f"redis://127.0.0.1:{port}/0"
        process = launch()

        def stop(self) -> None:
            self.process.terminate()
            self.process.wait(scaled(10))

        def start(self) -> None:
            self.process = launch()

    server = Server()
    try:
        yield server
    finally:
        server.process.kill()
        server.process.wait()


async def readiness(http: httpx2.AsyncClient, served: Served) -> tuple[int, dict]:
    response = await http.get(f"{served.url}/readyz")
    return response.status_code, response.json()


async def eventually(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_while_redis_is_down_a_process_serves_its_clients_and_reports_not_ready(
    cluster: Any, connect: Any, http: httpx2.AsyncClient, upstream: FakeUpstream, tmp_path: Path
) -> None:
    with private_redis(tmp_path) as redis_server:
        a, b = cluster(2, redis_url=redis_server.url)
        assert await readiness(http, a) == (
            200,
            {"status": "ready", "checks": {"database": True, "broker": True}},
        )
        upstream.script(Scenario(count=150, delay=0.01))
        room = await new_room(http, a)
        on_a, on_b = await connect(a, room["id"]), await connect(b, room["id"])
        await on_a.send({"type": "send", "content": "through the outage"})
        await on_a.until("token")

        redis_server.stop()

        async def not_ready() -> bool:
            status, body = await readiness(http, a)
            return status == 503 and body["checks"] == {"database": True, "broker": False}

        await eventually(not_ready)
        # The process still serves: REST reads work, and what needs every process's
        # agreement fails clearly instead of hanging.
        assert len(await stored(http, a, room["id"])) == 2
        other = await new_room(http, a)
        refused = await http.post(
            f"{a.url}/api/rooms/{other['id']}/messages", json={"content": "now?"}
        )
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "broker_unavailable"
        # Joining fails the same way, and the close code says "come back later"
        # (1013), not "this room is gone" (4404).
        async with websockets.connect(f"ws://127.0.0.1:{a.port}/ws/rooms/{other['id']}") as ws:
            first = orjson.loads(await asyncio.wait_for(ws.recv(), scaled(15)))
            assert (first["type"], first["code"], first["retryable"]) == (
                "error",
                "broker_unavailable",
                True,
            )
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), scaled(5))
            assert ws.close_code == 1013

        redis_server.start()

        async def ready() -> bool:
            return (await readiness(http, a))[0] == 200

        await eventually(ready)
        # Nothing published during the outage was lost: both clients get the whole
        # answer, in order, once Redis is back.
        done_a = await on_a.until("done", timeout=20)
        done_b = await on_b.until("done", timeout=20)
        assert numbered(covered_seqs(on_a.of_type("token")))
        assert numbered(covered_seqs(on_b.of_type("token")))
        assert "".join(t["text"] for t in on_b.of_type("token")) == done_b["message"]["content"]
        assert done_a["message"] == done_b["message"]
