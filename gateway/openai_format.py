"""The OpenAI Chat Completions wire format, for rooms reached as models (``/v1``).

Pure, like :mod:`gateway.protocol`: parses a request body into what the room needs (the
room, the last user message, the per-answer settings) and encodes the room's events
as OpenAI's objects — ``chat.completion``, ``chat.completion.chunk`` events ending in
``data: [DONE]``, the model list, and errors in OpenAI's shape, so that the official
SDKs raise their usual exception classes.

What a request's fields mean here (docs/protocol.md, "OpenAI-compatible API"):

* ``model`` is ``room:<id>``: the room answers, with its persona and its history as
  the context. Only the request's **last message** is used (it must be the user's):
  it is posted into the room like any member's; earlier messages of the request are
  ignored, since the room already holds the conversation.
* ``temperature`` applies to this answer; ``max_tokens`` (or
  ``max_completion_tokens``) lowers the room's limit for it, never raises it.
* ``n`` above 1 and tools are refused (one answer per message; no tool calls).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import BadRequest, GatewayError, NotFound
from gateway.protocol import parse_json

ROOM_MODEL_PREFIX = "room:"

Frame = dict[str, Any]


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[_TextPart] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    # Clients send many fields this gateway has no use for (top_p, seed, ...):
    # ignored rather than refused, as other compatible servers do.
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: Annotated[list[_Message], Field(min_length=1)]
    stream: bool = False
    stream_options: _StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=64)] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class ChatRequest(BaseModel):
    """What a ``POST /v1/chat/completions`` asks of a room."""

    room_id: str
    content: str
    stream: bool
    include_usage: bool
    temperature: float | None
    max_tokens: int | None
    user: str | None


def room_id_of(model: str) -> str:
    """The room a ``room:<id>`` model names; ``model_not_found`` for anything else."""
    if not model.startswith(ROOM_MODEL_PREFIX) or len(model) == len(ROOM_MODEL_PREFIX):
        raise NotFound(
            f"the model {model[:100]!r} does not exist: rooms are models named 'room:<id>'",
            code="model_not_found",
        )
    return model[len(ROOM_MODEL_PREFIX) :]


def parse_request(raw: bytes) -> ChatRequest:
    """A chat-completion request body, checked; :class:`BadRequest` with a code that
    says what is wrong (``invalid_json``, ``invalid_body``, ``unsupported_parameter``,
    ``invalid_messages``), or ``model_not_found``."""
    data = parse_json(raw)  # no U+0000: nothing stores it
    try:
        body = _Request.model_validate(data)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise BadRequest(detail, code="invalid_body") from None
    room_id = room_id_of(body.model)
    if body.n not in (None, 1):
        raise BadRequest("n must be 1: a room gives one answer", code="unsupported_parameter")
    if body.tools or body.functions:
        raise BadRequest("tools are not supported by rooms", code="unsupported_parameter")
    last = body.messages[-1]
    if last.role != "user":
        raise BadRequest(
            "the last message must be the user's: it is what is posted into the room",
            code="invalid_messages",
        )
    limits = [n for n in (body.max_tokens, body.max_completion_tokens) if n is not None]
    return ChatRequest(
        room_id=room_id,
        content=_text_of(last.content),
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        temperature=body.temperature,
        max_tokens=min(limits) if limits else None,
        user=body.user,
    )


def _text_of(content: str | list[_TextPart] | None) -> str:
    if isinstance(content, str):
        return content
    if not content:
        raise BadRequest("the last message has no content", code="invalid_messages")
    if any(part.type != "text" or part.text is None for part in content):
        raise BadRequest(
            "only text content parts are supported by rooms", code="unsupported_content"
        )
    return "\n".join(part.text for part in content if part.text is not None)


# --- responses -----------------------------------------------------------------------

FinishReason = Literal["stop", "length", "content_filter", "cancelled"]


def finish_reason_of(answer: Frame) -> FinishReason:
    """How an ended answer (a message view) finished, as OpenAI says it; ``cancelled``
    (not one of OpenAI's) when a member of the room stopped it: the text is partial."""
    status = answer["status"]
    if status == "cancelled":
        return "cancelled"
    if status == "blocked":
        return "content_filter"
    return "length" if answer.get("finish_reason") == "length" else "stop"


def usage_of(answer: Frame) -> Frame | None:
    usage = answer.get("usage")
    if not usage:
        return None
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def completion(completion_id: str, model: str, created: int, answer: Frame) -> Frame:
    """A ``chat.completion``: the room's whole answer."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer["content"]},
                "finish_reason": finish_reason_of(answer),
                "logprobs": None,
            }
        ],
        "usage": usage_of(answer)
        or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def chunk(
    completion_id: str,
    model: str,
    created: int,
    delta: Frame,
    finish_reason: str | None = None,
) -> bytes:
    """One ``chat.completion.chunk`` event."""
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def usage_chunk(completion_id: str, model: str, created: int, usage: Frame) -> bytes:
    """The last chunk of a stream that asked for ``stream_options.include_usage``."""
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


DONE = b"data: [DONE]\n\n"

_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(exc: GatewayError) -> Frame:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers."""
    return error_body_of(exc.to_dict(), exc.status)


def error_body_of(error: Frame, status: int) -> Frame:
    """An error (``{"code", "message"}``, as stored with an answer) in OpenAI's shape."""
    return {
        "error": {
            "message": error.get("message") or "the answer failed",
            "type": error_type(status),
            "param": None,
            "code": error.get("code"),
        }
    }


def error_event(error: Frame, status: int) -> bytes:
    """An error in the middle of a stream: the SDKs raise it as an API error."""
    return b"data: " + orjson.dumps(error_body_of(error, status)) + b"\n\n"


def model_entry(room: Frame) -> Frame:
    """A room (its view) as a ``model`` of ``GET /v1/models``."""
    created = datetime.fromisoformat(room["created_at"].replace("Z", "+00:00"))
    return {
        "id": f"{ROOM_MODEL_PREFIX}{room['id']}",
        "object": "model",
        "created": int(created.timestamp()),
        "owned_by": room["owner"] or "chat-gateway",
        "name": room["name"],
    }
