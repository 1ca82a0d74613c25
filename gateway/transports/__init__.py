"""Thin adapters from the network to the use cases: parse, call, encode."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.convertors import Convertor, register_url_convertor


class IdConvertor(Convertor[str]):
    """``{name:id}`` in a route: an id in a URL path, without control characters
    (no database stores U+0000; PostgreSQL fails on it), so such a path is a 404."""

    regex = "[^/\x00-\x1f]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("id", IdConvertor())


ABORT_EXTENSION = "gateway.abort"
"""``scope["extensions"]`` key of a callable that aborts the request's connection at
once (set by :mod:`gateway.server`'s protocols; absent under a plain uvicorn)."""


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
