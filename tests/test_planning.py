"""plan(): from a room's persona, the history and the defaults to the completion
request and the new answer; literal inputs, no I/O."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.planning import Defaults, plan
from gateway.store.models import Message, Room

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
DEFAULTS = Defaults(
    model="default-model",
    temperature=0.7,
    max_tokens=100,
    context_tokens=1000,
    max_history_messages=50,
)


def room(**persona: object) -> Room:
    return Room(id="room_1", name="r", system_prompt=persona.pop("system_prompt", ""), **persona)


def message(id: str, role: str, content: str, parent_id: str | None = None) -> Message:
    return Message(id=id, room_id="room_1", role=role, content=content, parent_id=parent_id)


HISTORY = [
    message("m1", "user", "Hi"),
    message("m2", "assistant", "Hello!", "m1"),
    message("m3", "user", "Tell me a joke", "m2"),
]


def test_the_defaults_fill_what_the_persona_leaves_unset() -> None:
    planned = plan(room(), HISTORY, DEFAULTS, generation_id="gen_1", message_id="msg_4", now=NOW)

    request = planned.request
    assert (request.model, request.temperature, request.max_tokens) == ("default-model", 0.7, 100)
    assert request.messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me a joke"},
    ]


def test_the_persona_wins_over_the_defaults_and_its_prompt_comes_first() -> None:
    persona = room(system_prompt="Talk like a pirate.", model="m", temperature=1.1, max_tokens=5)

    planned = plan(persona, HISTORY, DEFAULTS, generation_id="g", message_id="a", now=NOW)

    request = planned.request
    assert (request.model, request.temperature, request.max_tokens) == ("m", 1.1, 5)
    assert request.messages[0] == {"role": "system", "content": "Talk like a pirate."}


def test_a_temperature_asked_for_wins_over_the_persona() -> None:
    planned = plan(
        room(temperature=1.1),
        HISTORY,
        DEFAULTS,
        generation_id="g",
        message_id="a",
        now=NOW,
        temperature=0.0,
    )

    assert planned.request.temperature == 0.0
    assert planned.answer.params is not None and planned.answer.params["temperature"] == 0.0


def test_the_answer_streams_under_the_last_message_and_records_its_persona() -> None:
    planned = plan(
        room(system_prompt="Be brief.", context_tokens=2000),
        HISTORY,
        DEFAULTS,
        generation_id="gen_1",
        message_id="msg_4",
        now=NOW,
    )

    answer = planned.answer
    assert (answer.id, answer.room_id, answer.parent_id) == ("msg_4", "room_1", "m3")
    assert (answer.role, answer.status, answer.content) == ("assistant", "streaming", "")
    assert (answer.generation_id, answer.created_at, answer.updated_at) == ("gen_1", NOW, NOW)
    assert answer.params == {
        "model": "default-model",
        "temperature": 0.7,
        "max_tokens": 100,
        "context_tokens": 2000,
        "system_prompt": "Be brief.",
    }


def test_the_oldest_turns_are_left_out_beyond_the_budget() -> None:
    turns = [message(f"m{i}", "assistant" if i % 2 else "user", f"{i}" * 400) for i in range(9)]
    tight = Defaults("m", 0.7, max_tokens=100, context_tokens=400, max_history_messages=50)

    planned = plan(room(), turns, tight, generation_id="g", message_id="a", now=NOW)

    # 300 tokens for the prompt, 104 a turn: m7 and m8 fit; a user turn must come first.
    assert planned.request.messages == [{"role": "user", "content": "8" * 400}]


def test_at_most_max_history_messages_turns_are_sent() -> None:
    few = Defaults("m", 0.7, max_tokens=100, context_tokens=1000, max_history_messages=1)

    planned = plan(room(), HISTORY, few, generation_id="g", message_id="a", now=NOW)

    assert planned.request.messages == [{"role": "user", "content": "Tell me a joke"}]
