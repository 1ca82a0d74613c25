"""What the gateway's uvicorn protocols refuse: bad UTF-8, oversized request heads."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import httpx2
import pytest

from tests.conftest import create_room, scaled
from tests.netutil import client_frame, close_code, open_stalled_socket, read_all, server_frames


async def test_invalid_utf8_in_a_text_frame_closes_with_1007_quietly(
    gateway: Any, room: dict, uvicorn_errors: list[str], caplog: Any
) -> None:
    sock = open_stalled_socket(gateway.server.port, room["id"])
    try:
        sock.sendall(client_frame(0x1, b'{"type":"ping","id":"\xff\xfe"}'))
        frames = server_frames(await asyncio.to_thread(read_all, sock, scaled(10)))
    finally:
        sock.close()
    assert close_code(frames) == 1007
    assert uvicorn_errors == []
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    # The server is fine: others go on.
    assert (await create_room(gateway))["id"]


def request_with_header(port: int, header_bytes: int) -> bytes:
    """``GET /healthz`` with one header of ``header_bytes``; the response (possibly
    cut short by the server closing), as bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as sock:
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        head += b"X-Big: " + b"a" * header_bytes
        try:
            sock.sendall(head + b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all sent
        return read_all(sock, scaled(10))


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_request_head_over_64_kib_is_refused_with_431(
    start_gateway: Any, http: str
) -> None:
    gateway = start_gateway(http=http)
    answer = await asyncio.to_thread(request_with_header, gateway.server.port, 1024 * 1024)
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:100]
    if answer:  # a reset may come before the client reads the answer
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
    # Normal requests, with headers of a usual size, still work.
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as client:
        response = await client.get("/healthz", headers={"x-normal": "b" * 4000})
    assert response.status_code == 200
    answer = await asyncio.to_thread(request_with_header, gateway.server.port, 32 * 1024)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:100]


@pytest.mark.parametrize("http", ["httptools", "h11"])
async def test_a_large_body_sent_with_its_head_in_one_write_is_not_mistaken_for_a_head(
    start_gateway: Any, http: str
) -> None:
    gateway = start_gateway(http=http)
    room = await create_room(gateway)
    body = b'{"content": "%s"}' % (b"x" * 200_000)
    head = (
        b"POST /api/rooms/%s/messages HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
        % (room["id"].encode(), len(body))
    )

    def post() -> bytes:
        with socket.create_connection(("127.0.0.1", gateway.server.port)) as sock:
            sock.sendall(head + body)  # one write: the server may read both at once
            return read_all(sock, scaled(10))

    answer = await asyncio.to_thread(post)
    # Refused for its size as a message (the limit is GATEWAY_MAX_MESSAGE_CHARS), not
    # as a request head.
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"message_too_long" in answer
