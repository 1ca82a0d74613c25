"""Rooms as OpenAI models: ``POST /v1/chat/completions`` with ``model: "room:<id>"``
and ``GET /v1/models``, for every client that speaks the Chat Completions API (the
``openai`` SDKs, LangChain, editors, curl).

A request posts its last user message into the room, as any member's message (the
room's members see it and the answer live), and gets the room's answer back in
OpenAI's format: streamed as ``chat.completion.chunk`` events ending in ``data:
[DONE]``, or whole as one ``chat.completion``. What the fields mean is in
:mod:`gateway.openai_format`. The answer belongs to the room: a client that
disconnects mid-stream stops reading, not the answer. Errors are in OpenAI's shape,
with the statuses the SDKs turn into their exception classes.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import openai_format
from gateway.chat import ChatService
from gateway.errors import Unavailable
from gateway.hub import Event, SlowConsumer, Subscriber, TokenRun
from gateway.people import identify
from gateway.protocol import Frame
from gateway.transports.guard import sender_of, viewer_of
from gateway.transports.http import JSON, read_body
from gateway.transports.sse import GenerationFilter, event_stream

# The status of an answer that failed, for a caller that waited for it whole: the
# upstream's failure is a bad gateway's; these are the gateway's own.
_ANSWER_ERROR_STATUS = {"interrupted": 503, "store_failed": 503}


def _answer_of(frame: Frame) -> Frame | None:
    """The answer (a message view) an ending frame carries, if any."""
    if frame["type"] in ("done", "cancelled"):
        return frame["message"]
    return frame.get("answer") if frame["type"] == "error" else None


class CompletionChunks:
    """The room's events for one answer as ``chat.completion.chunk`` events (an
    :class:`~gateway.transports.sse.StreamFormat`)."""

    def __init__(self, completion_id: str, model: str, include_usage: bool) -> None:
        self.id = completion_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _chunk(self, delta: Frame, finish_reason: str | None = None) -> bytes:
        return openai_format.chunk(self.id, self.model, self.created, delta, finish_reason)

    def opening(self, first: list[Frame]) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def event(self, event: Event | TokenRun) -> bytes:
        frame = event.frame
        kind = frame["type"]
        if kind == "token":
            return self._chunk({"content": frame["text"]})
        answer = _answer_of(frame)
        if answer is not None:
            if answer["status"] in ("error", "interrupted"):
                status = _ANSWER_ERROR_STATUS.get(frame.get("code", ""), 502)
                return openai_format.error_event(frame, status)
            end = self._chunk({}, openai_format.finish_reason_of(answer))
            usage = openai_format.usage_of(answer)
            if self.include_usage and usage is not None:
                end += openai_format.usage_chunk(self.id, self.model, self.created, usage)
            return end + openai_format.DONE
        return b""  # the user message, the branch: the room's, not this answer's

    def closing(self, frame: Frame) -> bytes:
        return openai_format.error_event(frame, _closing_status(frame))


async def chat_completions(request: Request) -> Response:
    """Post the request's last user message into the room and answer with the room's
    answer: streamed (``"stream": true``) or whole."""
    chat: ChatService = request.state.chat
    body = openai_format.parse_request(await read_body(request))
    viewer = viewer_of(request.scope)
    await chat.joining.authorize(body.room_id, viewer)  # 404 unless visible
    # The author, as for other clients: ?name= and ?user= (the SDKs' default_query),
    # the request's ``user`` (OpenAI's end-user id) when no ?user= is given.
    params: dict[str, str] = dict(request.query_params)
    if body.user is not None:
        params.setdefault("user", body.user)
    author = identify(viewer, params)
    subscriber = await chat.joining.watch(body.room_id, viewer)
    try:
        _, started = await chat.sending.send(
            body.room_id,
            body.content,
            None,
            sender_of(request.scope),
            author,
            temperature=body.temperature,
            max_tokens=body.max_tokens,
        )
    except BaseException:
        chat.joining.leave(subscriber)
        raise
    assert started is not None  # no client id: never a duplicate
    completion_id = f"chatcmpl-{started.generation_id}"
    model = f"{openai_format.ROOM_MODEL_PREFIX}{body.room_id}"
    only = GenerationFilter(started)
    if body.stream:
        chunks = CompletionChunks(completion_id, model, body.include_usage)
        return event_stream(chat, subscriber, only=only, event_format=chunks)
    created = int(time.time())
    try:
        end = await _end_of(subscriber, only)
    finally:
        chat.joining.leave(subscriber)
    return _completion_response(completion_id, model, created, end)


async def _end_of(subscriber: Subscriber, only: GenerationFilter) -> Frame:
    """The frame that ends the answer ``only`` follows (``done``, ``cancelled`` or
    ``error``), or the subscription's final frame (the server stopping...)."""
    try:
        while True:
            await subscriber.wait()
            for item in subscriber.take():
                if only(item.frame) and only.ended:
                    return item.frame
            if subscriber.closed_with is not None:
                return subscriber.closed_with
            if subscriber.drained:
                raise Unavailable("the gateway is stopping", code="server_restarting")
    except SlowConsumer:  # cannot happen while reading as frames come; said clearly
        raise Unavailable("the answer could not be followed", code="unavailable") from None


def _completion_response(completion_id: str, model: str, created: int, end: Frame) -> Response:
    answer = _answer_of(end)
    if answer is None:  # the subscription ended first
        status = _closing_status(end)
        return JSON(openai_format.error_body_of(end, status), status_code=status)
    if answer["status"] in ("error", "interrupted"):
        status = _ANSWER_ERROR_STATUS.get(end.get("code", ""), 502)
        return JSON(openai_format.error_body_of(end, status), status_code=status)
    return JSON(openai_format.completion(completion_id, model, created, answer))


def _closing_status(frame: Frame) -> int:
    """The status of a subscription ended before the answer: the server stopping
    (retry), or the room gone or shut to this caller."""
    return 503 if frame.get("retryable") else 404


async def list_models(request: Request) -> Response:
    """The rooms the caller may see, as ``room:<id>`` models (the last active first)."""
    rooms = await request.state.rooms.list(limit=1000, viewer=viewer_of(request.scope))
    return JSON({"object": "list", "data": [openai_format.model_entry(r) for r in rooms]})


async def get_model(request: Request) -> Response:
    room_id = openai_format.room_id_of(request.path_params["model"])
    room = await request.state.rooms.get(room_id, viewer_of(request.scope))
    return JSON(openai_format.model_entry(room))


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
]
