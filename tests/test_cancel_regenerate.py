"""Cancelling a generation, regenerating answers as sibling versions, selecting one."""

from __future__ import annotations

import time
from typing import Any

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import create_room, get_messages, scaled


async def test_cancel_closes_the_upstream_request_and_keeps_the_partial_answer(
    connect: Any, room: dict, http: Any, upstream: FakeUpstream
) -> None:
    # 1000 tokens at 10 ms: draining it instead of closing would take ten seconds.
    upstream.script(Scenario(count=1000, delay=0.01))
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "long answer please"})
    start = await client.until("start")
    for _ in range(3):
        await client.until("token")

    cancel_sent = time.monotonic()
    await client.send({"type": "cancel"})
    cancelled = await client.until("cancelled")

    request = upstream.requests[-1]
    upstream.wait_until(lambda: request.disconnected_at is not None, timeout=scaled(2))
    assert request.disconnected_at is not None
    assert request.disconnected_at - cancel_sent < scaled(0.1)
    assert request.tokens_sent < 1000

    assert cancelled["generation_id"] == start["generation_id"]
    partial = cancelled["message"]
    assert partial["status"] == "cancelled"
    assert partial["content"] == client.text_of(start["generation_id"])
    assert partial["content"].startswith("tok0 tok1 tok2 ")

    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert stored[-1]["status"] == "cancelled"
    assert stored[-1]["content"] == partial["content"]


async def test_cancel_by_generation_id_and_errors_for_wrong_ids(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    client = await connect(room["id"])
    await client.send({"type": "cancel"})
    assert (await client.until("error"))["code"] == "not_running"

    upstream.script(Scenario(count=500, delay=0.01))
    await client.send({"type": "send", "content": "go"})
    start = await client.until("start")
    await client.send({"type": "cancel", "generation_id": "gen_unknown"})
    assert (await client.until("error"))["code"] == "generation_not_found"
    await client.send({"type": "cancel", "generation_id": start["generation_id"]})
    await client.until("cancelled")
    await client.send({"type": "cancel", "generation_id": start["generation_id"]})
    assert (await client.until("error"))["code"] == "not_running"


async def test_a_new_message_after_cancel_keeps_clean_alternation(
    connect: Any, room: dict, http: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=500, delay=0.01))
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "one"})
    await client.until("token")
    await client.send({"type": "cancel"})
    await client.until("cancelled")
    await client.send({"type": "send", "content": "two"})
    await client.until("done")
    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert [m["status"] for m in stored] == ["complete", "cancelled", "complete", "complete"]


async def test_regenerate_adds_a_sibling_version_with_another_temperature(
    connect: Any, room: dict, http: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["first ", "answer"]), Scenario(tokens=["second ", "take"]))
    alice = await connect(room["id"])
    bob = await connect(room["id"])
    await alice.send({"type": "send", "content": "question"})
    first = (await alice.until("done"))["message"]

    await alice.send({"type": "regenerate", "message_id": first["id"], "temperature": 1.3})
    branch = await alice.until("branch")
    start = await alice.until("start")
    done = await alice.until("done")
    second = done["message"]

    assert branch["active_leaf_id"] == start["message_id"] == second["id"]
    assert second["parent_id"] == first["parent_id"]
    assert second["content"] == "second take"
    assert second["temperature"] == 1.3
    assert second["siblings"] == [first["id"], second["id"]]
    assert upstream.requests[-1].body["temperature"] == 1.3
    # The prompt for the new version ends at the user message: no old answer in it.
    assert upstream.requests[-1].body["messages"][-1] == {"role": "user", "content": "question"}
    await bob.until("done")
    assert (await bob.until("done"))["message"]["id"] == second["id"]

    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [m["content"] for m in stored] == ["question", "second take"]
    assert stored[-1]["siblings"] == [first["id"], second["id"]]


