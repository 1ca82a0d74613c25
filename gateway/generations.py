"""The generations this process runs: launching them, routing stop requests to them,
their end, the checkpoints of their text, and taking over those of dead processes.

Owns the rule "one generation per room at a time", through the room's lease (see
:class:`~gateway.broker.base.RoomLeases`), so that it holds across gateway processes,
and each sender's count of concurrent generations (held from admission to the
generation's exit).

A cancel may come, from any process, once a send or a regeneration has claimed the
room's lease and before its generation is launched (a send claims it before its
message is screened, which may take a while): the leases route it here whatever the
generation's state, the registry remembers it, and the generation is launched
cancelled: it publishes ``start``, then ends at once as ``cancelled``, empty, without
asking the model. The message it answers stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from gateway import protocol
from gateway.broker.base import EventBus, Orphan, RoomLeases
from gateway.errors import Busy, GatewayError, Stopping
from gateway.generation import INTERRUPTED, GenerationTask
from gateway.hub import RoomHub
from gateway.metrics import OFF, Metrics
from gateway.providers.base import ChatProvider, CompletionRequest
from gateway.quotas import Quotas
from gateway.roomstate import RoomCache, RoomLocks
from gateway.screening import Screening
from gateway.store.db import Database
from gateway.store.models import Room
from gateway.store.repository import MessageStore
from gateway.store.writer import WriteBatch, Writer
from gateway.tracing import NO_TRACE, AnswerTrace

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
        bus: EventBus,
        leases: RoomLeases,
        provider: ChatProvider,
        screening: Screening,
        quotas: Quotas,
        cache: RoomCache,
        locks: RoomLocks,
        checkpoint_interval: float,
        metrics: Metrics = OFF,
    ) -> None:
        self.metrics = metrics
        self.db = db
        self.writer = writer
        self.hub = hub
        self.bus = bus
        self.leases = leases
        self.provider = provider
        self.screening = screening
        self.quotas = quotas
        self.cache = cache
        self.locks = locks
        self.checkpoint_interval = checkpoint_interval
        self._running: dict[str, GenerationTask] = {}
        # Generations whose room's lease is claimed here but that are not launched
        # yet, each with whether a cancel came meanwhile (applied at launch).
        self._unlaunched: dict[str, bool] = {}
        self._checkpointer: asyncio.Task[None] | None = None
        self._closing = False
        self.stopping = False
        """The server is stopping: nothing new is admitted (see :meth:`drain`)."""

    async def start(self) -> None:
        await self.leases.start(self.stop_requested)
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="checkpoints")

    def running(self, room_id: str) -> GenerationTask | None:
        return self._running.get(room_id)

    def queue_position(self, room_id: str) -> int:
        """Where the room's answer waits in the model's line, if it runs here (0: it
        does not wait, or runs elsewhere)."""
        generation = self._running.get(room_id)
        return generation.queue_position if generation is not None else 0

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
    async def claimed(
        self, room_id: str, holder_id: str, *, cancellable: bool = True
    ) -> AsyncIterator[int]:
        """Hold the room's lease for ``holder_id``, yielding the room's change count;
        raises ``Busy`` while another holder has it. Released on leaving, unless the
        generation ``holder_id`` was launched (it releases the lease when it ends).

        ``holder_id`` is the id of the generation to :meth:`launch`; a cancel of it
        that comes meanwhile (from any process) is applied at launch. A short
        exclusive change that launches nothing (selecting a branch) claims with
        ``cancellable=False``: a cancel meanwhile finds nothing running."""
        if cancellable:  # before claiming: with the lease, a cancel may come at once
            self._unlaunched[holder_id] = False
        try:
            version = await self.leases.claim(room_id, holder_id, cancellable=cancellable)
            if version is None:
                raise Busy("the room is generating; wait for the answer to end, or cancel it")
            try:
                yield version
            finally:
                running = self._running.get(room_id)
                if running is None or running.id != holder_id:
                    self.leases.release(room_id, holder_id)
        finally:
            self._unlaunched.pop(holder_id, None)

    def launch(
        self,
        room: Room,
        generation_id: str,
        message_view: dict[str, Any],
        request: CompletionRequest,
        sender: str,
        trace: AnswerTrace = NO_TRACE,
    ) -> Started:
        """Publish ``start`` and run the generation that streams into the stored answer
        ``message_view`` (the caller holds the room's lock and, through
        :meth:`claimed`, its lease, and admitted ``sender``). A generation cancelled
        since its lease was claimed ends at once, as ``cancelled``: stored and
        announced, the model never asked."""
        generation = GenerationTask(
            generation_id=generation_id,
            room_id=room.id,
            message_view=message_view,
            request=request,
            provider=self.provider,
            checks=self.screening.checks(room),
            moderator=self.screening.moderator_of(room),
            writer=self.writer,
            bus=self.bus,
            owner=self,
            sender=sender,
            hold_back=self.screening.hold_back(room),
            metrics=self.metrics,
            trace=trace,
        )
        cancelled = self._unlaunched.pop(generation_id, False)
        self._running[room.id] = generation
        self.bus.publish(room.id, protocol.start_frame(generation_id, message_view))
        generation.start()
        if cancelled:
            generation.stop("cancelled")
        return Started(generation_id, generation.message_id)

    # --- the owner of each generation ----------------------------------------------

    @contextlib.asynccontextmanager
    async def finishing(self, generation: GenerationTask) -> AsyncIterator[None]:
        room_id = generation.room_id
        async with self.locks(room_id), self.bus.changing(room_id) as version:
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
        self.leases.release(generation.room_id, generation.id)
        self.quotas.end_generation(generation.sender)

    # --- stopping ------------------------------------------------------------------

    async def stop(self, room_id: str, generation_id: str | None) -> str | None:
        """Stop the room's generation (``generation_id``, or whichever runs), here or
        on the process that holds the room's lease, launched or not yet (see
        :meth:`claimed`); returns the id of the one stopped, or None when none is
        running (or it is already ending)."""
        generation = self._running.get(room_id)
        if generation is not None and generation_id in (None, generation.id):
            return generation.id if generation.stop("cancelled") else None
        if generation is None:  # perhaps not launched yet, or on another process
            return await self.leases.request_cancel(room_id, generation_id)
        return None

    async def stop_and_wait(self, room_id: str) -> None:
        """Stop the room's generation, and wait for its end when it runs here."""
        generation = self._running.get(room_id)
        if generation is not None:
            generation.stop("cancelled")
            await generation.wait()
        else:
            await self.leases.request_cancel(room_id, None)

    def stop_requested(
        self, room_id: str, generation_id: str, why: Literal["cancelled", "lost"]
    ) -> None:
        """A client (on any process) asked to cancel a generation whose lease this
        process holds, or another process took the lease over (the leases' stop
        handler). A cancel of a generation claimed but not launched yet is kept for its
        launch: the client asked before seeing it start, and means it."""
        generation = self._running.get(room_id)
        if generation is not None and generation.id == generation_id:
            generation.stop(why)
        elif why == "cancelled" and generation_id in self._unlaunched:
            self._unlaunched[generation_id] = True

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
                for orphan in await self.leases.orphans():
                    await self._adopt(orphan)
            except Exception:
                log.exception("looking for generations whose process died failed")
            if tick - pruned_at >= PRUNE_INTERVAL:
                pruned_at = tick
                self.bus.prune()

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
            async with self.locks(room_id), self.bus.changing(room_id):
                final = {
                    "id": orphan.message_id,
                    "content": orphan.text,
                    "status": "interrupted",
                    "finish_reason": None,
                    "timing": None,
                    "usage": None,
                    "error": INTERRUPTED,
                }
                await self.writer.write(WriteBatch(finals=[final]))
                async with self.db.read() as session:
                    store = MessageStore(session)
                    message = await store.message(room_id, orphan.message_id)
                    view = await store.message_view(message) if message is not None else None
                error = GatewayError(INTERRUPTED["message"], code="interrupted")
                self.bus.publish(
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
            self.leases.release(room_id, orphan.generation_id)
