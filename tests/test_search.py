"""Search: ``GET /api/search?q=`` finds messages holding every word, ranked, with a
highlighted snippet, across the rooms the caller may see, on the database's own
full-text engine (SQLite FTS5 with trigrams; PostgreSQL tsvector + pg_trgm when
``TEST_DATABASE_URL`` is set). Japanese text is found too."""

from __future__ import annotations

from typing import Any

import httpx2
import pytest

from gateway.search import snippet
from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import Gateway, create_room, scaled


@pytest.fixture
async def http(gateway: Gateway) -> Any:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as client:
        yield client


async def say(
    http: httpx2.AsyncClient, room_id: str, content: str, answer: str, upstream: FakeUpstream,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Post ``content`` and wait for ``answer``; return the user message."""
    upstream.script(Scenario(tokens=[answer]))
    response = await http.post(
        f"/api/rooms/{room_id}/messages?user=tester",
        json={"content": content},
        headers={**(headers or {}), "accept": "text/event-stream"},
    )
    assert "event: done" in response.text, response.text
    messages = await http.get(f"/api/rooms/{room_id}/messages", headers=headers or {})
    return messages.json()["messages"][-2]


async def found(http: httpx2.AsyncClient, q: str, **params: Any) -> list[str]:
    """The contents' snippets found for ``q``, best first."""
    response = await http.get("/api/search", params={"q": q, **params})
    assert response.status_code == 200, response.text
    return [r["snippet"] for r in response.json()["results"]]


async def test_words_are_found_across_rooms_with_the_room_and_a_highlighted_snippet(
    gateway: Gateway, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    garden = await create_room(gateway)
    kitchen = await create_room(gateway)
    asked = await say(http, garden["id"], "How do I water tomatoes in July?", "Deeply.", upstream)
    await say(http, kitchen["id"], "A sauce of tomatoes <b>please</b>", "Simmer it.", upstream)
    await say(http, kitchen["id"], "Something else entirely", "Tomatoes again", upstream)

    response = await http.get("/api/search", params={"q": "tomatoes"})
    results = response.json()["results"]
    assert len(results) == 3 and response.json()["next_offset"] is None
    mine = next(r for r in results if r["message"]["id"] == asked["id"])
    assert mine["room"] == {"id": garden["id"], "name": "test room"}
    assert mine["message"]["role"] == "user" and mine["message"]["author"]["kind"] == "user"
    assert mine["snippet"] == "How do I water <mark>tomatoes</mark> in July?"
    sauce = next(r["snippet"] for r in results if "sauce" in r["snippet"])
    assert sauce == "A sauce of <mark>tomatoes</mark> &lt;b&gt;please&lt;/b&gt;"  # escaped
    answer = next(r for r in results if r["message"]["role"] == "assistant")
    assert answer["message"]["author"] == {
        "id": "model:fake-model", "name": "fake-model", "kind": "model",
    }  # fmt: skip

    assert await found(http, "TOMATOES july") == [
        "How do I water <mark>tomatoes</mark> in <mark>July</mark>?"
    ]
    assert await found(http, "tomatoes", room=kitchen["id"]) != []
    assert len(await found(http, "tomatoes", room=kitchen["id"])) == 2
    assert await found(http, "cucumbers") == []


async def test_japanese_is_found_by_words_of_any_length(
    gateway: Gateway, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    await say(http, room["id"], "東京の天気はどうですか", "晴れです", upstream)
    await say(http, room["id"], "大阪まで新幹線で行きます", "いってらっしゃい", upstream)

    assert await found(http, "天気") == ["東京の<mark>天気</mark>はどうですか"]  # 2 characters
    assert await found(http, "天気は") == ["東京の<mark>天気は</mark>どうですか"]
    assert await found(http, "東京 天気") == ["<mark>東京</mark>の<mark>天気</mark>はどうですか"]
    assert await found(http, "新幹線") == ["大阪まで<mark>新幹線</mark>で行きます"]
    assert await found(http, "晴れ") == ["<mark>晴れ</mark>です"]
    assert await found(http, "京都") == []


async def test_old_versions_are_found_hidden_and_streaming_messages_are_not(
    gateway: Gateway, http: httpx2.AsyncClient, upstream: FakeUpstream, connect: Any
) -> None:
    room = await create_room(gateway)
    first = await say(http, room["id"], "my zucchini question", "zucchini answer", upstream)
    await say(http, room["id"], "a secret zucchini", "ok", upstream)
    upstream.script(Scenario(tokens=["edited"]))
    edit = await http.post(
        f"/api/rooms/{room['id']}/messages/{first['id']}/edit?user=tester",
        json={"content": "my better question"},
        headers={"accept": "text/event-stream"},
    )
    assert "event: done" in edit.text
    stored = (await http.get(f"/api/rooms/{room['id']}/export")).json()["messages"]
    secret = next(m for m in stored if m["content"] == "a secret zucchini")
    await http.post(f"/api/rooms/{room['id']}/messages/{secret['id']}/hide")

    # The edited-away branch is still found; the hidden message is not.
    assert sorted(await found(http, "zucchini")) == [
        "<mark>zucchini</mark> answer",
        "my <mark>zucchini</mark> question",
    ]

    member = await connect(room["id"])
    upstream.script(Scenario(tokens=["long ", "rhubarb ", "answer"], delay=0.3))
    await member.send({"type": "send", "content": "tell me"})
    await member.until("token")
    assert await found(http, "rhubarb") == []  # not while streaming
    await member.until("done")
    assert await found(http, "rhubarb") == ["long <mark>rhubarb</mark> answer"]


async def test_pages_of_results(
    gateway: Gateway, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    for i in range(3):
        await say(http, room["id"], f"parsnip number {i}", f"parsnip reply {i}", upstream)
    first = (await http.get("/api/search", params={"q": "parsnip", "limit": 4})).json()
    assert len(first["results"]) == 4 and first["next_offset"] == 4
    rest = await http.get("/api/search", params={"q": "parsnip", "limit": 4, "offset": 4})
    assert len(rest.json()["results"]) == 2 and rest.json()["next_offset"] is None
    ids = [r["message"]["id"] for r in first["results"] + rest.json()["results"]]
    assert len(set(ids)) == 6


async def test_deleted_and_imported_rooms_are_kept_in_step(
    gateway: Gateway, http: httpx2.AsyncClient, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    await say(http, room["id"], "about kohlrabi", "kohlrabi is a cabbage", upstream)
    exported = (await http.get(f"/api/rooms/{room['id']}/export")).json()
    assert (await http.delete(f"/api/rooms/{room['id']}")).status_code == 204
    assert await found(http, "kohlrabi") == []
    copy = (await http.post("/api/rooms/import", json=exported)).json()
    results = (await http.get("/api/search", params={"q": "kohlrabi"})).json()["results"]
    assert {r["room"]["id"] for r in results} == {copy["id"]} and len(results) == 2


async def test_bad_queries_are_refused_with_a_code(
    gateway: Gateway, http: httpx2.AsyncClient
) -> None:
    for params in (
        {},
        {"q": "   "},
        {"q": "x" * 201},
        {"q": " ".join(f"w{i}" for i in range(11))},
        {"q": "ok", "limit": "0"},
        {"q": "ok", "limit": "101"},
        {"q": "ok", "offset": "-1"},
        {"q": "ok", "room": ""},
    ):
        response = await http.get("/api/search", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["code"] == "invalid_query", params
    unknown = await http.get("/api/search", params={"q": "ok", "room": "room_nonesuch"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "room_not_found"
    # Quotes, LIKE wildcards and FTS operators are words like any other.
    for q in ('"', "%", "_", "a OR b", "NEAR(x)", "*", "\\"):
        assert (await http.get("/api/search", params={"q": q})).json()["results"] == [], q


async def test_private_rooms_never_leak(start_gateway: Any, upstream: FakeUpstream) -> None:
    keys = ["alice=sk-alice-123456", "bob=sk-bob-654321", "eve=sk-eve-0000000"]
    gateway = start_gateway(api_keys=keys)
    alice, bob, eve = (
        {"authorization": f"Bearer {key.split('=')[1]}"} for key in keys
    )  # fmt: skip
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        body = {"name": "plans", "private": True, "grants": ["bob"]}
        private = (await http.post("/api/rooms", json=body, headers=alice)).json()
        public = (await http.post("/api/rooms", json={"name": "open"}, headers=alice)).json()
        await say(http, private["id"], "the surprise party", "shh", upstream, alice)
        await say(http, public["id"], "a party for all", "yay", upstream, alice)

        async def rooms_found(headers: dict[str, str]) -> set[str]:
            response = await http.get("/api/search", params={"q": "party"}, headers=headers)
            return {r["room"]["id"] for r in response.json()["results"]}

        assert await rooms_found(alice) == {private["id"], public["id"]}
        assert await rooms_found(bob) == {private["id"], public["id"]}
        assert await rooms_found(eve) == {public["id"]}
        refused = await http.get(
            "/api/search", params={"q": "party", "room": private["id"]}, headers=eve
        )
        assert refused.json()["error"]["code"] == "room_not_found"
        assert (await http.get("/api/search", params={"q": "party"})).status_code == 401


@pytest.mark.parametrize(
    ("content", "terms", "expected"),
    [
        ("plain text", ["text"], "plain <mark>text</mark>"),
        ("<i>x</i> & y", ["x"], "&lt;i&gt;<mark>x</mark>&lt;/i&gt; &amp; y"),
        ("a" * 300 + " needle " + "b" * 300, ["needle"], None),
        ("Needle needle", ["needle"], "<mark>Needle</mark> <mark>needle</mark>"),
        ("no match here", ["zzz"], "no match here"),
    ],
)  # fmt: skip
def test_snippets_cut_around_the_first_match_and_escape_the_text(
    content: str, terms: list[str], expected: str | None
) -> None:
    cut = snippet(content, terms)
    if expected is not None:
        assert cut == expected
    else:
        assert cut.startswith("…") and cut.endswith("…") and "<mark>needle</mark>" in cut
        assert len(cut) < 200
