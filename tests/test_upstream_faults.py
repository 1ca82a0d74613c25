"""Upstream failures end the generation with an error frame and a stored error message."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import create_room


@pytest.mark.parametrize(
    ("scenario", "code", "partial"),
    [
        (Scenario(fault="500"), "upstream_error", ""),
        (Scenario(fault="429"), "upstream_rate_limited", ""),
        (
            Scenario(count=5, fault="truncate", fault_after=3),
            "upstream_truncated",
            "tok0 tok1 tok2 ",
        ),
        (Scenario(count=5, fault="garbage", fault_after=2), "upstream_bad_response", "tok0 tok1 "),
    ],
    ids=["http-500", "http-429", "truncated-stream", "garbage-chunk"],
)
async def test_upstream_fault_ends_generation_with_error(
    connect: Any,
    room: dict,
    http: Any,
    upstream: FakeUpstream,
    scenario: Scenario,
    code: str,
    partial: str,
) -> None:
    upstream.script(scenario)
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "hello"})
    start = await client.until("start")
    error = await client.until("error")
    assert error["code"] == code
    assert error["generation_id"] == start["generation_id"]
    assert error["answer"]["status"] == "error"
    assert error["answer"]["content"] == partial
    assert error["answer"]["error"]["code"] == code

    stored = (await http.get(f"/api/rooms/{room['id']}/messages")).json()["messages"]
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "error"),
    ]
    assert stored[0]["content"] == "hello"
    assert stored[1]["content"] == partial

    # The room is usable again right away.
    await client.send({"type": "send", "content": "again"})
    assert (await client.until("done"))["message"]["status"] == "complete"


@pytest.mark.parametrize(
    ("timeout_setting", "fault_after", "partial"),
    [
        ("upstream_token_timeout", 2, "tok0 tok1 "),
        ("upstream_first_token_timeout", 0, ""),
    ],
    ids=["hang-mid-stream", "never-answers"],
)
async def test_upstream_that_goes_silent_times_out(
    start_gateway: Any,
    connect: Any,
    upstream: FakeUpstream,
    timeout_setting: str,
    fault_after: int,
    partial: str,
) -> None:
    gateway = start_gateway(**{timeout_setting: 0.3})
    upstream.script(Scenario(count=10, fault="hang", fault_after=fault_after))
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await client.send({"type": "send", "content": "hello"})
    error = await client.until("error")
    assert error["code"] == "upstream_timeout"
    assert error["answer"]["content"] == partial
    request = upstream.requests[-1]
    upstream.wait_until(lambda: request.disconnected_at is not None)


async def test_unreachable_upstream(start_gateway: Any, connect: Any) -> None:
    gateway = start_gateway(openai_base_url="http://127.0.0.1:9/v1", upstream_connect_timeout=1)
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await client.send({"type": "send", "content": "hello"})
    assert (await client.until("error"))["code"] == "upstream_unavailable"
