"""The REST API: rooms, their history, and chatting over plain HTTP.

``POST`` actions on messages answer ``202`` with ids, or, with
``Accept: text/event-stream``, stream the generation they started (see
:mod:`gateway.transports.sse`).

Errors are ``{"error": {"code": ..., "message": ...}}`` with a fitting status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.access import AccessControl, Client, Viewer
from gateway.chat import ChatService
from gateway.errors import (
    BadRequest,
    GatewayError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    internal_error,
)
from gateway.generations import Started
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import Metrics
from gateway.people import Person, identify
from gateway.protocol import (
    EditBody,
    HideBody,
    MessageCreate,
    RegenerateBody,
    RoomCreate,
    RoomUpdate,
    TypingBody,
    parse_body,
    parse_json,
)
from gateway.rooms import RoomService
from gateway.search import SearchService
from gateway.transports import error_body_for, sse
from gateway.transports.guard import sender_of, viewer_of
from gateway.transports.sse import GenerationFilter, event_stream

MAX_BODY_BYTES = 1024 * 1024
MAX_PAGE = 1000  # messages in one page of history


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: GatewayError, path: str) -> JSON:
    """``exc`` as a JSON response: the gateway's error body, or OpenAI's under ``/v1``."""
    response = JSON(error_body_for(path, exc), status_code=exc.status)
    if isinstance(exc, RateLimited):
        response.headers["retry-after"] = str(exc.retry_after)
    return response


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _rooms(request: Request) -> RoomService:
    return request.state.rooms


async def _room_chat(request: Request) -> ChatService:
    """The chat service, once the caller is known to be allowed into the room."""
    chat: ChatService = request.state.chat
    await chat.joining.authorize(request.path_params["room_id"], _viewer(request))
    return chat


def _viewer(request: Request) -> Viewer:
    return viewer_of(request.scope)


def _int_param(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from 0 to {high}", code="invalid_query")
    return int(raw)


def _id_param(request: Request, name: str) -> str | None:
    """An id given in the query string (never stored: only compared), checked as an id
    in a path is (:class:`gateway.transports.IdConvertor`)."""
    raw = request.query_params.get(name)
    if raw is not None and (not raw or len(raw) > 64 or any(ord(c) < 32 for c in raw)):
        raise BadRequest(f"{name} must be an id", code="invalid_query")
    return raw


async def list_rooms(request: Request) -> Response:
    limit = _int_param(request, "limit", 100, 1000)
    offset = _int_param(request, "offset", 0, 10**9)
    return JSON(
        {"rooms": await _rooms(request).list(limit=limit, offset=offset, viewer=_viewer(request))}
    )


async def create_room(request: Request) -> Response:
    body = parse_body(RoomCreate, await read_body(request))
    return JSON(await _rooms(request).create(body, _viewer(request)), status_code=201)


async def get_room(request: Request) -> Response:
    return JSON(await _rooms(request).get(request.path_params["room_id"], _viewer(request)))


async def update_room(request: Request) -> Response:
    body = parse_body(RoomUpdate, await read_body(request))
    return JSON(
        await _rooms(request).update(request.path_params["room_id"], body, _viewer(request))
    )


async def delete_room(request: Request) -> Response:
    await _rooms(request).delete(request.path_params["room_id"], _viewer(request))
    return Response(status_code=204)


def _include_hidden(request: Request) -> bool:
    """``?include_hidden=true``: the owner reads the content of hidden messages."""
    raw = request.query_params.get("include_hidden", "false")
    if raw not in ("true", "false"):
        raise BadRequest("include_hidden must be true or false", code="invalid_query")
    return raw == "true"


async def get_message(request: Request) -> Response:
    """One message of the room, on any branch (``?include_hidden=true``: the owner)."""
    room_id, message_id = request.path_params["room_id"], request.path_params["message_id"]
    message = await _rooms(request).message(
        room_id, message_id, _viewer(request), include_hidden=_include_hidden(request)
    )
    return JSON({"message": message})


async def list_messages(request: Request) -> Response:
    """A page of the active branch, newest last: ``?limit=`` messages (default
    ``GATEWAY_PAGE_MESSAGES``), ``?before=<message id>`` for the page above a message;
    ``?include_hidden=true`` (the owner only): with the content of hidden messages."""
    include_hidden = _include_hidden(request)
    chat: ChatService = request.state.chat
    limit = _int_param(request, "limit", chat.settings.page_messages, MAX_PAGE)
    if limit == 0:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_PAGE}", code="invalid_query")
    before = _id_param(request, "before")
    messages, earlier = await _rooms(request).messages(
        request.path_params["room_id"],
        _viewer(request),
        limit=limit,
        before=before,
        include_hidden=include_hidden,
    )
    return JSON({"messages": messages, "earlier": earlier})


async def export_room(request: Request) -> Response:
    """The whole room as a room file (JSON), or ``?format=markdown``: its active branch
    as Markdown."""
    room_id = request.path_params["room_id"]
    kind = request.query_params.get("format", "json")
    if kind not in ("json", "markdown"):
        raise BadRequest("format must be json or markdown", code="invalid_query")
    if kind == "markdown":
        text = await _rooms(request).export_markdown(room_id, _viewer(request))
        headers = {"content-disposition": f'attachment; filename="{room_id}.md"'}
        return Response(text, media_type="text/markdown; charset=utf-8", headers=headers)
    exported = await _rooms(request).export(room_id, _viewer(request))
    headers = {"content-disposition": f'attachment; filename="{room_id}.json"'}
    return JSON(exported, headers=headers)


async def import_room(request: Request) -> Response:
    """A new room from a room file (``GET .../export``): ``201`` with the room."""
    limit: int = request.state.chat.settings.import_max_bytes
    data = parse_json(await read_body(request, limit))
    return JSON(await _rooms(request).import_room(data, _viewer(request)), status_code=201)


async def search(request: Request) -> Response:
    """Messages holding every word of ``?q=``, best first, in the rooms the caller may
    see (``?room=``: one of them), ``?limit=`` (1-100, 20) from ``?offset=``."""
    service: SearchService = request.state.search
    limit = _int_param(request, "limit", 20, 100)
    if limit == 0:
        raise BadRequest("limit must be an integer from 1 to 100", code="invalid_query")
    found = await service.search(
        request.query_params.get("q", ""),
        _viewer(request),
        room_id=_id_param(request, "room"),
        limit=limit,
        offset=_int_param(request, "offset", 0, 10**6),
    )
    return JSON(found)


def wants_event_stream(request: Request) -> bool:
    return "text/event-stream" in request.headers.get("accept", "")


def _person(request: Request) -> Person:
    """Who is asking, from ``?name=`` and ``?user=`` (see :mod:`gateway.people`)."""
    return identify(_viewer(request), request.query_params)


async def post_message(request: Request) -> Response:
    """Store a user message and answer it: as an event stream of that one generation
    with ``Accept: text/event-stream``, else 202 with the ids."""
    chat = await _room_chat(request)
    room_id = request.path_params["room_id"]
    body = parse_body(MessageCreate, await read_body(request))
    author = _person(request)

    def send() -> Awaitable[tuple[dict[str, Any], Started | None]]:
        return chat.sending.send(room_id, body.content, body.id, sender_of(request.scope), author)

    return await _answered(request, chat, send)


async def edit_message(request: Request) -> Response:
    """Send a new version of a user message (a new branch) and answer it: streamed or
    202, as :func:`post_message`."""
    chat = await _room_chat(request)
    room_id, message_id = request.path_params["room_id"], request.path_params["message_id"]
    body = parse_body(EditBody, await read_body(request))
    author = _person(request)

    def edit() -> Awaitable[tuple[dict[str, Any], Started | None]]:
        return chat.sending.edit(
            room_id,
            message_id,
            body.content,
            author=author,
            viewer=_viewer(request),
            client_id=body.id,
            sender=sender_of(request.scope),
        )

    return await _answered(request, chat, edit)


async def _answered(
    request: Request,
    chat: ChatService,
    store: Callable[[], Awaitable[tuple[dict[str, Any], Started | None]]],
) -> Response:
    """Run ``store`` (a send or an edit: a user message and the generation answering
    it) and answer: the generation as an event stream with ``Accept:
    text/event-stream``, else 202 with the ids; 200 for a retry (nothing new)."""
    if not wants_event_stream(request):
        message, started = await store()
        if started is None:
            return JSON({"message": message, "duplicate": True})
        return JSON({"message": message, **asdict(started)}, status_code=202)
    # Subscribe first: the message and the answer's first tokens are published while
    # it is stored.
    room_id = request.path_params["room_id"]
    subscriber = await chat.joining.watch(room_id, _viewer(request))
    try:
        message, started = await store()
    except BaseException:
        chat.joining.leave(subscriber)
        raise
    if started is None:
        chat.joining.leave(subscriber)
        return JSON({"message": message, "duplicate": True})
    only = GenerationFilter(started, message["id"])
    return event_stream(chat, subscriber, only=only)


async def hide_message(request: Request) -> Response:
    """The room owner hides a message from the room (``{"hidden": false}``: shows it)."""
    room_id, message_id = request.path_params["room_id"], request.path_params["message_id"]
    body = parse_body(HideBody, await read_body(request), optional=True)
    chat = await _room_chat(request)
    message = await chat.sending.hide(room_id, message_id, body.hidden, _viewer(request))
    return JSON({"message": message})


async def typing(request: Request) -> Response:
    """The caller is typing (``{"active": false}``: stopped); for clients without a
    WebSocket. Announced to the room as over one (throttled, never stored)."""
    body = parse_body(TypingBody, await read_body(request), optional=True)
    chat = await _room_chat(request)
    chat.presence.typing(request.path_params["room_id"], _person(request), body.active)
    return Response(status_code=204)


async def info(request: Request) -> Response:
    """What a client needs to know of this gateway: the model that answers when a
    room names none, and whether API keys are in use."""
    chat: ChatService = request.state.chat
    access: AccessControl = request.state.access
    return JSON({"default_model": chat.sending.defaults.model, "access": access.enabled})


async def regenerate(request: Request) -> Response:
    """Answer the user message before ``message_id`` again; streamed or 202."""
    chat = await _room_chat(request)
    room_id, message_id = request.path_params["room_id"], request.path_params["message_id"]
    body = parse_body(RegenerateBody, await read_body(request), optional=True)
    subscriber = (
        await chat.joining.watch(room_id, _viewer(request)) if wants_event_stream(request) else None
    )
    try:
        started = await chat.sending.regenerate(
            room_id, message_id, body.temperature, sender_of(request.scope)
        )
    except BaseException:
        if subscriber is not None:
            chat.joining.leave(subscriber)
        raise
    if subscriber is None:
        return JSON(asdict(started), status_code=202)
    return event_stream(chat, subscriber, only=GenerationFilter(started))


async def cancel(request: Request) -> Response:
    """Stop a running generation; its partial answer is stored as ``cancelled``."""
    room_id, generation_id = request.path_params["room_id"], request.path_params["generation_id"]
    await (await _room_chat(request)).sending.cancel(room_id, generation_id)
    return JSON({"generation_id": generation_id, "status": "cancelling"}, status_code=202)


async def select(request: Request) -> Response:
    """Make the branch through ``message_id`` (down to its newest leaf) active."""
    room_id, message_id = request.path_params["room_id"], request.path_params["message_id"]
    shown = await (await _room_chat(request)).sending.select(room_id, message_id)
    leaf = shown.views[-1]["id"] if shown.views else None
    return JSON({"active_leaf_id": leaf, "messages": shown.views, "earlier": shown.earlier})


async def create_token(request: Request) -> Response:
    """A short-lived token for URLs (WebSocket, EventSource), for the key used here."""
    access: AccessControl = request.state.access
    client = getattr(request.state, "client", None) or Client("anonymous")
    token = access.mint_token(client)
    return JSON({"token": token, "expires_in": access.token_ttl}, status_code=201)


async def metrics_text(request: Request) -> Response:
    """Prometheus' text format (docs/metrics.md); 404 with ``GATEWAY_METRICS=false``."""
    metrics: Metrics = request.state.metrics
    if not metrics.enabled:
        raise NotFound("metrics are off (GATEWAY_METRICS=false)", code="not_found")
    return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


