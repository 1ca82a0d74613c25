"""The REST API: rooms and their history, as JSON.

Errors are ``{"error": {"code": ..., "message": ...}}`` with a fitting status.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import BadRequest, GatewayError, PayloadTooLarge
from gateway.protocol import RoomCreate, RoomUpdate, parse_body
from gateway.rooms import RoomService

MAX_BODY_BYTES = 1024 * 1024


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: GatewayError) -> JSON:
    return JSON({"error": exc.to_dict()}, status_code=exc.status)


async def read_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(
                f"request body exceeds {MAX_BODY_BYTES} bytes", code="body_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _rooms(request: Request) -> RoomService:
    return request.state.rooms


def _int_param(request: Request, name: str, default: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 0 <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from 0 to {high}", code="invalid_query")
    return int(raw)


async def list_rooms(request: Request) -> Response:
    limit = _int_param(request, "limit", 100, 1000)
    offset = _int_param(request, "offset", 0, 10**9)
    return JSON({"rooms": await _rooms(request).list(limit=limit, offset=offset)})


async def create_room(request: Request) -> Response:
    body = parse_body(RoomCreate, await read_body(request))
    return JSON(await _rooms(request).create(body), status_code=201)


async def get_room(request: Request) -> Response:
    return JSON(await _rooms(request).get(request.path_params["room_id"]))


async def update_room(request: Request) -> Response:
    body = parse_body(RoomUpdate, await read_body(request))
    return JSON(await _rooms(request).update(request.path_params["room_id"], body))


async def delete_room(request: Request) -> Response:
    await _rooms(request).delete(request.path_params["room_id"])
    return Response(status_code=204)


async def list_messages(request: Request) -> Response:
    messages = await _rooms(request).messages(request.path_params["room_id"])
    return JSON({"messages": messages})


async def healthz(request: Request) -> Response:
    return JSON({"status": "ok"})


async def handle_gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    return error_response(GatewayError(str(exc.detail), code=code, status=exc.status_code))


routes = [
    Route("/healthz", healthz),
    Route("/api/rooms", list_rooms, methods=["GET"]),
    Route("/api/rooms", create_room, methods=["POST"]),
    Route("/api/rooms/{room_id}", get_room, methods=["GET"]),
    Route("/api/rooms/{room_id}", update_room, methods=["PATCH"]),
    Route("/api/rooms/{room_id}", delete_room, methods=["DELETE"]),
    Route("/api/rooms/{room_id}/messages", list_messages, methods=["GET"]),
]

exception_handlers = {
    GatewayError: handle_gateway_error,
    HTTPException: handle_http_exception,
}
