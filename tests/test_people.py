"""People in rooms: who wrote each message, who is here, who is typing, editing a sent
message into a new branch, and the owner hiding one. On one gateway (in memory, or on
Redis when ``TEST_REDIS_URL`` is set); across processes in ``test_cluster.py``."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.presence import ANNOUNCE_EVERY
from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import Client, create_room, get_messages
from tests.test_checks_in_rooms import INJECTION


def names(members: list[dict[str, str]]) -> list[str]:
    return sorted(m["name"] for m in members)


async def presence_of(client: Client, person_id: str) -> tuple[str, dict[str, str]]:
    """``("joined" | "left", person)`` from the next ``presence`` event naming
    ``person_id`` (events are announced a moment after the change, with whoever else
    came or went meanwhile; a joining client's own arrival may be in one)."""
    while True:
        frame = await client.until("presence")
        for change in ("joined", "left"):
            for person in frame[change]:
                if person["id"] == person_id:
                    return change, person


async def join(connect: Any, room_id: str, name: str, user: str | None = None) -> Client:
    query = f"?name={name}" + (f"&user={user}" if user else "")
    return await connect(room_id, query=query)


async def test_two_people_see_each_others_names_on_messages_and_answers_name_the_model(
    connect: Any, room: dict, upstream: FakeUpstream, http: Any
) -> None:
    upstream.script(Scenario(tokens=["hi ", "Alice"]), Scenario(tokens=["hi ", "Bob"]))
    alice = await join(connect, room["id"], "Alice", "u-alice")
    bob = await join(connect, room["id"], "Bob", "u-bob")
    assert alice.frames[0]["you"] == {"id": "u-alice", "name": "Alice"}

    await alice.send({"type": "send", "content": "hello from Alice"})
    seen_by_bob = await bob.until("message")
    assert seen_by_bob["message"]["author"] == {"id": "u-alice", "name": "Alice", "kind": "user"}
    done = await bob.until("done")
    assert done["message"]["author"] == {
        "id": "model:fake-model",
        "name": "fake-model",
        "kind": "model",
    }
    await alice.until("done")

    await bob.send({"type": "send", "content": "and from Bob"})
    seen_by_alice = await alice.until("message")
    assert seen_by_alice["message"]["author"]["name"] == "Bob"
    await alice.until("done")

    late = await join(connect, room["id"], "Late")
    shown = [m["author"]["name"] for m in late.frames[0]["messages"]]
    assert shown == ["Alice", "fake-model", "Bob", "fake-model"]
    stored = [m["author"]["name"] for m in await listed(http, room["id"])]
    assert stored == shown


async def test_presence_lists_people_once_whatever_their_tabs_and_announces_join_and_leave(
    connect: Any, room: dict, http: Any
) -> None:
    alice = await join(connect, room["id"], "Alice", "u-alice")
    assert alice.frames[0]["members"] == [{"id": "u-alice", "name": "Alice"}]

    bob = await join(connect, room["id"], "Bob", "u-bob")
    assert names(bob.frames[0]["members"]) == ["Alice", "Bob"]
    assert await presence_of(alice, "u-bob") == ("joined", {"id": "u-bob", "name": "Bob"})
    assert "event_id" in alice.frames[-1]  # a logged event: a resuming client gets it too

    second_tab = await join(connect, room["id"], "Bob", "u-bob")  # the same person again
    assert names(second_tab.frames[0]["members"]) == ["Alice", "Bob"]
    fetched = (await http.get(f"/api/rooms/{room['id']}")).json()
    assert names(fetched["members"]) == ["Alice", "Bob"]
    assert fetched["connections"] == 3

    await second_tab.ws.close()  # Bob still has a tab open: nobody left
    await asyncio.sleep(2 * ANNOUNCE_EVERY)
    await alice.send({"type": "ping", "id": "p"})
    await alice.until("pong")  # after any announcement due by now
    named = [f for f in alice.of_type("presence") if "u-bob" in str(f)]
    assert len(named) == 1  # the second tab came and went unannounced

    await bob.ws.close()
    assert await presence_of(alice, "u-bob") == ("left", {"id": "u-bob", "name": "Bob"})


async def test_a_guest_without_a_name_gets_one_and_bad_names_are_refused(
    connect: Any, room: dict, http: Any
) -> None:
    guest = await connect(room["id"])
    you = guest.frames[0]["you"]
    assert you["id"].startswith("guest-") and you["name"] == you["id"]

    for query, code in [
        ("?name=" + "x" * 65, "invalid_name"),
        ("?name=%E2%80%AEevil", "invalid_name"),  # a bidi override
        ("?name=a%0Ab", "invalid_name"),
        ("?user=no%20spaces", "invalid_user"),
    ]:
        refused = await connect(room["id"], query=query)
        error = refused.frames[0]
        assert (error["type"], error["code"]) == ("error", code), query
        await refused.ws.wait_closed()
        assert refused.ws.close_code == 4400

    response = await http.post(f"/api/rooms/{room['id']}/messages?name=%00", json={"content": "hi"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_name"
    assert await listed(http, room["id"]) == []


async def test_typing_is_seen_by_others_throttled_never_stored_nor_replayed(
    connect: Any, room: dict, open_sse: Any, http: Any
) -> None:
    alice = await join(connect, room["id"], "Alice", "u-alice")
    bob = await join(connect, room["id"], "Bob", "u-bob")
    listener = await open_sse(f"/api/rooms/{room['id']}/events?name=Carol")
    ready = await listener.until("ready")
    assert names(ready.data["members"]) == ["Alice", "Bob", "Carol"]
    await presence_of(alice, ready.data["you"]["id"])  # Carol

    for _ in range(5):  # a burst of keystrokes: one announcement
        await alice.send({"type": "typing"})
    typing = await bob.until("typing")
    assert typing == {
        "type": "typing",
        "person": {"id": "u-alice", "name": "Alice"},
        "active": True,
        "expires_in": 6,
    }
    seen_over_sse = await listener.until("typing")
    assert seen_over_sse.id is None and seen_over_sse.data == typing

    await alice.send({"type": "typing", "active": False})
    stopped = await bob.until("typing")
    assert stopped["active"] is False
    await bob.send({"type": "ping"})
    await bob.until("pong")
    assert len(bob.of_type("typing")) == 2  # the burst was throttled to one

    # Over REST, for clients without a WebSocket.
    response = await http.post(f"/api/rooms/{room['id']}/typing?name=Carol", json={})
    assert response.status_code == 204
    while (await alice.until("typing"))["person"]["name"] != "Carol":
        pass  # Alice's own (everyone in the room gets them, the typist too)

    # Never replayed: a client resuming from before the typing gets none of it.
    after = alice.frames[0]["last_event_id"]
    back = await connect(room["id"], query=f"?last_event_id={after}&name=Alice&user=u-alice")
    assert back.frames[0]["type"] == "resumed"
    await back.send({"type": "ping"})
    await back.until("pong")
    assert back.of_type("typing") == []
    named = {p["name"] for f in back.of_type("presence") for p in f["joined"]}
    assert {"Bob", "Carol"} <= named


async def test_rename_changes_the_name_in_the_room_and_on_later_messages(
    connect: Any, room: dict, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["ok"]))
    alice = await join(connect, room["id"], "Alice", "u-alice")
    bob = await join(connect, room["id"], "Bob", "u-bob")
    await presence_of(alice, "u-bob")
    await alice.send({"type": "rename", "name": "Alice B."})
    renamed = await presence_of(bob, "u-alice")
    while renamed[1]["name"] != "Alice B.":  # her arrival, if announced after Bob's ready
        renamed = await presence_of(bob, "u-alice")
    assert renamed == ("joined", {"id": "u-alice", "name": "Alice B."})
    await alice.send({"type": "send", "content": "hi"})
    assert (await bob.until("message"))["message"]["author"]["name"] == "Alice B."
    await alice.send({"type": "rename", "name": " "})
    assert (await alice.until("error"))["code"] == "invalid_name"


async def test_edit_makes_a_new_branch_that_is_answered_and_the_old_one_stays_selectable(
    connect: Any, room: dict, upstream: FakeUpstream, http: Any
) -> None:
    upstream.script(Scenario(tokens=["first answer"]), Scenario(tokens=["second answer"]))
    alice = await join(connect, room["id"], "Alice", "u-alice")
    bob = await join(connect, room["id"], "Bob", "u-bob")
    await alice.send({"type": "send", "content": "what is 2+2?"})
    original = (await alice.until("message"))["message"]
    first = (await alice.until("done"))["message"]

    await alice.send(
        {"type": "edit", "message_id": original["id"], "content": "what is 3+3?", "id": "e-1"}
    )
    branch = await bob.until("branch")
    edited, streaming = branch["messages"][-2:]
    assert edited["content"] == "what is 3+3?" and edited["parent_id"] == original["parent_id"]
    assert edited["siblings"] == [original["id"], edited["id"]]
    assert edited["author"]["id"] == "u-alice" and edited["client_id"] == "e-1"
    assert streaming["status"] == "streaming" and branch["active_leaf_id"] == streaming["id"]
    done = await bob.until("done")
    assert done["message"]["content"] == "second answer"
    await alice.until("done")
    prompt = upstream.requests[-1].body["messages"]
    assert prompt[-1] == {"role": "user", "content": "what is 3+3?"}
    assert "what is 2+2?" not in str(prompt)

    # The old branch is kept and can be selected again, answer and all.
    await bob.send({"type": "select", "message_id": original["id"]})
    back = await alice.until("branch")
    assert [m["id"] for m in back["messages"]] == [original["id"], first["id"]]
    assert back["messages"][0]["siblings"] == [original["id"], edited["id"]]

    # A retry of the edit (same id) stores nothing new.
    await alice.send(
        {"type": "edit", "message_id": original["id"], "content": "what is 3+3?", "id": "e-1"}
    )
    duplicate = await alice.until("message")
    assert duplicate["duplicate"] is True and duplicate["message"]["id"] == edited["id"]


async def test_only_the_author_may_edit_and_only_user_messages(
    connect: Any, room: dict, upstream: FakeUpstream, http: Any
) -> None:
    upstream.script(Scenario(tokens=["answer"]))
    alice = await join(connect, room["id"], "Alice", "u-alice")
    mallory = await join(connect, room["id"], "Mallory", "u-mallory")
    await alice.send({"type": "send", "content": "mine"})
    message = (await alice.until("message"))["message"]
    answer = (await alice.until("done"))["message"]

    await mallory.send({"type": "edit", "message_id": message["id"], "content": "pwned"})
    refused = await mallory.until("error")
    assert refused["code"] == "not_author"
    await alice.send({"type": "edit", "message_id": answer["id"], "content": "x"})
    assert (await alice.until("error"))["code"] == "invalid_target"
    await alice.send({"type": "edit", "message_id": message["id"], "content": "  "})
    assert (await alice.until("error"))["code"] == "empty_message"
    assert [m["content"] for m in await listed(http, room["id"])] == ["mine", "answer"]


async def listed(http: Any, room_id: str, query: str = "") -> list[dict[str, Any]]:
    response = await http.get(f"/api/rooms/{room_id}/messages{query}")
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


async def test_edit_over_rest_streams_the_new_answer(
    room: dict, open_sse: Any, http: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["one"]), Scenario(tokens=["two"]))
    sent = await http.post(
        f"/api/rooms/{room['id']}/messages?user=u-cli&name=Cli", json={"content": "q1"}
    )
    message = sent.json()["message"]
    assert message["author"] == {"id": "u-cli", "name": "Cli", "kind": "user"}
    await wait_done(http, room["id"])

    other = await http.post(
        f"/api/rooms/{room['id']}/messages/{message['id']}/edit?user=u-other",
        json={"content": "nope"},
    )
    assert other.status_code == 403 and other.json()["error"]["code"] == "not_author"

    stream = await open_sse(
        f"/api/rooms/{room['id']}/messages/{message['id']}/edit?user=u-cli&name=Cli",
        method="POST",
        json={"content": "q2"},
    )
    events = await stream.rest()
    assert events[0].type == "branch"
    assert events[-1].type == "done" and events[-1].data["message"]["content"] == "two"


async def wait_done(http: Any, room_id: str) -> None:
    for _ in range(200):
        messages = await listed(http, room_id)
        if messages and messages[-1]["status"] != "streaming":
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the answer did not end")


async def test_the_owner_hides_a_message_from_everyone_and_from_the_model(
    connect: Any, room: dict, upstream: FakeUpstream, http: Any
) -> None:
    upstream.script(Scenario(tokens=["a1"]), Scenario(tokens=["a2"]))
    alice = await join(connect, room["id"], "Alice", "u-alice")
    await alice.send({"type": "send", "content": "something rude"})
    message = (await alice.until("message"))["message"]
    await alice.until("done")

    # Without API keys every room is everyone's (as for PATCH and DELETE).
    await alice.send({"type": "hide", "message_id": message["id"]})
    hidden = await alice.until("hidden")
    assert hidden["message_id"] == message["id"] and hidden["hidden"] is True
    assert hidden["message"]["content"] == "" and "event_id" in hidden

    late = await connect(room["id"])
    shown = late.frames[0]["messages"][0]
    assert shown["hidden"] is True and shown["content"] == ""
    assert (await listed(http, room["id"]))[0]["content"] == ""
    revealed = await listed(http, room["id"], "?include_hidden=true")
    assert revealed[0]["content"] == "something rude"

    await alice.send({"type": "send", "content": "next"})
    await alice.until("done")
    prompt = str(upstream.requests[-1].body["messages"])
    assert "something rude" not in prompt and "hidden by the room owner" in prompt

    response = await http.post(
        f"/api/rooms/{room['id']}/messages/{message['id']}/hide", json={"hidden": False}
    )
    assert response.status_code == 200
    assert response.json()["message"]["content"] == "something rude"
    shown_again = await alice.until("hidden")
    assert shown_again["hidden"] is False
    assert shown_again["message"]["content"] == "something rude"


async def test_api_info_and_the_room_list_by_last_activity(
    gateway: Any, http: Any, upstream: FakeUpstream, connect: Any
) -> None:
    info = (await http.get("/api/info")).json()
    assert info == {"default_model": "fake-model", "access": False}

    upstream.script(Scenario(tokens=["ok"]))
    older = (await http.post("/api/rooms", json={"name": "older"})).json()
    newer = (await http.post("/api/rooms", json={"name": "newer"})).json()
    listed = [r["name"] for r in (await http.get("/api/rooms")).json()["rooms"]]
    assert listed[:2] == ["newer", "older"]

    client = await connect(older["id"])
    await client.send({"type": "send", "content": "bump"})
    await client.until("done")
    listed = [r["id"] for r in (await http.get("/api/rooms")).json()["rooms"]]
    assert listed[:2] == [older["id"], newer["id"]]


async def test_an_edit_is_screened_and_counted_like_a_send(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(checks=["prompt_injection"], rate_limit_messages="2/minute")
    room = await create_room(gateway)
    alice = await connect(room["id"], gateway_=gateway, query="?user=u-alice")
    upstream.script(Scenario(tokens=["ok"]))
    await alice.send({"type": "send", "content": "hello"})
    message = (await alice.until("message"))["message"]
    await alice.until("done")

    await alice.send({"type": "edit", "message_id": message["id"], "content": INJECTION})
    rejected = await alice.until("error")
    assert (rejected["code"], rejected["rule"]) == ("input_rejected", "prompt_injection")

    upstream.script(Scenario(tokens=["ok"]))
    await alice.send({"type": "edit", "message_id": message["id"], "content": "hello again"})
    await alice.until("done")  # the second message of two a minute
    await alice.send({"type": "edit", "message_id": message["id"], "content": "third"})
    assert (await alice.until("error"))["code"] == "rate_limited"
    assert len(await get_messages(gateway, room["id"])) == 2
    assert len(upstream.requests) == 2
