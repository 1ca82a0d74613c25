"""Paged history: ``ready`` and ``branch`` frames carry the newest page of a branch, and
``GET /api/rooms/{id}/messages?limit=&before=`` pages it from the newest backwards, so
a long room costs the same to join whatever its length. Here a page is 4 messages
(``page_messages``); the prompt still gets the whole history it may use."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from gateway.testing.fake_upstream import FakeUpstream
from tests.conftest import Client, Gateway, create_room, scaled

PAGE = 4


async def chat(client: Client, *contents: str) -> None:
    """Send each of ``contents`` and wait for its answer."""
    for content in contents:
        await client.send({"type": "send", "content": content})
        await client.until("done")


async def pages_of(http: httpx2.AsyncClient, room_id: str, **query: Any) -> list[dict]:
    """Every page of the active branch, newest page first, by following ``before``."""
    pages = []
    params = dict(query)
    while True:
        response = await http.get(f"/api/rooms/{room_id}/messages", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        pages.append(page)
        if not page["earlier"]:
            return pages
        params["before"] = page["messages"][0]["id"]


@pytest.fixture
async def paged(start_gateway: Any) -> AsyncIterator[tuple[Gateway, httpx2.AsyncClient]]:
    """A gateway whose pages are ``PAGE`` messages, and an HTTP client of it."""
    gateway = start_gateway(page_messages=PAGE)
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        yield gateway, http


async def test_history_is_read_a_page_at_a_time_from_the_newest_back_to_the_first(
    paged: Any, connect: Any
) -> None:
    gateway, http = paged
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await chat(client, "one", "two", "three", "four", "five")  # 10 messages

    pages = await pages_of(http, room["id"])
    assert [len(p["messages"]) for p in pages] == [4, 4, 2]
    assert [p["earlier"] for p in pages] == [True, True, False]
    every = [m for page in reversed(pages) for m in page["messages"]]
    users = [m["content"] for m in every if m["role"] == "user"]
    assert users == ["one", "two", "three", "four", "five"]
    assert every[0]["parent_id"] is None
    assert all(m["parent_id"] == every[i]["id"] for i, m in enumerate(every[1:]))

    whole = (await http.get(f"/api/rooms/{room['id']}/messages?limit=1000")).json()
    assert whole == {"messages": every, "earlier": False}
    three = await pages_of(http, room["id"], limit=3)
    assert [len(p["messages"]) for p in three] == [3, 3, 3, 1]


async def test_bad_page_queries_are_refused_with_a_code(paged: Any, connect: Any) -> None:
    gateway, http = paged
    room = await create_room(gateway)
    url = f"/api/rooms/{room['id']}/messages"
    for query in ("limit=0", "limit=1001", "limit=x", "limit=-1", "before=", "before=a%01b"):
        response = await http.get(f"{url}?{query}")
        assert response.status_code == 400, query
        assert response.json()["error"]["code"] == "invalid_query", query
    response = await http.get(f"{url}?before=msg_nonesuch")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "message_not_found"
    empty = (await http.get(url)).json()
    assert empty == {"messages": [], "earlier": False}


async def test_ready_carries_the_newest_page_and_says_there_is_more(
    paged: Any, connect: Any
) -> None:
    gateway, http = paged
    room = await create_room(gateway)
    first = await connect(room["id"], gateway_=gateway)
    assert first.frames[0]["earlier"] is False
    await chat(first, "one", "two")
    short = await connect(room["id"], gateway_=gateway)  # 4 messages: all of them
    assert len(short.frames[0]["messages"]) == 4
    assert short.frames[0]["earlier"] is False
    await chat(first, "three")

    late = await connect(room["id"], gateway_=gateway)
    ready = late.frames[0]
    newest = (await http.get(f"/api/rooms/{room['id']}/messages")).json()
    assert ready["messages"] == newest["messages"]
    assert [m["content"] for m in ready["messages"] if m["role"] == "user"] == ["two", "three"]
    assert ready["earlier"] is True


async def test_a_new_branch_is_announced_by_its_newest_page(paged: Any, connect: Any) -> None:
    gateway, http = paged
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await chat(client, "one", "two", "three")
    answer = client.of_type("done")[-1]["message"]

    await client.send({"type": "regenerate", "message_id": answer["id"]})
    branch = await client.until("branch")
    assert len(branch["messages"]) == PAGE and branch["earlier"] is True
    assert branch["messages"][-1]["id"] == branch["active_leaf_id"]
    assert branch["messages"][-1]["siblings"][0] == answer["id"]
    await client.until("done")

    response = await http.post(f"/api/rooms/{room['id']}/messages/{answer['id']}/select")
    selected = response.json()
    assert selected["active_leaf_id"] == answer["id"]
    assert len(selected["messages"]) == PAGE and selected["earlier"] is True
    shown = await client.until("branch")
    assert shown["messages"] == selected["messages"] and shown["earlier"] is True


async def test_before_pages_the_branch_of_the_message_it_names(paged: Any, connect: Any) -> None:
    """A page above a message of another branch (one that was edited away) is of that
    branch: a reader scrolling up an old version never gets the active one's."""
    gateway, http = paged
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await chat(client, "one", "two", "three", "four")
    old = client.of_type("message")[-1]["message"]  # "four"
    await client.send({"type": "edit", "message_id": old["id"], "content": "FOUR"})
    await client.until("done")

    above_old = (await http.get(f"/api/rooms/{room['id']}/messages?before={old['id']}")).json()
    users = [m["content"] for m in above_old["messages"] if m["role"] == "user"]
    assert users == ["two", "three"]
    assert above_old["earlier"] is True
    active = (await http.get(f"/api/rooms/{room['id']}/messages")).json()
    assert active["messages"][-2]["content"] == "FOUR"


async def test_one_message_is_read_by_its_id_on_any_branch(paged: Any, connect: Any) -> None:
    gateway, http = paged
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await chat(client, "one")
    old = client.of_type("message")[-1]["message"]
    await client.send({"type": "edit", "message_id": old["id"], "content": "uno"})
    await client.until("done")

    response = await http.get(f"/api/rooms/{room['id']}/messages/{old['id']}")
    assert response.status_code == 200
    message = response.json()["message"]
    assert message["content"] == "one" and len(message["siblings"]) == 2
    missing = await http.get(f"/api/rooms/{room['id']}/messages/msg_nonesuch")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "message_not_found"
    other = await create_room(gateway)
    elsewhere = await http.get(f"/api/rooms/{other['id']}/messages/{old['id']}")
    assert elsewhere.json()["error"]["code"] == "message_not_found"


async def test_the_prompt_still_gets_the_history_beyond_the_page_after_a_restart(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(page_messages=PAGE)
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await chat(client, "one", "two", "three")
    await client.ws.close()
    gateway.stop()

    again = start_gateway(page_messages=PAGE)  # nothing cached: the branch is read
    client = await connect(room["id"], gateway_=again)
    assert len(client.frames[0]["messages"]) == PAGE
    await chat(client, "four")
    asked = [m["content"] for m in upstream.requests[-1].body["messages"] if m["role"] == "user"]
    assert asked == ["one", "two", "three", "four"]
