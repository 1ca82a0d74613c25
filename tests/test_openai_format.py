"""The OpenAI wire format, without sockets: what a request asks of a room, and how an
answer's end reads to an OpenAI client."""

from __future__ import annotations

import orjson
import pytest

from gateway.errors import BadRequest, GatewayError, NotFound
from gateway.openai_format import error_body, finish_reason_of, parse_request, usage_of


def body(**fields: object) -> bytes:
    return orjson.dumps(
        {"model": "room:r1", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_a_request_asks_the_room_its_last_user_message_with_its_settings() -> None:
    asked = parse_request(
        body(
            messages=[
                {"role": "system", "content": "s"},
                {"role": "user", "content": "old"},
                {"role": "assistant", "content": "x"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            stream=True,
            stream_options={"include_usage": True},
            temperature=0.2,
            max_tokens=500,
            max_completion_tokens=300,
            user="u1",
            top_p=0.5,  # ignored
        )
    )
    assert (asked.room_id, asked.content, asked.stream, asked.include_usage) == (
        "r1",
        "a\nb",
        True,
        True,
    )
    assert (asked.temperature, asked.max_tokens, asked.user) == (0.2, 300, "u1")


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{", "invalid_json"),
        (b'{"model": "room:r1"}', "invalid_body"),
        (body(temperature=3), "invalid_body"),
        (body(model="gpt-4o"), "model_not_found"),
        (body(model="room:"), "model_not_found"),
        (body(n=2), "unsupported_parameter"),
        (body(tools=[{"type": "function"}]), "unsupported_parameter"),
        (body(messages=[{"role": "assistant", "content": "x"}]), "invalid_messages"),
        (body(messages=[{"role": "user", "content": None}]), "invalid_messages"),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "unsupported_content",
        ),
        (
            body(messages=[{"role": "user", "content": "a\\u0000b"}]).replace(b"\\\\u", b"\\u"),
            "invalid_character",
        ),
    ],
)
def test_bad_requests_say_what_is_wrong(raw: bytes, code: str) -> None:
    with pytest.raises((BadRequest, NotFound)) as raised:
        parse_request(raw)
    assert raised.value.code == code


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"status": "complete", "finish_reason": "stop"}, "stop"),
        ({"status": "complete", "finish_reason": "length"}, "length"),
        ({"status": "cancelled", "finish_reason": None}, "cancelled"),
        ({"status": "blocked", "finish_reason": None}, "content_filter"),
    ],
)
def test_how_an_answer_ended(answer: dict, reason: str) -> None:
    assert finish_reason_of(answer) == reason


def test_usage_and_errors_in_openais_shape() -> None:
    assert usage_of({"usage": {"prompt_tokens": 3, "completion_tokens": 2}}) == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
    }  # fmt: skip
    assert usage_of({"usage": None}) is None
    error = GatewayError("slow down", code="rate_limited", status=429)
    assert error_body(error) == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limited",
        }
    }