async def healthz(request: Request) -> Response:
    """Liveness: the process serves requests."""
    return JSON({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: the database and the broker answer (send traffic here)."""
    checks = await request.state.chat.readiness()
    ready = all(checks.values())
    return JSON(
        {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503
    )


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    metrics: Metrics | None = getattr(request.state, "metrics", None)
    if metrics is not None:
        metrics.refused.labels(exc.code).inc()
    return error_response(exc, request.scope["path"])


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    error = GatewayError(str(exc.detail), code=code, status=exc.status_code)
    return error_response(error, request.scope["path"])


ROOM = "/api/rooms/{room_id:id}"
MESSAGE = f"{ROOM}/messages/{{message_id:id}}"

# Starlette tries routes in order (a regular expression each): the one every answer
# takes comes first.
routes = [
    Route("/api/rooms/{room_id:id}/messages", post_message, methods=["POST"]),
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics_text, methods=["GET"]),
    Route("/api/tokens", create_token, methods=["POST"]),
    Route("/api/info", info, methods=["GET"]),
    Route("/api/search", search, methods=["GET"]),
    Route("/api/rooms", list_rooms, methods=["GET"]),
    Route("/api/rooms", create_room, methods=["POST"]),
    Route("/api/rooms/import", import_room, methods=["POST"]),
    Route("/api/rooms/{room_id:id}", get_room, methods=["GET"]),
    Route("/api/rooms/{room_id:id}", update_room, methods=["PATCH"]),
    Route("/api/rooms/{room_id:id}", delete_room, methods=["DELETE"]),
    Route("/api/rooms/{room_id:id}/messages", list_messages, methods=["GET"]),
    Route(f"{ROOM}/export", export_room, methods=["GET"]),
    Route(MESSAGE, get_message, methods=["GET"]),
    Route(f"{MESSAGE}/regenerate", regenerate, methods=["POST"]),
    Route(f"{MESSAGE}/select", select, methods=["POST"]),
    Route(f"{MESSAGE}/edit", edit_message, methods=["POST"]),
    Route(f"{MESSAGE}/hide", hide_message, methods=["POST"]),
    Route(f"{ROOM}/typing", typing, methods=["POST"]),
    Route(f"{ROOM}/generations/{{generation_id:id}}/cancel", cancel, methods=["POST"]),
    *sse.routes,
]


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: JSON like every other error, with no detail (uvicorn logs the traceback)."""
    return error_response(internal_error(), request.scope["path"])


exception_handlers = {
    GatewayError: handle_gateway_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
