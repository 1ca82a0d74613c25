"""Rate limits and quotas, per client and per room.

A client is its API key's name when it used one, else its IP address. Limits use the
``limits`` library's notation (``10/minute``, ``100/hour;1000/day``) and its moving
window, counted in memory by default or in Redis (``GATEWAY_REDIS_URL``, or
``GATEWAY_RATE_LIMIT_STORAGE=redis://...``) so that several gateway processes share
one count.

Why check before storing: a rejected message must cost nothing — not a row, not an
upstream call. The chat service asks :meth:`Quotas.admit_message` after its own
checks (a room already generating says ``busy`` without using up the quota) and
before it stores anything.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import limits
from limits.aio.strategies import MovingWindowRateLimiter

from gateway.errors import RateLimited


class Quotas:
    """The configured limits; each is off when not set."""

    def __init__(
        self,
        *,
        messages: str | None = None,
        room_messages: str | None = None,
        max_generations: int | None = None,
        max_connections: int | None = None,
        storage: str = "memory://",
        key_prefix: str = "chat-gateway",
        connection_pool: Any = None,
    ) -> None:
        """``storage`` is a ``limits`` storage URI; for Redis, ``connection_pool`` (a
        redis-py asyncio pool) is used instead of opening one of its own."""
        self.messages = limits.parse_many(messages) if messages else []
        self.room_messages = limits.parse_many(room_messages) if room_messages else []
        self.max_generations = max_generations
        self.max_connections = max_connections
        self._limiter = MovingWindowRateLimiter(_storage(storage, key_prefix, connection_pool))
        # Process-local: a generation or a connection lives in one process.
        self._generations: Counter[str] = Counter()
        self._connections: Counter[str] = Counter()

    async def admit_message(self, sender: str, room_id: str) -> None:
        """Count one message (a send or a regenerate) of ``sender`` in ``room_id``;
        raises :class:`RateLimited` when it is one too many."""
        checks = [(item, "client", sender) for item in self.messages]
        checks += [(item, "room", room_id) for item in self.room_messages]
        for item, scope, identity in checks:
            if not await self._limiter.hit(item, scope, identity):
                stats = await self._limiter.get_window_stats(item, scope, identity)
                who = "you" if scope == "client" else "this room"
                raise RateLimited(
                    f"{who} sent more than {item.amount} messages per "
                    f"{item.get_expiry()} s; try again later",
                    retry_after=stats.reset_time - time.time(),
                )

    def start_generation(self, sender: str) -> None:
        """Count a generation ``sender`` started; raises when it would exceed the
        concurrent maximum. Pair with :meth:`end_generation`."""
        if self.max_generations is not None and self._generations[sender] >= self.max_generations:
            raise RateLimited(
                f"you have {self._generations[sender]} answers generating at once, the "
                "maximum; wait for one to end",
                retry_after=1,
                code="too_many_generations",
            )
        self._generations[sender] += 1

    def end_generation(self, sender: str) -> None:
        self._release(self._generations, sender)

    @contextlib.contextmanager
    def connection(self, sender: str) -> Iterator[None]:
        """Hold one of ``sender``'s live connections (WebSocket or event stream)."""
        if self.max_connections is not None and self._connections[sender] >= self.max_connections:
            raise RateLimited(
                f"you have {self._connections[sender]} connections open, the maximum",
                retry_after=5,
                code="too_many_connections",
            )
        self._connections[sender] += 1
        try:
            yield
        finally:
            self._release(self._connections, sender)

    @staticmethod
    def _release(counter: Counter[str], key: str) -> None:
        counter[key] -= 1
        if counter[key] <= 0:
            del counter[key]


def _storage(uri: str, key_prefix: str, pool: Any) -> limits.aio.storage.Storage:
    """The ``limits`` asyncio storage at ``uri``; Redis through redis-py, the client
    the broker uses too (one Redis library, not two), its keys under ``key_prefix``."""
    uri = uri if uri.startswith("async+") else f"async+{uri}"
    options: dict[str, Any] = {}
    if uri.startswith("async+redis"):
        options = {"implementation": "redispy", "key_prefix": f"{key_prefix}:limits"}
        if pool is not None:
            options["connection_pool"] = pool
    storage = limits.storage.storage_from_string(uri, **options)
    assert isinstance(storage, limits.aio.storage.Storage)
    return storage
