"""Thin adapters from the network to the use cases: parse, call, encode."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from starlette.convertors import Convertor, register_url_convertor

from gateway import logs, openai_format, protocol
from gateway.errors import GatewayError
from gateway.metrics import Metrics


class IdConvertor(Convertor[str]):
    """``{name:id}`` in a route: an id in a URL path, without control characters
    (no database stores U+0000; PostgreSQL fails on it), so such a path is a 404."""

    regex = "[^/\x00-\x1f]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", IdConvertor())


def connection_closed(
    metrics: Metrics,
    transport: str,
    *,
    room: str,
    person: str | None,
    sender: str,
    opened: float,
    reason: str,
) -> None:
    """A WebSocket or event stream ended (``reason``: ``client_left``, ``slow_client``,
    ``server_restarting``, an error code...): counted, and logged (gateway.logs)."""
    metrics.connections.labels(transport).dec()
    if reason == "slow_client":
        metrics.slow_clients.labels(transport).inc()
    logs.event(
        logs.connections,
        "connection closed",
        transport=transport,
        room=room,
        person=person,
        sender=sender,
        seconds=round(time.monotonic() - opened, 3),
        reason=reason,
    )


def is_openai_path(path: str) -> bool:
    """Under ``/v1``: the OpenAI-compatible API (:mod:`gateway.transports.openai_api`)."""
    return path == "/v1" or path.startswith("/v1/")


def error_body_for(path: str, error: GatewayError) -> dict[str, Any]:
    """An error body as the path's clients expect it: OpenAI's shape under ``/v1`` (so
    its SDKs read it), the gateway's own elsewhere."""
    if is_openai_path(path):
        return openai_format.error_body(error)
    return protocol.error_body(error)


ABORT_EXTENSION = "gateway.abort"
"""``scope["extensions"]`` key of a callable that aborts the request's connection at
once (set by :mod:`gateway.server`'s protocols; absent under a plain uvicorn)."""


WIRE_EXTENSION = "gateway.wire"
"""``scope["extensions"]`` key of the connection's :class:`Wire` (set by
:mod:`gateway.server`'s protocols: WebSocket once the handshake is accepted, HTTP for
a chunked response; absent under a plain uvicorn, where everything goes through ASGI
``send``)."""


class Wire(Protocol):
    """Direct access to a connection's outgoing bytes, bypassing the ASGI ``send``
    path (a message dict, a state machine and an ``await`` per event): the gateway's
    hot path writes events encoded once for every member of a room."""

    @property
    def is_open(self) -> bool:
        """Frames may still be sent: no close frame sent or received, not lost."""
        ...

    def can_write(self) -> bool:
        """Open, and the transport's buffer is below its high-water mark."""
        ...

    def write(self, data: bytes) -> None:
        """Write complete WebSocket frames (see :func:`gateway.protocol.websocket_text`),
        or a piece of the response body; never awaits. Only while :meth:`can_write`."""
        ...

    async def wait_writable(self) -> None:
        """Wait until the buffer has drained below its low-water mark (or the
        connection is lost)."""
        ...


async def until_first_done(*tasks: asyncio.Task[Any]) -> set[asyncio.Task[Any]]:
    """Wait for the first of ``tasks`` to end, cancel the others and wait for them.

    A connection's reader and writer (or a stream's writer and disconnect listener)
    each end the connection; returns the tasks that ended, their results unread.
    """
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return done
