"""Chatting in a room over WebSocket: messages, token streaming, fan-out, persistence."""

from __future__ import annotations

from typing import Any

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import covered_seqs, create_room, numbered


async def test_ready_is_the_first_frame_with_room_and_history(connect: Any, room: dict) -> None:
    client = await connect(room["id"])
    ready = client.frames[0]
    assert ready["type"] == "ready"
    assert ready["room"]["id"] == room["id"]
    assert ready["room"]["persona"]["system_prompt"] == "You are terse."
    assert ready["messages"] == []
    assert ready["generation"] is None


async def test_send_streams_answer_token_by_token_and_stores_it(
    connect: Any, room: dict, http: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["Hel", "lo", " there", "!"], delay=0.05, first_delay=0.2))
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "hi", "id": "c1"})

    message = await client.until("message")
    assert message["id"] == "c1"
    assert message["message"]["role"] == "user"
    assert message["message"]["content"] == "hi"

    start = await client.until("start")
    assert start["parent_id"] == message["message"]["id"]
    assert start["message"]["timing"] is None  # known when it ends
    done = await client.until("done")
    tokens = client.of_type("token")
    # A client that falls behind may get runs of tokens merged into one frame; at
    # 50 ms apart they normally arrive one by one.
    assert len(tokens) > 1
    assert numbered(covered_seqs(tokens))
    assert "".join(t["text"] for t in tokens) == "Hello there!"
    assert done["generation_id"] == start["generation_id"]
    assert done["message"]["content"] == "Hello there!"
    assert done["message"]["status"] == "complete"
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 4
    # The upstream waited 0.2 s before the first token and 0.05 s between the others.
    timing = done["message"]["timing"]
    assert timing["first_token_ms"] >= 200
    assert timing["duration_ms"] >= timing["first_token_ms"] + 100  # 150, less jitter

    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [(m["role"], m["content"], m["status"]) for m in stored] == [
        ("user", "hi", "complete"),
        ("assistant", "Hello there!", "complete"),
    ]
    answer = stored[1]
    assert answer["parent_id"] == stored[0]["id"]
    assert answer["model"] == "fake-model"
    assert answer["finish_reason"] == "stop"
    assert answer["siblings"] == [answer["id"]]
    assert answer["timing"] == timing


async def test_upstream_gets_system_prompt_and_active_branch(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    client = await connect(room["id"])
    for text in ("first", "second"):
        await client.send({"type": "send", "content": text})
        await client.until("done")
    last = upstream.requests[-1].body
    assert [m["role"] for m in last["messages"]] == ["system", "user", "assistant", "user"]
    assert last["messages"][0]["content"] == "You are terse."
    assert last["messages"][-1]["content"] == "second"
    assert last["stream"] is True


async def test_an_answer_in_one_upstream_read_is_one_token_frame(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=30, group=0))
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "all at once"})
    done = await client.until("done")
    tokens = client.of_type("token")
    assert [t["seq"] for t in tokens] == [1]
    assert tokens[0]["text"] == done["message"]["content"] == "".join(f"tok{i} " for i in range(30))
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == 30


async def test_every_client_in_the_room_sees_the_same_stream(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=20, delay=0.005))
    alice = await connect(room["id"])
    bob = await connect(room["id"])
    await alice.send({"type": "send", "content": "hello both"})
    done_a = await alice.until("done")
    done_b = await bob.until("done")
    assert done_a == done_b
    assert alice.text_of(done_a["generation_id"]) == bob.text_of(done_b["generation_id"])
    assert numbered(covered_seqs(alice.of_type("token")))
    assert numbered(covered_seqs(bob.of_type("token")))
    assert bob.of_type("message")[0]["message"]["content"] == "hello both"


async def test_disconnecting_client_does_not_stop_the_generation(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=30, delay=0.01))
    sender = await connect(room["id"])
    watcher = await connect(room["id"])
    await sender.send({"type": "send", "content": "go"})
    await sender.until("token")
    await sender.ws.close()
    done = await watcher.until("done")
    assert done["message"]["status"] == "complete"
    assert len(done["message"]["content"].split()) == 30


async def test_send_with_a_used_client_id_creates_no_duplicate(
    connect: Any, room: dict, http: Any
) -> None:
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "once", "id": "same"})
    await client.until("done")
    await client.send({"type": "send", "content": "once", "id": "same"})
    again = await client.until("message")
    assert again["duplicate"] is True
    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["once"]


async def test_send_while_generating_is_rejected_busy(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=50, delay=0.01))
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "long one"})
    await client.until("token")
    await client.send({"type": "send", "content": "too soon", "id": "x"})
    error = await client.until("error")
    assert error["code"] == "busy"
    assert error["id"] == "x"
    assert error["retryable"] is True
    await client.until("done")


async def test_joining_mid_answer_gets_text_so_far_then_the_rest(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=40, delay=0.01))
    first = await connect(room["id"])
    await first.send({"type": "send", "content": "story"})
    for _ in range(5):
        await first.until("token")
    late = await connect(room["id"])
    ready = late.frames[0]
    live = ready["generation"]
    assert live is not None and live["seq"] >= 5
    partial = ready["messages"][-1]
    assert partial["status"] == "streaming"
    done = await late.until("done")
    rest = late.of_type("token")
    assert numbered(covered_seqs(rest), live["seq"] + 1)
    assert partial["content"] + late.text_of(live["generation_id"]) == done["message"]["content"]


async def test_ping_gets_pong(connect: Any, room: dict) -> None:
    client = await connect(room["id"])
    await client.send({"type": "ping", "id": "p1"})
    assert await client.until("pong") == {"type": "pong", "id": "p1"}


async def test_long_conversation_sends_only_what_fits_the_context_budget(
    gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway, context_tokens=300, max_tokens=100)
    client = await connect(room["id"])
    for i in range(8):
        await client.send({"type": "send", "content": f"message {i} " + "x" * 200})
        await client.until("done")
    sent = upstream.requests[-1].body["messages"]
    assert sent[0] == {"role": "system", "content": "You are terse."}
    assert sent[-1]["content"].startswith("message 7 ")
    assert sent[1]["role"] == "user"
    # 300 tokens minus 100 for the answer leave room for the newest turns only.
    assert 2 <= len(sent) <= 4


async def test_no_more_than_max_history_messages_go_upstream(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(max_history_messages=5)
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    for i in range(6):
        await client.send({"type": "send", "content": f"short {i} [[fake count=1]]"})
        await client.until("done")
    sent = upstream.requests[-1].body["messages"]
    assert sent[0]["role"] == "system"
    turns = sent[1:]
    # Five at most, starting with a user turn: user 3, answer, user 4, answer, user 5.
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[-1]["content"].startswith("short 5")
