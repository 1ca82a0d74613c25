"""The generations this process runs: launching them, routing stop requests to them,
their end, the checkpoints of their text, and taking over those of dead processes.

Owns the rule "one generation per room at a time", through the broker's lease, so
that it holds across gateway processes, and each sender's count of concurrent
generations (held from admission to the generation's exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from gateway import protocol
from gateway.broker.base import Broker, Orphan
from gateway.errors import Busy, GatewayError, Stopping
from gateway.generation import INTERRUPTED, GenerationTask
from gateway.hub import RoomHub
from gateway.providers.base import ChatProvider, CompletionRequest
from gateway.quotas import Quotas
from gateway.roomstate import RoomCache, RoomLocks
from gateway.screening import Screening
from gateway.store.db import Database
from gateway.store.models import Room
from gateway.store.repository import MessageStore
from gateway.store.writer import WriteBatch, Writer

log = logging.getLogger(__name__)

PRUNE_INTERVAL = 10.0
"""Seconds between sweeps of the event logs for expired events and idle rooms."""


@dataclass(frozen=True, slots=True)
class Started:
    """A generation just launched, and the assistant message it streams into."""

    generation_id: str
    message_id: str


class GenerationRegistry:
    """Runs generations and is their :class:`~gateway.generation.GenerationOwner`."""

    def __init__(
        self,
        *,
        db: Database,
        writer: Writer,
        hub: RoomHub,
        broker: Broker,
        provider: ChatProvider,
        screening: Screening,
        quotas: Quotas,
        cache: RoomCache,
        locks: RoomLocks,
        checkpoint_interval: float,
    ) -> None:
        self.db = db
        self.writer = writer
        self.hub = hub
        self.broker = broker
        self.provider = provider
        self.screening = screening
        self.quotas = quotas
        self.cache = cache
        self.locks = locks
        self.checkpoint_interval = checkpoint_interval
        self._running: dict[str, GenerationTask] = {}
        self._checkpointer: asyncio.Task[None] | None = None
        self._closing = False
        self.stopping = False
        """The server is stopping: nothing new is admitted (see :meth:`drain`)."""

    def start(self) -> None:
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="checkpoints")

    def running(self, room_id: str) -> GenerationTask | None:
        return self._running.get(room_id)

    # --- admission and launch ------------------------------------------------------

    async def admit(self, sender: str, room_id: str) -> None:
        """Count a message of ``sender`` and hold one of its concurrent generations
        (released when the generation ends, or by :meth:`releasing_on_error`). Raises
        ``server_restarting`` once the server is stopping."""
        if self.stopping:
            raise Stopping("the gateway is restarting; send again in a moment")
        await self.quotas.admit_message(sender, room_id)
        self.quotas.start_generation(sender)

    @contextlib.asynccontextmanager
    async def releasing_on_error(self, sender: str) -> AsyncIterator[None]:
        """Give back the generation :meth:`admit` held if it never starts."""
        try:
            yield
        except BaseException:
            self.quotas.end_generation(sender)
            raise

    @contextlib.asynccontextmanager
    async def claimed(self, room_id: str, generation_id: str) -> AsyncIterator[int]:
        """Hold the room's lease for ``generation_id``, yielding the room's change
        count; raises ``Busy`` while another generation holds it. Released on leaving,
        unless the generation was launched (it releases the lease when it ends)."""
        version = await self.broker.claim(room_id, generation_id)
        if version is None:
            raise Busy("the room is generating; wait for the answer to end, or cancel it")
        try:
            yield version
        finally:
            running = self._running.get(room_id)
            if running is None or running.id != generation_id:
                self.broker.release(room_id, generation_id)

    def launch(
        self,
        room: Room,
        generation_id: str,
        message_view: dict[str, Any],
        request: CompletionRequest,
        sender: str,
    ) -> Started:
        """Publish ``start`` and run the generation that streams into the stored answer
        ``message_view`` (the caller holds the room's lock and lease, and admitted
        ``sender``)."""
        generation = GenerationTask(
            generation_id=generation_id,
            room_id=room.id,
            message_view=message_view,
            request=request,
            provider=self.provider,
            checks=self.screening.checks(room),
            moderator=self.screening.moderator_of(room),
            writer=self.writer,
            broker=self.broker,
            owner=self,
            sender=sender,
            hold_back=self.screening.hold_back(room),
        )
        self._running[room.id] = generation
        self.broker.publish(room.id, protocol.start_frame(generation_id, message_view))
        generation.start()
        return Started(generation_id, generation.message_id)

    # --- the owner of each generation ----------------------------------------------

    @contextlib.asynccontextmanager
    async def finishing(self, generation: GenerationTask) -> AsyncIterator[None]:
        room_id = generation.room_id
        async with self.locks(room_id), self.broker.changing(room_id) as version:
            try:
                yield
            except BaseException:
                self.cache.drop(room_id)  # unsure what was stored: read it again
                raise
            if generation.final is not None:
                self.cache.answer_ended(room_id, generation.message_id, generation.final, version)

    def exited(self, generation: GenerationTask) -> None:
        if self._running.get(generation.room_id) is generation:
            del self._running[generation.room_id]
        self.broker.release(generation.room_id, generation.id)
        self.quotas.end_generation(generation.sender)

    # --- stopping ------------------------------------------------------------------

    async def stop(self, room_id: str, generation_id: str | None) -> str | None:
        """Stop the room's generation (``generation_id``, or whichever runs), here or
        on the process that runs it; returns the id of the one stopped, or None when
        none is running (or it is already ending)."""
        generation = self._running.get(room_id)
        if generation is not None and generation_id in (None, generation.id):
            return generation.id if generation.stop("cancelled") else None
        if generation is None:  # perhaps running on another process
            return await self.broker.request_cancel(room_id, generation_id)
        return None

    async def stop_and_wait(self, room_id: str) -> None:
        """Stop the room's generation, and wait for its end when it runs here."""
        generation = self._running.get(room_id)
        if generation is not None:
            generation.stop("cancelled")
            await generation.wait()
        else:
            await self.broker.request_cancel(room_id, None)

    def stop_requested(
        self, room_id: str, generation_id: str, why: Literal["cancelled", "lost"]
    ) -> None:
        """Another process asked to cancel a generation of this one, or took it over
        (the broker's stop handler)."""
        generation = self._running.get(room_id)
        if generation is not None and generation.id == generation_id:
            generation.stop(why)

    async def drain(self, flush_timeout: float) -> None:
        """The server is stopping: admit nothing new, end every running answer as
        ``interrupted`` — each stores its text and publishes its ``error`` frame — and
        wait up to ``flush_timeout`` seconds for those frames to reach this process's
        clients."""
        self.stopping = True
        for _ in range(3):  # a send admitted just before may launch meanwhile
            generations = list(self._running.values())
            if not generations:
                break
            # Wait for the last frames of the rooms that have members here.
            self.hub.expect_ends({g.id for g in generations if self.hub.members(g.room_id)})
            for generation in generations:
                generation.stop("interrupted")
            await asyncio.gather(*(g.wait() for g in generations))
            if not await self.hub.ends_delivered(flush_timeout):
                log.warning("shutdown: some interrupted answers were not announced in time")

    async def shutdown(self) -> None:
        """Stop every generation, storing its text as ``interrupted``; stop the
        checkpoints."""
        generations = list(self._running.values())
        for generation in generations:
            generation.stop("interrupted")
        await asyncio.gather(*(g.wait() for g in generations))
        if self._checkpointer is not None:
            # Also a flag: a cancellation that some library swallows (seen with
            # redis-py) must not keep the loop, and so the shutdown, going forever.
            self._closing = True
            self._checkpointer.cancel()
            await asyncio.gather(self._checkpointer, return_exceptions=True)

    # --- checkpoints and takeovers -------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        """Every interval, save the text of all running answers in one write (then look
        for generations whose process died, and now and then let the event logs forget
        what is too old to replay)."""
        loop = asyncio.get_running_loop()
        interval = self.checkpoint_interval
        pruned_at = tick = loop.time()
        while not self._closing:
            # On a fixed beat, whatever the work below took: that bounds what a crash
            # can lose to one interval.
            tick = max(tick + interval, loop.time())
            await asyncio.sleep(tick - loop.time())
            await self._checkpoint()
            try:
                for orphan in await self.broker.orphans():
                    await self._adopt(orphan)
            except Exception:
                log.exception("looking for generations whose process died failed")
            if tick - pruned_at >= PRUNE_INTERVAL:
                pruned_at = tick
                self.broker.prune()

    async def _checkpoint(self) -> None:
        rows = []
        for generation in self._running.values():
            if generation.seq != generation.checkpointed_seq:
                generation.checkpointed_seq = generation.seq
                rows.append({"id": generation.message_id, "content": generation.text})
        if rows:
            try:
                await self.writer.write(WriteBatch(checkpoints=rows))
            except Exception:
                log.exception("checkpointing %d answers failed", len(rows))

    async def _adopt(self, orphan: Orphan) -> None:
        """End a generation whose process died: store what it had published as
        ``interrupted``, and tell the room (its members may regenerate)."""
        room_id = orphan.room_id
        try:
            async with self.locks(room_id), self.broker.changing(room_id):
                final = {
                    "id": orphan.message_id,
                    "content": orphan.text,
                    "status": "interrupted",
                    "finish_reason": None,
                    "usage": None,
                    "error": INTERRUPTED,
                }
                await self.writer.write(WriteBatch(finals=[final]))
                async with self.db.read() as session:
                    store = MessageStore(session)
                    message = await store.message(room_id, orphan.message_id)
                    view = await store.message_view(message) if message is not None else None
                error = GatewayError(INTERRUPTED["message"], code="interrupted")
                self.broker.publish(
                    room_id,
                    protocol.error_frame(error, generation_id=orphan.generation_id, answer=view),
                )
                self.cache.drop(room_id)
            log.warning(
                "room %s: generation %s lost its process; marked interrupted",
                room_id,
                orphan.generation_id,
            )
        except Exception:
            log.exception("room %s: adopting generation %s failed", room_id, orphan.generation_id)
        finally:
            self.broker.release(room_id, orphan.generation_id)