async def test_select_switches_the_active_branch_back_and_forth(
    connect: Any, room: dict, http: Any, upstream: FakeUpstream
) -> None:
    upstream.script(
        Scenario(tokens=["A1"]), Scenario(tokens=["A1 follow-up"]), Scenario(tokens=["A2"])
    )
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "Q1"})
    a1 = (await client.until("done"))["message"]
    await client.send({"type": "send", "content": "Q2"})
    await client.until("done")
    await client.send({"type": "regenerate", "message_id": a1["id"]})
    a2 = (await client.until("done"))["message"]
    assert a2["siblings"] == [a1["id"], a2["id"]]

    await client.send({"type": "select", "message_id": a1["id"]})
    branch = await client.until("branch")
    # Selecting an old version brings back the conversation that continued from it.
    assert [m["content"] for m in branch["messages"]] == ["Q1", "A1", "Q2", "A1 follow-up"]
    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [m["content"] for m in stored] == ["Q1", "A1", "Q2", "A1 follow-up"]

    await client.send({"type": "select", "message_id": a2["id"]})
    branch = await client.until("branch")
    assert [m["content"] for m in branch["messages"]] == ["Q1", "A2"]
    assert branch["active_leaf_id"] == a2["id"]


async def test_regenerate_and_select_reject_bad_targets(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "Q"})
    user = (await client.until("message"))["message"]
    await client.until("done")
    await client.send({"type": "regenerate", "message_id": user["id"]})
    assert (await client.until("error"))["code"] == "invalid_target"
    await client.send({"type": "regenerate", "message_id": "msg_nope"})
    assert (await client.until("error"))["code"] == "message_not_found"
    await client.send({"type": "select", "message_id": "msg_nope"})
    assert (await client.until("error"))["code"] == "message_not_found"
    await client.send({"type": "regenerate", "message_id": user["id"], "temperature": 5})
    assert (await client.until("error"))["code"] == "invalid_frame"


async def test_regenerate_while_generating_is_busy(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "Q"})
    answer = (await client.until("done"))["message"]
    upstream.script(Scenario(count=500, delay=0.01))
    await client.send({"type": "regenerate", "message_id": answer["id"]})
    await client.until("token")
    await client.send({"type": "regenerate", "message_id": answer["id"]})
    assert (await client.until("error"))["code"] == "busy"
    await client.send({"type": "select", "message_id": answer["id"]})
    assert (await client.until("error"))["code"] == "busy"
    await client.send({"type": "cancel"})
    await client.until("cancelled")


async def test_a_cancel_before_the_answer_starts_ends_it_as_cancelled_as_it_starts(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    # A send has claimed the room and is waiting for moderation (nothing is stored
    # yet) when another member presses stop: the message is kept, the answer starts
    # and ends at once as cancelled, without asking the model, and the room is free.
    gateway = start_gateway(checks=["moderation"], moderation_model="fake-moderation")
    room = await create_room(gateway)
    upstream.moderation_delay = scaled(1.0)
    sender, other = (
        await connect(room["id"], gateway_=gateway),
        await connect(room["id"], gateway_=gateway),
    )
    await sender.send({"type": "send", "content": "hello"})
    upstream.wait_until(lambda: bool(upstream.moderations), timeout=scaled(5))
    await other.send({"type": "cancel"})

    message = await other.until("message")
    start = await other.until("start")
    cancelled = await other.until("cancelled")
    assert message["message"]["content"] == "hello"
    assert cancelled["generation_id"] == start["generation_id"]
    assert (cancelled["message"]["status"], cancelled["message"]["content"]) == ("cancelled", "")
    assert other.of_type("error") == []  # the cancel was taken, not refused
    assert upstream.requests == []

    upstream.moderation_delay = 0
    await sender.send({"type": "send", "content": "again"})
    assert (await sender.until("done"))["message"]["status"] == "complete"
    stored = await get_messages(gateway, room["id"])
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "cancelled"),
        ("user", "complete"),
        ("assistant", "complete"),
    ]
