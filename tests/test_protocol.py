"""The wire protocol and prompt building, as pure functions (no servers)."""

from __future__ import annotations

import orjson
import pytest

from gateway import protocol
from gateway.errors import BadRequest, PayloadTooLarge
from gateway.hub import Event, SlowConsumer, Subscriber
from gateway.prompt import Turn, build_prompt, estimate_tokens


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"type":"send","content":"hi"}', protocol.Send(type="send", content="hi")),
        (
            '{"type":"send","content":"hi","id":"c1"}',
            protocol.Send(type="send", content="hi", id="c1"),
        ),
        ('{"type":"cancel"}', protocol.Cancel(type="cancel")),
        (
            '{"type":"cancel","generation_id":"gen_1"}',
            protocol.Cancel(type="cancel", generation_id="gen_1"),
        ),
        (
            '{"type":"regenerate","message_id":"m","temperature":0.9}',
            protocol.Regenerate(type="regenerate", message_id="m", temperature=0.9),
        ),
        (
            '{"type":"regenerate","message_id":"m","temperature":1}',
            protocol.Regenerate(type="regenerate", message_id="m", temperature=1.0),
        ),
        ('{"type":"select","message_id":"m"}', protocol.Select(type="select", message_id="m")),
        ('{"type":"ping"}', protocol.Ping(type="ping")),
    ],
)
def test_parses_every_client_frame(raw: str, expected: protocol.ClientFrame) -> None:
    assert protocol.parse_client_frame(raw, max_bytes=1024) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("", "invalid_json"),
        ("{", "invalid_json"),
        ('"send"', "invalid_frame"),
        ("{}", "unknown_type"),
        ('{"type":null}', "unknown_type"),
        ('{"type":"send","content":null}', "invalid_frame"),
        ('{"type":"send","content":"x","id":""}', "invalid_frame"),
        ('{"type":"regenerate","message_id":"m","temperature":-1}', "invalid_frame"),
        ('{"type":"regenerate","message_id":"m","temperature":true}', "invalid_frame"),
    ],
)
def test_rejects_bad_frames_with_stable_codes(raw: str, code: str) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_client_frame(raw, max_bytes=1024)
    assert caught.value.code == code


def test_frame_size_counts_utf8_bytes() -> None:
    frame = orjson.dumps({"type": "send", "content": "é" * 600}).decode()
    assert len(frame) < 1024 < len(frame.encode())
    with pytest.raises(PayloadTooLarge):
        protocol.parse_client_frame(frame, max_bytes=1024)


async def test_tokens_queued_for_a_busy_subscriber_are_coalesced() -> None:
    subscriber = Subscriber("room", limit=3)
    frames = [
        protocol.token_frame("g1", 1, "a"),
        protocol.token_frame("g1", 2, "b"),
        protocol.token_frame("g1", 3, "c"),
        {"type": "pong"},
        protocol.token_frame("g1", 4, "d"),
        protocol.token_frame("g2", 1, "x"),
    ]
    for frame in frames[:5]:
        subscriber.push(Event(frame))
    assert not subscriber.overflowed  # three tokens took one slot
    out = [orjson.loads(item.text) for item in await subscriber.next_batch()]
    assert out == [
        {"type": "token", "generation_id": "g1", "seq": 3, "seq_from": 1, "text": "abc"},
        {"type": "pong"},
        protocol.token_frame("g1", 4, "d"),
    ]
    for frame in [*frames[3:], {"type": "pong"}]:
        subscriber.push(Event(frame))
    assert subscriber.overflowed
    with pytest.raises(SlowConsumer):
        await subscriber.next_batch()


async def test_events_in_the_first_frame_are_not_sent_again_when_they_come_late() -> None:
    # Another process's pub/sub message can arrive after the snapshot that holds it.
    subscriber = Subscriber("room", limit=10, joining=True)
    held = {**protocol.token_frame("g", 1, "a"), "event_id": 11}
    subscriber.push(Event(held))
    subscriber.begin([], after=12)
    for seq, event_id in [(2, 12), (3, 13)]:
        subscriber.push(Event({**protocol.token_frame("g", seq, "b"), "event_id": event_id}))
    subscriber.push(Event({"type": "pong"}))  # no id: always sent
    out = [orjson.loads(item.text) for item in await subscriber.next_batch()]
    assert out == [{**protocol.token_frame("g", 3, "b"), "event_id": 13}, {"type": "pong"}]


def test_prompt_keeps_system_prompt_and_trims_oldest_turns_first() -> None:
    history = [Turn("user" if i % 2 == 0 else "assistant", f"turn {i} " * 40) for i in range(9)]
    per_turn = estimate_tokens(history[-1].content)
    three_turns = 300 + estimate_tokens("sys") + 3 * per_turn
    prompt = build_prompt("sys", history, context_tokens=three_turns, max_tokens=300)
    assert prompt[0] == {"role": "system", "content": "sys"}
    assert [m["content"] for m in prompt[1:]] == [t.content for t in history[-3:]]

    # With room for two turns the oldest kept would be an answer: the prompt starts
    # on a user turn instead.
    prompt = build_prompt("sys", history, context_tokens=three_turns - per_turn, max_tokens=300)
    assert prompt[1:] == [{"role": "user", "content": history[-1].content}]


def test_prompt_keeps_the_newest_turn_even_over_budget() -> None:
    prompt = build_prompt("", [Turn("user", "x" * 10_000)], context_tokens=300, max_tokens=200)
    assert prompt == [{"role": "user", "content": "x" * 10_000}]


def test_prompt_skips_empty_answers() -> None:
    history = [Turn("user", "q1"), Turn("assistant", ""), Turn("user", "q2")]
    prompt = build_prompt("", history, context_tokens=4096, max_tokens=100)
    assert [m["content"] for m in prompt] == ["q1", "q2"]
