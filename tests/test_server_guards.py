"""What the gateway's uvicorn protocols refuse (bad UTF-8, oversized request heads),
and how its server accepts a burst of connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

import httpx2
import pytest
import trustme

from gateway.server import BACKLOG, Backlog
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


class Recorder(asyncio.Protocol):
    """A protocol that keeps what it receives; ``everyone_spoke`` is set once
    ``expected`` connections have each received something."""

    def __init__(self, made: list[Recorder], expected: int, everyone_spoke: asyncio.Event) -> None:
        self.data = b""
        self.made, self.expected, self.everyone_spoke = made, expected, everyone_spoke
        made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if sum(1 for protocol in self.made if protocol.data) == self.expected:
            self.everyone_spoke.set()


def listening_socket() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(100)
    return listener


async def test_the_backlog_takes_every_queued_connection_at_once() -> None:
    # libuv accepts one connection per loop iteration; the Backlog takes the rest.
    listener = listening_socket()
    clients = [socket.create_connection(listener.getsockname()) for _ in range(20)]
    made: list[Recorder] = []
    everyone_spoke = asyncio.Event()
    backlog = Backlog([listener], lambda: Recorder(made, 20, everyone_spoke))
    try:
        assert backlog.take() == 20
        assert backlog.take() == 0  # nothing more is queued
        for i, client in enumerate(clients):
            client.sendall(b"hello %d" % i)
        async with asyncio.timeout(scaled(10)):
            await everyone_spoke.wait()
        assert sorted(p.data for p in made) == sorted(b"hello %d" % i for i in range(20))
    finally:
        backlog.close()
        for client in clients:
            client.close()
    assert listener.fileno() == -1  # closed with the backlog


async def test_the_backlog_hands_over_tls_connections_after_their_handshake() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    listener = listening_socket()
    made: list[Recorder] = []
    everyone_spoke = asyncio.Event()
    backlog = Backlog([listener], lambda: Recorder(made, 1, everyone_spoke), ssl=server_context)
    raw = socket.create_connection(listener.getsockname(), timeout=scaled(10))

    def talk() -> None:
        with client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"secret")
            with contextlib.suppress(OSError):
                tls.recv(1)  # held open until the server side is done

    assert backlog.take() == 1
    client = asyncio.create_task(asyncio.to_thread(talk))
    try:
        async with asyncio.timeout(scaled(10)):
            await everyone_spoke.wait()
        assert made[0].data == b"secret"
    finally:
        backlog.close()
        for protocol in made:
            protocol.transport.close()
        await client
        raw.close()


def test_the_gateway_server_keeps_a_backlog_of_its_listening_socket(gateway: Any) -> None:
    backlog = getattr(gateway.server.server.server_state, BACKLOG)
    assert isinstance(backlog, Backlog)
