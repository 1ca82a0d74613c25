"""Export and import: a whole room as a versioned JSON room file (every branch, with
authors, statuses, usage), its active branch as Markdown, and a new room from such a
file; bad files are refused whole with a code that says what is wrong."""

from __future__ import annotations

import copy
from typing import Any

import httpx2
import pytest

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import Client, Gateway, create_room, scaled

KEPT = (
    "role", "content", "status", "author", "hidden", "created_at", "model", "temperature",
    "max_tokens", "finish_reason", "usage", "timing", "error",
)  # fmt: skip


def same_content(file: dict[str, Any]) -> dict[str, Any]:
    """What must survive a round trip: the room's settings, and the messages with
    their tree links expressed by position (ids are new in an imported room)."""
    position = {m["id"]: i for i, m in enumerate(file["messages"])}
    return {
        "room": {k: v for k, v in file["room"].items() if k not in ("id", "created_at")},
        "active": position.get(file["active_leaf_id"]),
        "messages": [
            {
                "parent": position.get(m["parent_id"]),
                **{k: m.get(k) for k in KEPT},
            }
            for m in file["messages"]
        ],
    }


async def chat(client: Client, content: str) -> dict[str, Any]:
    await client.send({"type": "send", "content": content})
    return (await client.until("done"))["message"]


@pytest.fixture
async def http(gateway: Gateway) -> Any:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as client:
        yield client


async def a_room_with_branches(gateway: Gateway, connect: Any, upstream: FakeUpstream) -> dict:
    """A room with a regenerated answer, an edited message and a hidden one."""
    room = await create_room(gateway, temperature=0.3, max_tokens=100)
    alice = await connect(room["id"], query="?name=Alice&user=u-alice")
    upstream.script(
        Scenario(tokens=["first"]), Scenario(tokens=["second"]), Scenario(tokens=["again"])
    )
    answer = await chat(alice, "one")
    await chat(alice, "two")
    await alice.send({"type": "regenerate", "message_id": answer["id"]})
    await alice.until("done")
    upstream.script(Scenario(tokens=["edited answer"]))
    first_user = alice.of_type("message")[0]["message"]
    await alice.send({"type": "edit", "message_id": first_user["id"], "content": "uno"})
    await alice.until("done")
    await alice.send({"type": "hide", "message_id": first_user["id"]})
    await alice.until("hidden")
    return room


async def test_export_then_import_then_export_gives_the_same_room(
    gateway: Gateway, connect: Any, upstream: FakeUpstream, http: httpx2.AsyncClient
) -> None:
    room = await a_room_with_branches(gateway, connect, upstream)
    response = await http.get(f"/api/rooms/{room['id']}/export")
    assert response.status_code == 200
    assert response.headers["content-disposition"].startswith("attachment;")
    exported = response.json()
    assert exported["format"] == "chat-gateway.room" and exported["version"] == 1
    assert len(exported["messages"]) == 7  # one, first, two, second, again, uno, edited
    roles = {m["id"]: m for m in exported["messages"]}
    assert all(m["parent_id"] is None or m["parent_id"] in roles for m in exported["messages"])
    hidden = [m for m in exported["messages"] if m["hidden"]]
    assert [m["content"] for m in hidden] == ["one"]  # no keys: everyone owns it
    assert exported["messages"][0]["author"] == {"id": "u-alice", "name": "Alice", "kind": "user"}

    imported = await http.post("/api/rooms/import", json=exported)
    assert imported.status_code == 201, imported.text
    new = imported.json()
    assert new["id"] != room["id"] and new["messages"] == 7
    again = (await http.get(f"/api/rooms/{new['id']}/export")).json()
    assert same_content(again) == same_content(exported)
    assert not {m["id"] for m in again["messages"]} & set(roles)  # new ids


async def test_an_imported_room_goes_on_from_its_active_branch(
    gateway: Gateway, connect: Any, upstream: FakeUpstream, http: httpx2.AsyncClient
) -> None:
    room = await a_room_with_branches(gateway, connect, upstream)
    exported = (await http.get(f"/api/rooms/{room['id']}/export")).json()
    new = (await http.post("/api/rooms/import", json=exported)).json()

    bob = await connect(new["id"])
    shown = [m["content"] for m in bob.frames[0]["messages"]]
    assert shown == ["uno", "edited answer"]
    upstream.script(Scenario(tokens=["onwards"]))
    await chat(bob, "three")
    asked = upstream.requests[-1].body["messages"]
    assert [m["content"] for m in asked[1:]] == ["uno", "edited answer", "three"]
    hidden = (await http.get(f"/api/rooms/{new['id']}/export")).json()["messages"][0]
    assert (hidden["content"], hidden["hidden"]) == ("one", True)  # the old branch, kept


async def test_markdown_is_the_active_branch_as_people_read_it(
    gateway: Gateway, connect: Any, upstream: FakeUpstream, http: httpx2.AsyncClient
) -> None:
    room = await create_room(gateway, system_prompt="Be brief.")
    alice = await connect(room["id"], query="?name=Alice")
    upstream.script(Scenario(tokens=["Hi ", "Alice"]))
    await chat(alice, "Hello **there**")
    response = await http.get(f"/api/rooms/{room['id']}/export?format=markdown")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    text = response.text
    assert text.startswith("# test room\n\n> Be brief.\n")
    assert "**Alice** · " in text and "Hello **there**" in text
    assert "**fake-model** · " in text and "Hi Alice" in text
    assert (await http.get(f"/api/rooms/{room['id']}/export?format=pdf")).status_code == 400


