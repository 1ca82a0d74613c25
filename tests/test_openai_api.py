"""Rooms as OpenAI models (``/v1``), with the official ``openai`` SDK as the client (and
curl): the request's last user message goes into the room, whose members see it and
the answer live, and the answer comes back in OpenAI's format; errors raise the SDK's
usual exception classes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import Gateway, create_room, get_messages, scaled

ALICE_KEY = "sk-alice-123456"
KEYS = [f"alice={ALICE_KEY}", "bob=sk-bob-654321"]


def sdk(gateway: Gateway, key: str = "unused", **options: Any) -> AsyncOpenAI:
    """The SDK pointed at the gateway; no retries, so a refusal is seen as it is."""
    return AsyncOpenAI(
        base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=scaled(10), **options
    )


async def test_a_streamed_completion_is_posted_into_the_room_and_watched_live(
    gateway: Gateway, room: dict, connect: Any, upstream: FakeUpstream
) -> None:
    member = await connect(room["id"], query="?name=Watcher")
    upstream.script(Scenario(tokens=["Hel", "lo", "!"], delay=0.02))
    client = sdk(gateway, default_query={"name": "Script"})

    stream = await client.chat.completions.create(
        model=f"room:{room['id']}",
        messages=[
            {"role": "system", "content": "ignored: the room's persona rules"},
            {"role": "user", "content": "an earlier turn"},
            {"role": "assistant", "content": "an earlier answer"},
            {"role": "user", "content": "hi room"},
        ],
        stream=True,
        stream_options={"include_usage": True},
        user="script-1",
    )
    chunks = [chunk async for chunk in stream]
    await client.close()

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello!"
    assert chunks[0].choices[0].delta.role == "assistant"
    ends = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert ends == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].model == f"room:{room['id']}"
    assert chunks[0].object == "chat.completion.chunk"

    seen = await member.until("message")
    assert seen["message"]["content"] == "hi room"
    assert seen["message"]["author"] == {"id": "script-1", "name": "Script", "kind": "user"}
    done = await member.until("done")
    assert done["message"]["content"] == "Hello!"
    # The room's history is the context: only the last message was posted.
    stored = await get_messages(gateway, room["id"])
    assert [m["content"] for m in stored] == ["hi room", "Hello!"]
    sent = upstream.requests[-1].body["messages"]
    assert sent == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hi room"},
    ]


async def test_a_whole_completion_with_the_requests_temperature_and_lower_max_tokens(
    gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway, max_tokens=500)
    upstream.script(Scenario(tokens=["one ", "two"]), Scenario(tokens=["three"]))
    async with sdk(gateway) as client:
        answer = await client.chat.completions.create(
            model=f"room:{room['id']}",
            messages=[{"role": "user", "content": [{"type": "text", "text": "count"}]}],
            temperature=0.25,
            max_tokens=64,
        )
        assert answer.object == "chat.completion"
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == "one two"
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None and answer.usage.completion_tokens == 2
        asked = upstream.requests[-1].body
        assert asked["temperature"] == 0.25 and asked["max_tokens"] == 64

        # A higher max_tokens than the room's does not raise it.
        raw = await client.chat.completions.with_raw_response.create(
            model=f"room:{room['id']}",
            messages=[{"role": "user", "content": "again"}],
            max_completion_tokens=100_000,
        )
        assert raw.status_code == 200
        assert raw.headers["content-type"].startswith("application/json")
        assert raw.parse().choices[0].message.content == "three"
        assert upstream.requests[-1].body["max_tokens"] == 500


async def test_the_models_are_the_rooms(gateway: Gateway) -> None:
    first = await create_room(gateway)
    second = await create_room(gateway)
    async with sdk(gateway) as client:
        models = [m async for m in client.models.list()]
        ids = [m.id for m in models]
        assert ids[:2] == [f"room:{second['id']}", f"room:{first['id']}"]  # last active first
        assert models[0].object == "model" and models[0].owned_by == "chat-gateway"
        one = await client.models.retrieve(f"room:{first['id']}")
        assert one.id == f"room:{first['id']}"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("room:nonesuch")


async def test_bad_requests_raise_the_sdks_errors_with_a_code(gateway: Gateway, room: dict) -> None:
    model = f"room:{room['id']}"
    hello = [{"role": "user", "content": "hi"}]
    async with sdk(gateway) as client:
        cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
            (openai.NotFoundError, "model_not_found", {"model": "gpt-4o", "messages": hello}),
            (openai.NotFoundError, "room_not_found", {"model": "room:nonesuch", "messages": hello}),
            (openai.BadRequestError, "unsupported_parameter",
             {"model": model, "messages": hello, "n": 2}),
            (
                openai.BadRequestError,
                "invalid_messages",
                {"model": model, "messages": [*hello, {"role": "assistant", "content": "x"}]},
            ),
            (
                openai.BadRequestError,
                "unsupported_content",
                {
                    "model": model,
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                        }
                    ],
                },
            ),
            (openai.BadRequestError, "invalid_body", {"model": model, "messages": []}),
            (openai.BadRequestError, "empty_message",
             {"model": model, "messages": [{"role": "user", "content": " "}]}),
        ]  # fmt: skip
        for error, code, request in cases:
            with pytest.raises(error) as raised:
                await client.chat.completions.create(**request)
            assert raised.value.code == code, (code, raised.value)
            body = raised.value.body
            assert isinstance(body, dict) and body["type"] and body["message"]
    # Nothing refused was stored.
    assert await get_messages(gateway, room["id"]) == []


async def test_a_busy_room_is_a_conflict_and_the_answer_still_reaches_the_first_caller(
    gateway: Gateway, room: dict, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["slow", " answer"], first_delay=0.5))
    model = f"room:{room['id']}"
    async with sdk(gateway) as client:
        first = asyncio.create_task(
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "1"}])
        )
        await asyncio.to_thread(upstream.wait_for_requests, 1)
        with pytest.raises(openai.ConflictError) as raised:
            await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "2"}]
            )
        assert raised.value.code == "busy"
        assert (await first).choices[0].message.content == "slow answer"


async def test_keys_rate_limits_and_private_rooms_apply(
    start_gateway: Any, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(api_keys=KEYS, rate_limit_messages="1/minute")
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        headers = {"authorization": f"Bearer {ALICE_KEY}"}
        private = await http.post(
            "/api/rooms", json={"name": "p", "private": True}, headers=headers
        )
        room_id = private.json()["id"]
    model = f"room:{room_id}"
    hello = [{"role": "user", "content": "hi"}]

    with pytest.raises(openai.AuthenticationError):
        async with sdk(gateway, "sk-wrong") as client:
            await client.chat.completions.create(model=model, messages=hello)
    async with sdk(gateway, "sk-bob-654321") as bob:
        with pytest.raises(openai.NotFoundError) as hidden:
            await bob.chat.completions.create(model=model, messages=hello)
        assert hidden.value.code == "room_not_found"
        assert [m.id async for m in bob.models.list()] == []
    async with sdk(gateway, ALICE_KEY) as alice:
        assert [m.id async for m in alice.models.list()] == [model]
        answer = await alice.chat.completions.create(model=model, messages=hello)
        assert answer.choices[0].message.content
        with pytest.raises(openai.RateLimitError) as limited:
            await alice.chat.completions.create(model=model, messages=hello)
        assert limited.value.code == "rate_limited"
        assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60


async def test_curl_streams_chunks_ending_in_done(
    gateway: Gateway, room: dict, upstream: FakeUpstream
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        # Debian has it by default and .ci/run's wheel step uses it; a minimal
        # container may not: the SDK tests above cover the same endpoint.
        pytest.skip("curl is not installed (apt-get install curl)")
    upstream.script(Scenario(tokens=["a", "b"]))
    body = orjson.dumps(
        {
            "model": f"room:{room['id']}",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [curl, "-sN", f"{gateway.url}/v1/chat/completions", "-H",
         "content-type: application/json", "-d", body.decode()],
        capture_output=True, text=True, timeout=scaled(20),
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line]
    assert all(line.startswith("data: ") for line in lines), result.stdout
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "ab"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_a_member_cancelling_ends_the_stream_as_cancelled_with_the_partial_text(
    gateway: Gateway, room: dict, connect: Any, upstream: FakeUpstream
) -> None:
    member = await connect(room["id"])
    upstream.script(Scenario(count=200, delay=0.02))
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model=f"room:{room['id']}", messages=[{"role": "user", "content": "go"}], stream=True
        )
        texts: list[str] = []
        ends: list[str] = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)
                if len(texts) == 3:
                    await member.send({"type": "cancel"})
            if chunk.choices and chunk.choices[0].finish_reason:
                ends.append(chunk.choices[0].finish_reason)
    assert ends == ["cancelled"]
    cancelled = await member.until("cancelled")
    assert cancelled["message"]["content"] == "".join(texts)


async def test_a_caller_that_leaves_mid_stream_leaves_the_answer_to_the_room(
    gateway: Gateway, room: dict, connect: Any, upstream: FakeUpstream
) -> None:
    member = await connect(room["id"])
    upstream.script(Scenario(count=20, delay=0.02))
    async with sdk(gateway) as client:
        stream = await client.chat.completions.create(
            model=f"room:{room['id']}", messages=[{"role": "user", "content": "go"}], stream=True
        )
        async for _ in stream:
            break
        await stream.close()
    done = await member.until("done")
    assert done["message"]["status"] == "complete"
    assert done["message"]["content"] == "".join(f"tok{i} " for i in range(20))
