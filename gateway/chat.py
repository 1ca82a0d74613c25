"""The chat parts, wired together: what the transports and the room use cases use.

- :mod:`gateway.roomstate`: the rooms cached in memory, and a lock per room;
- :mod:`gateway.joining`: join, watch, leave, authorize, access re-checks;
- :mod:`gateway.presence`: who is in each room, and typing;
- :mod:`gateway.sending`: send, regenerate, select, cancel;
- :mod:`gateway.generations`: the running generations, their checkpoints, takeovers;
- :mod:`gateway.planning` and :mod:`gateway.screening`: pure prompt planning, and the
  checks a room's messages and answers go through.

Dependencies point one way: sending → generations → generation; joining and sending
→ roomstate; joining → presence; none of them knows this module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from gateway import protocol
from gateway.broker.base import EventBus, RoomLeases
from gateway.errors import NotFound
from gateway.generations import GenerationRegistry
from gateway.hub import RoomHub
from gateway.joining import Joining
from gateway.metrics import OFF, Metrics
from gateway.planning import Defaults
from gateway.presence import Presence
from gateway.providers.base import ChatProvider, Moderation
from gateway.quotas import Quotas
from gateway.roomstate import Page, RoomCache, RoomLocks, Snapshot
from gateway.screening import Screening
from gateway.sending import Sending
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.models import Room
from gateway.store.writer import Writer
from gateway.tracing import NO_TRACING, Tracing

log = logging.getLogger(__name__)

DRAIN_FLUSH_SECONDS = 2.0
"""On shutdown, how long streams get to send their last frames before being cut."""


class ChatService:
    """The live side of rooms: :attr:`joining`, :attr:`sending` and the
    :attr:`generations` they start, over one room cache and one set of room locks."""

    def __init__(
        self,
        *,
        db: Database,
        writer: Writer,
        hub: RoomHub,
        bus: EventBus,
        leases: RoomLeases,
        provider: ChatProvider,
        settings: Settings,
        quotas: Quotas | None = None,
        moderator: Moderation | None = None,
        metrics: Metrics = OFF,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.metrics = metrics
        self.db = db
        self.hub = hub
        self.bus = bus
        self.settings = settings
        self.quotas = quotas or Quotas()
        page = Page(settings.page_messages, settings.ready_max_bytes)
        self.cache = RoomCache(settings.default_context_tokens, page=page)
        self.locks = RoomLocks()
        screening = Screening(
            settings.checks, max_chars=settings.max_message_chars, moderator=moderator
        )
        self.generations = GenerationRegistry(
            db=db,
            writer=writer,
            hub=hub,
            bus=bus,
            leases=leases,
            provider=provider,
            screening=screening,
            quotas=self.quotas,
            cache=self.cache,
            locks=self.locks,
            checkpoint_interval=settings.checkpoint_interval,
            metrics=metrics,
        )
        self.presence = Presence(bus)
        self.joining = Joining(
            db=db,
            hub=hub,
            bus=bus,
            cache=self.cache,
            locks=self.locks,
            presence=self.presence,
            page=page,
            depth=settings.max_history_messages,
            queue_position=self.generations.queue_position,
        )
        self.sending = Sending(
            db=db,
            writer=writer,
            bus=bus,
            cache=self.cache,
            locks=self.locks,
            generations=self.generations,
            screening=screening,
            defaults=Defaults.of(settings, provider.default_model),
            max_message_chars=settings.max_message_chars,
            page=page,
            tracing=tracing,
        )

    async def start(self) -> None:
        self.joining.start()
        await self.bus.start(self.hub)
        await self.generations.start()

    async def readiness(self) -> dict[str, bool]:
        """Whether each shared part answers: ``database`` and ``broker``."""
        return {"database": await self.db.ping(), "broker": self.bus.ready}

    # --- the room itself changing (the REST API) -----------------------------------

    @contextlib.asynccontextmanager
    async def changing_room(self, room_id: str) -> AsyncIterator[None]:
        """Bracket an update of the room itself: the caller commits it, then
        :meth:`room_changed` announces it."""
        async with self.locks(room_id), self.bus.changing(room_id):
            yield

    def room_created(self, room: Room) -> None:
        """A room was just created here: cache it, so that the first joins and the
        first send read nothing. As of change 0, the count of a room nobody changed
        (on any process); if that is not the event bus's count, the state is read
        again on first use."""
        self.cache.remember(room, [], 0, Snapshot([], earlier=False))

    def room_changed(self, room: Room, view: dict[str, Any]) -> None:
        """The room's name, persona or access was updated: tell its members (on every
        process; those shut out are disconnected, see :mod:`gateway.joining`), and
        reload it on next use (a bigger context budget may need history the cache
        trimmed)."""
        self.cache.drop(room.id)
        self.bus.publish(room.id, protocol.room_frame(view))

    async def close_room(self, room_id: str) -> None:
        """Stop the room's generation and disconnect its members (room deleted)."""
        await self.generations.stop_and_wait(room_id)
        self.cache.drop(room_id)
        await self.bus.close_room(
            room_id,
            protocol.error_frame(NotFound("this room was deleted", code="room_deleted")),
        )

    # --- stopping ------------------------------------------------------------------

    async def drain(self, flush_timeout: float = DRAIN_FLUSH_SECONDS) -> None:
        """The server is stopping (called before it stops serving): end every running
        answer as ``interrupted`` (see :meth:`GenerationRegistry.drain`), then let
        every stream send what it has queued and end (a WebSocket closes with 1012);
        streams that cannot within ``flush_timeout`` seconds (a client that stopped
        reading) are cut. Nothing new starts from here on."""
        await self.generations.drain(flush_timeout)
        self.hub.stop()
        if not await self.hub.emptied(flush_timeout):
            log.info("shutdown: cutting the streams that did not end in time")
            self.hub.cut()

    async def shutdown(self) -> None:
        """Stop every generation, storing its text as ``interrupted``."""
        await self.generations.shutdown()
        self.joining.shutdown()
        self.presence.announce()  # who left as the streams ended
