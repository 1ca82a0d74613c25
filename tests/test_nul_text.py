"""U+0000 (NUL) in text: refused in input with ``invalid_character``, dropped from model
answers; the same on SQLite and PostgreSQL (run with TEST_DATABASE_URL)."""

from __future__ import annotations

from typing import Any

from gateway.testing.fake_upstream import FakeUpstream, Scenario


async def test_a_websocket_message_with_nul_is_refused_and_the_connection_stays_usable(
    connect: Any, room: dict, http: Any
) -> None:
    client = await connect(room["id"])
    await client.send('{"type":"send","content":"a\\u0000b","id":"c1"}')
    error = await client.until("error")
    assert error["code"] == "invalid_character"
    assert "U+0000" in error["message"]
    assert "asyncpg" not in error["message"] and "sqlalchemy" not in error["message"].lower()

    await client.send({"type": "send", "content": "fine"})
    assert (await client.until("done"))["message"]["status"] == "complete"
    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [m["content"] for m in stored] == ["fine", stored[1]["content"]]


async def test_rest_bodies_with_nul_get_a_json_400(http: Any, room: dict) -> None:
    for method, path, body in [
        ("POST", f"/api/rooms/{room['id']}/messages", b'{"content":"a\\u0000b"}'),
        ("POST", "/api/rooms", b'{"name":"a\\u0000b"}'),
        ("POST", "/api/rooms", b'{"name":"n","persona":{"system_prompt":"x\\u0000"}}'),
        ("PATCH", f"/api/rooms/{room['id']}", b'{"persona":{"model":"m\\u0000"}}'),
    ]:
        response = await http.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_character"
    # An escaped backslash followed by "u0000" is ordinary text.
    response = await http.post(
        f"/api/rooms/{room['id']}/messages",
        content=b'{"content":"\\\\u0000 is how JSON writes NUL"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["message"]["content"] == "\\u0000 is how JSON writes NUL"


async def test_an_id_with_nul_in_a_url_is_not_found(http: Any, room: dict) -> None:
    for path in ["/api/rooms/a%00b", "/api/rooms/a%00b/messages", "/api/rooms/a%00b/events"]:
        response = await http.get(path)
        assert response.status_code == 404, response.text
        assert response.headers["content-type"].startswith("application/json")


async def test_nul_in_a_model_answer_is_dropped_and_the_answer_completes(
    connect: Any, room: dict, http: Any, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["a\x00b", "\x00", " c"]))
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "hi"})
    done = await client.until("done", "error")
    assert done["type"] == "done", done
    assert done["message"]["content"] == "ab c"
    assert "".join(f["text"] for f in client.of_type("token")) == "ab c"
    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert stored[-1]["status"] == "complete"
    assert stored[-1]["content"] == "ab c"