def a_file(**changes: Any) -> dict[str, Any]:
    file: dict[str, Any] = {
        "format": "chat-gateway.room",
        "version": 1,
        "room": {"name": "imported", "persona": {"system_prompt": "x"}},
        "active_leaf_id": "b",
        "messages": [
            {"id": "a", "parent_id": None, "role": "user", "content": "hi",
             "status": "complete", "created_at": "2026-01-01T00:00:00Z"},
            {"id": "b", "parent_id": "a", "role": "assistant", "content": "hello",
             "status": "complete", "created_at": "2026-01-01T00:00:01Z", "model": "m"},
        ],
    }  # fmt: skip
    file.update(changes)
    return file


def with_message(index: int, **fields: Any) -> dict[str, Any]:
    file = a_file()
    file["messages"] = copy.deepcopy(file["messages"])
    file["messages"][index].update(fields)
    return file


BAD_FILES = [
    ("not_a_room_file", {"hello": "world"}),
    ("not_a_room_file", [1, 2]),
    ("unsupported_version", a_file(version=2)),
    ("broken_tree_link", with_message(1, parent_id="nowhere")),
    ("broken_tree_link", a_file(active_leaf_id="nowhere")),
    ("tree_cycle", with_message(0, parent_id="b")),
    ("unknown_status", with_message(1, status="finished")),
    ("invalid_role", with_message(0, role="system")),
    ("invalid_tree", with_message(1, parent_id=None)),  # an answer to nothing
    ("duplicate_message_id", with_message(1, id="a", parent_id=None, role="user")),
    ("invalid_room_file", a_file(room={"persona": {}})),
    ("invalid_room_file", with_message(0, created_at="yesterday")),
    ("invalid_room_file", a_file(room={"name": "x", "persona": {"temperature": 9}})),
]


@pytest.mark.parametrize(("code", "file"), BAD_FILES, ids=[c for c, _ in BAD_FILES])
async def test_a_bad_room_file_is_refused_with_a_code_and_nothing_is_stored(
    http: httpx2.AsyncClient, code: str, file: Any
) -> None:
    before = (await http.get("/api/rooms")).json()["rooms"]
    response = await http.post("/api/rooms/import", json=file)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert (await http.get("/api/rooms")).json()["rooms"] == before


async def test_an_oversized_or_broken_body_is_refused(start_gateway: Any) -> None:
    gateway = start_gateway(import_max_bytes=2048)
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        big = with_message(0, content="x" * 4096)
        response = await http.post("/api/rooms/import", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
        broken = await http.post("/api/rooms/import", content=b'{"format": ')
        assert broken.json()["error"]["code"] == "invalid_json"
        assert (await http.get("/api/rooms")).json()["rooms"] == []
        ok = await http.post("/api/rooms/import", json=a_file())
        assert ok.status_code == 201


async def test_a_streaming_answer_is_imported_as_interrupted(http: httpx2.AsyncClient) -> None:
    response = await http.post("/api/rooms/import", json=with_message(1, status="streaming"))
    room = response.json()
    messages = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [m["status"] for m in messages] == ["complete", "interrupted"]
    assert messages[1]["author"]["name"] == "m"


async def test_exports_show_what_the_reader_may_see(
    start_gateway: Any, upstream: FakeUpstream
) -> None:
    """With API keys: a private room exports to its owner and granted keys only; a
    secret system prompt and hidden messages' content go to the owner only; an
    import belongs to the key that made it."""
    gateway = start_gateway(
        api_keys=["alice=sk-alice-123456", "bob=sk-bob-654321", "eve=sk-eve-0000000"]
    )
    alice, bob, eve = (
        {"authorization": f"Bearer {key}"}
        for key in ("sk-alice-123456", "sk-bob-654321", "sk-eve-0000000")
    )
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        body = {"name": "p", "persona": {"system_prompt": "SECRET"}, "private": True,
                "secret_prompt": True, "grants": ["bob"]}  # fmt: skip
        room = (await http.post("/api/rooms", json=body, headers=alice)).json()
        upstream.script(Scenario(tokens=["ok"]))
        sent = await http.post(
            f"/api/rooms/{room['id']}/messages",
            json={"content": "private words"},
            headers={**alice, "accept": "text/event-stream"},
        )
        assert "event: done" in sent.text
        first = (await http.get(f"/api/rooms/{room['id']}/messages", headers=alice)).json()
        hide = f"/api/rooms/{room['id']}/messages/{first['messages'][0]['id']}/hide"
        assert (await http.post(hide, headers=alice)).status_code == 200

        owner = (await http.get(f"/api/rooms/{room['id']}/export", headers=alice)).json()
        assert owner["room"]["persona"]["system_prompt"] == "SECRET"
        assert owner["messages"][0]["content"] == "private words"
        granted = (await http.get(f"/api/rooms/{room['id']}/export", headers=bob)).json()
        assert granted["room"]["persona"]["system_prompt"] is None
        assert granted["messages"][0]["content"] == ""
        for kind in ("json", "markdown"):
            refused = await http.get(f"/api/rooms/{room['id']}/export?format={kind}", headers=eve)
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "room_not_found"
        assert (
            "SECRET"
            not in (
                await http.get(f"/api/rooms/{room['id']}/export?format=markdown", headers=bob)
            ).text
        )

        copied = (await http.post("/api/rooms/import", json=granted, headers=bob)).json()
        assert copied["owner"] == "bob"
        assert (await http.get(f"/api/rooms/{copied['id']}", headers=eve)).status_code == 404
