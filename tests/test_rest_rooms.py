"""The REST API for rooms and their history."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from gateway.testing.fake_upstream import Scenario


async def test_create_room_with_persona(http: Any) -> None:
    response = await http.post(
        "/api/rooms",
        json={
            "name": "Pirates",
            "persona": {
                "system_prompt": "Talk like a pirate.",
                "model": "gpt-4o",
                "temperature": 1.2,
                "max_tokens": 300,
            },
        },
    )
    assert response.status_code == 201
    room = response.json()
    assert room["id"].startswith("room_")
    assert room["id"].replace("_", "").replace("-", "").isalnum()  # URL-safe
    assert room["name"] == "Pirates"
    assert room["persona"] == {
        "system_prompt": "Talk like a pirate.",
        "model": "gpt-4o",
        "temperature": 1.2,
        "max_tokens": 300,
        "context_tokens": None,
    }
    fetched = (await http.get(f"/api/rooms/{room['id']}")).json()
    assert fetched["persona"] == room["persona"]
    assert fetched["members"] == [] and fetched["connections"] == 0


async def test_list_update_and_delete_rooms(http: Any) -> None:
    ids = [(await http.post("/api/rooms", json={"name": f"r{i}"})).json()["id"] for i in range(3)]
    listed = (await http.get("/api/rooms")).json()["rooms"]
    assert [r["id"] for r in listed] == ids[::-1]  # the last active first
    assert [r["id"] for r in (await http.get("/api/rooms?limit=1&offset=1")).json()["rooms"]] == [
        ids[1]
    ]

    patched = await http.patch(
        f"/api/rooms/{ids[0]}", json={"name": "renamed", "persona": {"temperature": 0.1}}
    )
    assert patched.status_code == 200
    assert patched.json()["name"] == "renamed"
    assert patched.json()["persona"]["temperature"] == 0.1
    listed = (await http.get("/api/rooms")).json()["rooms"]
    assert [r["id"] for r in listed] == [ids[0], ids[2], ids[1]]  # a change is activity

    assert (await http.delete(f"/api/rooms/{ids[0]}")).status_code == 204
    assert (await http.get(f"/api/rooms/{ids[0]}")).status_code == 404
    assert [r["id"] for r in (await http.get("/api/rooms")).json()["rooms"]] == [ids[2], ids[1]]


async def test_persona_change_applies_to_the_next_answer_and_is_broadcast(
    http: Any, room: dict, connect: Any, upstream: Any
) -> None:
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "before"})
    await client.until("done")
    await http.patch(
        f"/api/rooms/{room['id']}",
        json={"persona": {"system_prompt": "Be loud.", "model": "other-model"}},
    )
    changed = await client.until("room")
    assert changed["room"]["persona"]["system_prompt"] == "Be loud."
    await client.send({"type": "send", "content": "after"})
    done = await client.until("done")
    assert done["message"]["model"] == "other-model"
    body = upstream.requests[-1].body
    assert body["model"] == "other-model"
    assert body["messages"][0] == {"role": "system", "content": "Be loud."}
    # The conversation goes on from where it was.
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert [body["messages"][1]["content"], body["messages"][3]["content"]] == ["before", "after"]
    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [m["content"] for m in stored][::2] == ["before", "after"]
    assert all(b["parent_id"] == a["id"] for a, b in itertools.pairwise(stored))


async def test_deleting_a_room_disconnects_its_members(http: Any, room: dict, connect: Any) -> None:
    client = await connect(room["id"])
    assert (await http.delete(f"/api/rooms/{room['id']}")).status_code == 204
    frame = await client.until("error")
    assert frame["code"] == "room_deleted"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/api/rooms/room_missing", None, 404, "room_not_found"),
        ("PATCH", "/api/rooms/room_missing", {"name": "x"}, 404, "room_not_found"),
        ("DELETE", "/api/rooms/room_missing", None, 404, "room_not_found"),
        ("GET", "/api/rooms/room_missing/messages", None, 404, "room_not_found"),
        ("POST", "/api/rooms", {}, 400, "invalid_body"),
        ("POST", "/api/rooms", {"name": ""}, 400, "invalid_body"),
        ("POST", "/api/rooms", {"name": "x", "persona": {"temperature": 3}}, 400, "invalid_body"),
        ("POST", "/api/rooms", {"name": "x", "persona": {"max_tokens": 0}}, 400, "invalid_body"),
        ("POST", "/api/rooms", {"name": "x", "persona": {"colour": "red"}}, 400, "invalid_body"),
        ("POST", "/api/rooms", b"{not json", 400, "invalid_json"),
        ("GET", "/api/rooms?limit=nope", None, 400, "invalid_query"),
        ("PUT", "/api/rooms", {}, 405, "method_not_allowed"),
        ("GET", "/api/nothing-here", None, 404, "not_found"),
    ],
)
async def test_errors_are_json_with_a_stable_code(
    http: Any, method: str, path: str, body: Any, status: int, code: str
) -> None:
    if isinstance(body, bytes):
        response = await http.request(method, path, content=body)
    else:
        response = await http.request(method, path, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]


async def test_body_over_the_size_limit_is_refused(http: Any) -> None:
    response = await http.post("/api/rooms", content=b"x" * (2 * 1024 * 1024))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


async def test_deleting_a_room_mid_answer_stops_it_cleanly(
    http: Any, room: dict, connect: Any, upstream: Any
) -> None:
    upstream.script(Scenario(count=500, delay=0.01))
    other_room = (await http.post("/api/rooms", json={"name": "other"})).json()
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "long"})
    await client.until("token")
    assert (await http.delete(f"/api/rooms/{room['id']}")).status_code == 204
    assert (await client.until("error"))["code"] == "room_deleted"
    upstream.wait_until(lambda: upstream.requests[-1].disconnected_at is not None)
    # The gateway carries on serving other rooms.
    bystander = await connect(other_room["id"])
    await bystander.send({"type": "send", "content": "still there?"})
    assert (await bystander.until("done"))["message"]["status"] == "complete"
