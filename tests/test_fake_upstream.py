"""The fake OpenAI upstream, exercised with the real ``openai`` SDK over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import openai
import orjson
import pytest

from gateway.testing.fake_upstream import (
    FakeUpstream,
    FakeUpstreamServer,
    RecordedRequest,
    Scenario,
    parse_directive,
)

MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer() as srv:
        yield srv


@pytest.fixture
def upstream(server: FakeUpstreamServer) -> Iterator[FakeUpstream]:
    server.upstream.reset()
    yield server.upstream
    server.upstream.reset()


@pytest.fixture
async def client(
    server: FakeUpstreamServer, upstream: FakeUpstream
) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=server.base_url, api_key="test", max_retries=0, timeout=10
    ) as c:
        yield c


@pytest.fixture
async def raw(
    server: FakeUpstreamServer, upstream: FakeUpstream
) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=server.base_url, timeout=10) as c:
        yield c


async def collect(stream: openai.AsyncStream[Any]) -> list[Any]:
    chunks = []
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
    return chunks


def content_of(chunks: list[Any]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- streaming


async def test_stream_yields_scripted_tokens_then_stop_and_usage(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["Hello", ", ", 'wörld "quoted"\n', "!"]))
    stream = await client.chat.completions.create(
        model="my-model",
        messages=[{"role": "system", "content": "be brief"}, *MESSAGES],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = await collect(stream)

    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert content_of(chunks) == ["Hello", ", ", 'wörld "quoted"\n', "!"]
    assert finish_reasons(chunks) == ["stop"]
    assert all(c.model == "my-model" and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-fake")

    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 4
    assert usage_chunk.usage.prompt_tokens == 4  # "be brief" + "hello there"
    assert usage_chunk.usage.total_tokens == 8

    [rec] = upstream.wait_for_requests(1)
    upstream.wait_until(lambda: rec.completed_at is not None)
    assert rec.body["model"] == "my-model"
    assert rec.headers["authorization"] == "Bearer test"
    assert rec.tokens_sent == 4
    assert rec.outcome == "completed"
    assert rec.disconnected_at is None
    assert len(rec.token_times) == 4
    assert rec.token_times == sorted(rec.token_times)
    assert rec.first_token_at == rec.token_times[0]
    assert rec.last_token_at == rec.token_times[-1]
    assert rec.started_at <= rec.first_token_at <= rec.completed_at


async def test_default_scenario_tokens_and_no_usage_unless_requested(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    chunks = await collect(
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    )
    assert content_of(chunks) == [f"tok{i} " for i in range(8)]
    assert all(c.usage is None for c in chunks)
    assert finish_reasons(chunks) == ["stop"]


async def test_scenario_usage_false_suppresses_usage_chunk(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=2, usage=False))
    chunks = await collect(
        await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert content_of(chunks) == ["tok0 ", "tok1 "]
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("limit_key", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_stream_with_length(
    client: openai.AsyncOpenAI, upstream: FakeUpstream, limit_key: str
) -> None:
    upstream.script(Scenario(count=10))
    kwargs: dict[str, Any] = {limit_key: 3}
    chunks = await collect(
        await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            **kwargs,
        )
    )
    assert content_of(chunks) == ["tok0 ", "tok1 ", "tok2 "]
    assert finish_reasons(chunks) == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_raw_sse_wire_format(raw: httpx2.AsyncClient, upstream: FakeUpstream) -> None:
    upstream.script(Scenario(count=2))
    async with raw.stream(
        "POST",
        "/chat/completions",
        headers={"Authorization": "Bearer x"},
        json={"model": "m", "messages": MESSAGES, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        text = (await response.aread()).decode()
    events = text.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    payloads = [orjson.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") for e in events[:-2])
    assert [p["choices"][0]["delta"] for p in payloads] == [
        {"role": "assistant", "content": ""},
        {"content": "tok0 "},
        {"content": "tok1 "},
        {},
    ]
    assert payloads[1] == {
        "id": payloads[0]["id"],
        "object": "chat.completion.chunk",
        "created": payloads[0]["created"],
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "tok0 "}, "finish_reason": None}],
    }


async def test_delays_are_respected_and_token_times_recorded(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=5, delay=0.03, first_delay=0.1))
    started = time.monotonic()
    chunks = await collect(
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    )
    assert len(content_of(chunks)) == 5
    [rec] = upstream.requests
    assert rec.first_token_at is not None
    assert rec.first_token_at - started >= 0.1
    gaps = [b - a for a, b in zip(rec.token_times, rec.token_times[1:], strict=False)]
    assert len(gaps) == 4
    assert all(gap >= 0.02 for gap in gaps), gaps
    # Absolute deadlines: the whole stream does not drift much past 0.1 + 4 * 0.03.
    assert rec.token_times[-1] - rec.token_times[0] == pytest.approx(0.12, abs=0.06)


# --------------------------------------------------------------------------- scenario selection


async def test_directive_in_last_user_message(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    messages = [
        {"role": "user", "content": "[[fake count=1]] (older message, ignored)"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "now [[fake tokens=a|b|c usage=0]] please"},
    ]
    chunks = await collect(
        await client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert content_of(chunks) == ["a", "b", "c"]
    assert all(c.usage is None for c in chunks)
    [rec] = upstream.requests
    assert rec.scenario == Scenario(tokens=["a", "b", "c"], usage=False)


async def test_directive_in_content_parts(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "hi [[fake count=2]]"}]}
    ]
    chunks = await collect(
        await client.chat.completions.create(model="m", messages=messages, stream=True)
    )
    assert content_of(chunks) == ["tok0 ", "tok1 "]


async def test_script_wins_over_directive_then_directive_then_default(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(tokens=["scripted"]))
    results = []
    for _ in range(2):
        chunks = await collect(
            await client.chat.completions.create(
                model="m", messages=user("[[fake tokens=directed]]"), stream=True
            )
        )
        results.append(content_of(chunks))
    chunks = await collect(
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    )
    results.append(content_of(chunks))
    assert results == [["scripted"], ["directed"], [f"tok{i} " for i in range(8)]]


def test_parse_directive_keys_defaults_and_quoting() -> None:
    default = Scenario(count=3, tokens=["x"], delay=0.5, usage=False)
    assert parse_directive("no directive here", default) is None
    assert parse_directive("[[fake]]", default) == default
    parsed = parse_directive(
        "[[fake count=50 delay=0.02 first_delay=0.1 fault=hang fault_after=3 usage=1]]", default
    )
    assert parsed == Scenario(
        count=50,
        tokens=None,  # an explicit count drops the default's tokens
        delay=0.02,
        first_delay=0.1,
        fault="hang",
        fault_after=3,
        usage=True,
    )
    assert parse_directive('x [[fake tokens="Hello |big world" fault=none]] y', default) == (
        Scenario(count=3, tokens=["Hello ", "big world"], delay=0.5, usage=False)
    )


async def test_bad_directive_is_a_400(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    for text in ("[[fake colour=red]]", "[[fake count=many]]", "[[fake fault=explode]]"):
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=user(text), stream=True)
    assert upstream.requests == []


# --------------------------------------------------------------------------- faults


async def test_500_raises_internal_server_error(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(fault="500"))
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert info.value.status_code == 500
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "server_error"
    [rec] = upstream.requests
    assert rec.outcome == "error" and rec.tokens_sent == 0


async def test_429_raises_rate_limit_error(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(
            model="m", messages=user("[[fake fault=429]]"), stream=True
        )
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "0"
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "rate_limit_exceeded"


async def test_truncate_ends_without_finish_reason(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=8, fault="truncate", fault_after=3))
    chunks = await collect(
        await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    assert content_of(chunks) == ["tok0 ", "tok1 ", "tok2 "]
    assert finish_reasons(chunks) == []
    assert all(c.usage is None for c in chunks)
    [rec] = upstream.requests
    upstream.wait_until(lambda: rec.outcome is not None)
    assert rec.outcome == "truncated"
    assert rec.tokens_sent == 3
    assert rec.completed_at is None and rec.disconnected_at is None


async def test_garbage_makes_the_sdk_raise(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(fault="garbage", fault_after=2))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    received: list[Any] = []
    with pytest.raises(Exception):  # noqa: B017 - the SDK raises a JSON decode error
        async with stream:
            async for chunk in stream:
                received.append(chunk)
    assert content_of(received) == ["tok0 ", "tok1 "]
    assert upstream.requests[0].outcome == "garbage"


async def test_hang_then_close_records_disconnect_promptly(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=10, fault="hang", fault_after=3))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    received = []
    async for chunk in stream:
        received.append(chunk)
        if len(content_of(received)) == 3:
            break
    [rec] = upstream.requests
    await asyncio.sleep(0.05)  # the fake is now hanging
    assert rec.disconnected_at is None and rec.outcome is None

    closed_at = time.monotonic()
    await stream.close()
    upstream.wait_until(lambda: rec.disconnected_at is not None, timeout=2)
    assert rec.disconnected_at is not None
    assert rec.disconnected_at - closed_at < 0.5
    assert rec.tokens_sent == 3
    assert rec.outcome == "disconnected"
    assert rec.completed_at is None


async def test_long_delay_stream_closed_early_stops_sending(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=100, delay=0.05))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    received = []
    async for chunk in stream:
        received.append(chunk)
        if len(content_of(received)) == 2:
            break
    closed_at = time.monotonic()
    await stream.close()

    [rec] = upstream.requests
    upstream.wait_until(lambda: rec.disconnected_at is not None, timeout=2)
    assert rec.disconnected_at is not None
    assert rec.disconnected_at - closed_at < 0.5
    sent = rec.tokens_sent
    assert 2 <= sent <= 4
    await asyncio.sleep(0.2)  # four more token slots: nothing more is sent
    assert rec.tokens_sent == sent
    assert len(rec.token_times) == sent
    assert rec.outcome == "disconnected" and rec.completed_at is None


async def test_disconnect_during_first_delay(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(Scenario(count=3, first_delay=30))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    [rec] = upstream.wait_for_requests(1)
    await stream.close()
    upstream.wait_until(lambda: rec.disconnected_at is not None, timeout=2)
    assert rec.tokens_sent == 0 and rec.first_token_at is None


# --------------------------------------------------------------------------- other endpoints


async def test_non_streaming_completion(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    upstream.script(Scenario(count=3))
    completion = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.model == "m"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "tok0 tok1 tok2 "
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 3)
    [rec] = upstream.requests
    assert rec.outcome == "completed" and rec.tokens_sent == 3


async def test_non_streaming_max_tokens(client: openai.AsyncOpenAI, upstream: FakeUpstream) -> None:
    completion = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    assert completion.choices[0].message.content == "tok0 tok1 "
    assert completion.choices[0].finish_reason == "length"


async def test_models_list(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [(m.id, m.owned_by) for m in models.data] == [("fake-model", "fake")]


async def test_missing_auth_is_401(raw: httpx2.AsyncClient, upstream: FakeUpstream) -> None:
    response = await raw.post("/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


async def test_unknown_path_is_404(raw: httpx2.AsyncClient) -> None:
    response = await raw.get("/nope", headers={"Authorization": "Bearer x"})
    assert response.status_code == 404
    assert "error" in response.json()


# --------------------------------------------------------------------------- helpers


def test_wait_helpers_time_out(upstream: FakeUpstream) -> None:
    with pytest.raises(TimeoutError):
        upstream.wait_for_requests(1, timeout=0.05)
    with pytest.raises(TimeoutError):
        upstream.wait_until(lambda: False, timeout=0.05)


async def test_wait_for_requests_sees_concurrent_requests(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    upstream.script(*(Scenario(count=2, delay=0.01) for _ in range(5)))

    async def one() -> list[str]:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        return content_of(await collect(stream))

    results = await asyncio.gather(*(one() for _ in range(5)))
    assert results == [["tok0 ", "tok1 "]] * 5
    recs: list[RecordedRequest] = upstream.wait_for_requests(5)
    assert len(recs) == 5
    upstream.wait_until(lambda: all(r.completed_at is not None for r in recs))


def test_reset_clears_script_and_requests() -> None:
    fake = FakeUpstream(Scenario(count=1))
    fake.script(Scenario(count=5))
    fake.reset()
    assert fake.requests == []
    assert fake.default == Scenario(count=1)


def test_scenario_rejects_unknown_fault() -> None:
    with pytest.raises(ValueError):
        Scenario(fault="boom")
