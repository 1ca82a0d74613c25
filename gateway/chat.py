"""Conversation use cases: join, send, cancel, regenerate, select.

Owns the rule "one generation per room at a time", through the room's lease, so
that it holds across gateway processes. Every change that clients see is committed
first and published second, under the room's lock and inside the event bus's
:meth:`~gateway.broker.base.EventBus.changing` bracket, so a client joining concurrently
(on this process or another) gets either the old state plus the event, or the new
state without it — never a gap or a duplicate. Reads use read sessions; writes go
through the group-committing :class:`~gateway.store.writer.Writer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from gateway import protocol
from gateway.access import OPEN, Viewer
from gateway.broker.base import EventBus, Orphan, Position, RoomLeases
from gateway.checks import CheckPipeline, SecretLeak, build_pipeline
from gateway.errors import (
    BadRequest,
    Busy,
    Conflict,
    GatewayError,
    NotFound,
    Stopping,
    Unavailable,
)
from gateway.generation import CHECK_EVERY, INTERRUPTED, GenerationTask, rejected
from gateway.hub import RoomHub, Subscriber
from gateway.prompt import Turn, build_prompt, estimate_tokens
from gateway.providers.base import ChatProvider, CompletionRequest
from gateway.providers.moderation import Moderator
from gateway.quotas import Quotas
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.models import Message, Room, message_row, new_id, utcnow
from gateway.store.repository import MessageStore
from gateway.store.writer import WriteBatch, Writer

log = logging.getLogger(__name__)

SECRET_FRAGMENT_CHARS = 32
"""A secret system prompt counts as leaked from a copied run of about twice this."""

SECRET_HOLD_BACK_CHARS = 4 * SECRET_FRAGMENT_CHARS
"""In a room with a secret prompt, answers reach clients this many characters behind
the model, so that a leak is caught before any of it is shown: a leaked run is caught
at 2 × SECRET_FRAGMENT_CHARS normalised characters; the rest is margin for what
normalising shortens (collapsed whitespace, invisible characters)."""

LONG_INPUT_CHARS = 4000
"""Inputs longer than this are checked in a thread: the heuristics cost ~3 µs/char."""


async def check_input(checks: CheckPipeline, content: str) -> None:
    """Raise ``input_rejected`` (with the rule's name) when ``content`` fails a check."""
    if len(content) > LONG_INPUT_CHARS:
        verdict = await asyncio.to_thread(checks.check_input, content)
    else:
        verdict = checks.check_input(content)
    rejected(verdict, "input_rejected", "message")


PRUNE_INTERVAL = 10.0
"""Seconds between sweeps of the event logs for expired events and idle rooms."""

DRAIN_FLUSH_SECONDS = 2.0
"""On shutdown, how long streams get to send their last frames before being cut."""

SNAPSHOT_TRIES = 8
"""Attempts at a snapshot with no change under way before taking one anyway (a
change begun by a process that then died never ends)."""


MESSAGE_OVERHEAD_BYTES = 512
"""About what a message's view takes on the wire besides its content (ids, times...)."""


def newest_within(branch: list[Message], budget: int) -> list[Message]:
    """The newest messages of ``branch`` whose views fit in about ``budget`` bytes, and
    at least the newest one (a running answer is always last). A snapshot per joining
    client is built and sent whole: without a cap, a long room's history would be held
    once per client that joins and does not read it."""
    used = 0
    for i in range(len(branch) - 1, -1, -1):
        used += len(branch[i].content.encode()) + MESSAGE_OVERHEAD_BYTES
        if used > budget and i < len(branch) - 1:
            return branch[i + 1 :]
    return branch


def room_not_found(room_id: str) -> NotFound:
    return NotFound(f"no room with id {room_id!r}", code="room_not_found")


def message_not_found(message_id: str) -> NotFound:
    return NotFound(f"no message with id {message_id!r} in this room", code="message_not_found")


@dataclass(frozen=True, slots=True)
class Started:
    """A generation just launched, and the assistant message it streams into."""

    generation_id: str
    message_id: str


@dataclass
class RoomState:
    """What answering in a room needs, kept in memory while the room is in use:
    the persona and the active branch (oldest first). The database stays the record;
    this spares a send the reads of the room and its history."""

    room: Room
    branch: list[Message]
    version: int = 0
    """The room's change count (see :meth:`RoomLeases.claim`) this state is current at."""


class RoomCache:
    """The most recently used rooms' :class:`RoomState`, up to ``size`` rooms."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._states: OrderedDict[str, RoomState] = OrderedDict()

    def get(self, room_id: str) -> RoomState | None:
        state = self._states.get(room_id)
        if state is not None:
            self._states.move_to_end(room_id)
        return state

    def put(self, room_id: str, state: RoomState) -> None:
        self._states[room_id] = state
        self._states.move_to_end(room_id)
        while len(self._states) > self.size:
            self._states.popitem(last=False)

    def drop(self, room_id: str) -> None:
        self._states.pop(room_id, None)


class ChatService:
    """The live side of rooms: messages, generations and their fan-out."""

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
        moderator: Moderator | None = None,
    ) -> None:
        self.db = db
        self.quotas = quotas or Quotas()
        self.moderator = moderator
        self.writer = writer
        self.hub = hub
        self.bus = bus
        self.leases = leases
        self.provider = provider
        self.settings = settings
        # Weak: a room's lock lives while someone holds it (a caller, or a running
        # generation), so probing many unknown room ids leaves nothing behind.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._running: dict[str, GenerationTask] = {}
        # Rooms whose lease is claimed here for a generation not launched yet, and
        # those of them cancelled meanwhile: they end as cancelled when they start.
        self._unlaunched: dict[str, str] = {}
        self._cancel_at_launch: set[str] = set()
        self._cache = RoomCache()
        self._checkpointer: asyncio.Task[None] | None = None
        self._closing = False
        self._draining = False
        # Rooms whose access is being checked again: how many changes were announced
        # since the check began (see _check_access).
        self._access_asks: dict[str, int] = {}
        self._access_checks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.hub.on_room_frame = self._room_frame
        await self.bus.start(self.hub)
        await self.leases.start(self._stop_requested)
        self._checkpointer = asyncio.create_task(self._checkpoint_loop(), name="checkpoints")

    def _lock(self, room_id: str) -> asyncio.Lock:
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        return lock

    async def _state(self, room_id: str, version: int) -> RoomState:
        """The room's state as of change ``version``: cached, or loaded when not cached
        or older (another process changed the room). Caller holds the room lock."""
        state = self._cache.get(room_id)
        if state is None or state.version != version:
            async with self.db.read() as session:
                store = MessageStore(session)
                room = await load_room(store, room_id)
                branch = await store.branch(room.active_leaf_id)
            state = self._remember(room, branch, version)
        return state

    def _remember(self, room: Room, branch: list[Message], version: int) -> RoomState:
        """Cache ``room`` with its active ``branch`` as of change ``version`` (caller
        holds the room lock)."""
        generation = self._running.get(room.id)
        if generation is not None:
            # The running answer's own object, which its end will bring up to date.
            branch = [generation.answer if m.id == generation.message_id else m for m in branch]
        state = RoomState(room, self._trimmed(room, branch), version)
        self._cache.put(room.id, state)
        return state

    def _trimmed(self, room: Room, branch: list[Message]) -> list[Message]:
        """The newest part of ``branch`` that a prompt can use: older messages would be
        trimmed from every prompt anyway, and keeping them would let a long-lived
        room's whole history pile up in memory."""
        budget = room.context_tokens or self.settings.default_context_tokens
        used = 0
        for i in range(len(branch) - 1, -1, -1):
            used += estimate_tokens(branch[i].content)
            if used > budget and len(branch) - i > 2:
                return branch[i + 1 :]
        return branch

    @contextlib.asynccontextmanager
    async def changing_room(self, room_id: str) -> AsyncIterator[None]:
        """Bracket an update of the room itself (by the REST API): the caller commits
        it, then :meth:`room_changed` announces it."""
        async with self._lock(room_id), self.bus.changing(room_id):
            yield

    def room_changed(self, room: Room, view: dict[str, Any]) -> None:
        """The room's name, persona or access was updated: tell its members (on every
        process; those shut out are disconnected, see :meth:`_room_frame`), and reload
        it on next use (a bigger context budget may need history the cache trimmed)."""
        self._cache.drop(room.id)
        self.bus.publish(room.id, protocol.room_frame(view))

    def _room_frame(self, room_id: str, view: protocol.Frame, members: list[Subscriber]) -> None:
        """A ``room`` frame is reaching this process's members of the room (from any
        process). Those the frame does not show still allowed in — a private room they
        do not own; the frame has no grants — are held until the room is read again.
        Nothing is read for an open gateway, a public room, or the owner."""
        doubtful = [s for s in members if not s.viewer.sees_in(view)]
        for subscriber in doubtful:
            subscriber.suspend()
        asks = self._access_asks.get(room_id)
        if not doubtful and asks is None:
            return
        self._access_asks[room_id] = (asks or 0) + 1
        if asks is None:  # else the running check reads the room again
            task = asyncio.create_task(self._check_access(room_id), name="access check")
            self._access_checks.add(task)
            task.add_done_callback(self._access_checks.discard)

    async def _check_access(self, room_id: str) -> None:
        """Read the room, then end the held subscriptions of viewers who may no longer
        see it (``room_not_found``, as for a room they never saw) and let the others
        go on. One read per change, never per event; read again while more changes
        come (the read may predate a later change's commit)."""
        room: Room | None = None
        failed = False
        try:
            while True:
                asks = self._access_asks[room_id]
                try:
                    async with self.db.read() as session:
                        room = await MessageStore(session).room(room_id)
                    failed = False
                except Exception:
                    log.exception("room %s: reading it to check access failed", room_id)
                    failed = True
                if self._access_asks[room_id] == asks:
                    break
        finally:
            del self._access_asks[room_id]
        for subscriber in self.hub.subscribers(room_id):
            if not subscriber.suspended:
                continue
            if room is not None and subscriber.viewer.can_see(room):
                subscriber.resume()
            elif failed:  # unsure: let the client come back and be checked on joining
                error = Unavailable(
                    "could not check access to the room; reconnect", code="access_check_failed"
                )
                subscriber.close(protocol.error_frame(error))
            else:
                subscriber.close(protocol.error_frame(room_not_found(room_id)))

    # --- joining -------------------------------------------------------------------

    async def readiness(self) -> dict[str, bool]:
        """Whether each shared part answers: ``database`` and ``broker``."""
        return {"database": await self.db.ping(), "broker": self.bus.ready}

    async def authorize(self, room_id: str, viewer: Viewer) -> None:
        """Raise ``room_not_found`` unless ``viewer`` may see the room (a private room
        must look like no room at all to others)."""
        if not viewer.enforced:
            return
        state = self._cache.get(room_id)
        # The cached room is current only if no change has begun since (another
        # process may have made it private).
        if state is not None and state.version == (await self.bus.changes(room_id))[0]:
            room = state.room
        else:
            async with self.db.read() as session:
                room = await load_room(MessageStore(session), room_id)
        if not viewer.can_see(room):
            raise room_not_found(room_id)

    async def join(
        self, room_id: str, after: int | None = None, viewer: Viewer = OPEN
    ) -> tuple[protocol.Frame, Subscriber]:
        """Subscribe to a room; returns the first frame for the client and the
        subscription.

        A new client (``after`` None) gets ``ready``: the active branch, with the text
        so far of a running answer, as of the newest event id; every later event
        follows exactly once. A client coming back after event ``after`` gets
        ``resumed`` and every event it missed, from the room's log, then live ones; or,
        when the log no longer has them all, ``resync`` (like ``ready``).

        The snapshot and the subscription are taken together under the room lock, and
        the live text of a running answer is read in the same step as subscribing.

        Access is checked once this process listens to the room: a change committed
        before is seen here, and one announced after reaches the subscription (see
        :meth:`_room_frame`).
        """
        subscriber = self.hub.subscribe(room_id, viewer)  # from here on, nothing is missed
        try:
            await self.bus.listen(room_id)
            await self.authorize(room_id, viewer)
            if after is not None:
                missed = await self.bus.replay(room_id, after)
                # Tokens are merged in the queue; other events each take a slot. A
                # replay that would overflow the queue at once is better as a resync.
                if missed is not None and (
                    sum(event.frame["type"] != "token" for event in missed)
                    <= self.hub.queue_limit // 2
                ):
                    subscriber.begin(missed, missed[-1].event_id if missed else after)
                    return protocol.resumed_frame(room_id, after, len(missed)), subscriber
            async with self._lock(room_id):
                room, branch, messages, position = await self._snapshot(room_id)
                earlier = len(messages) < len(branch)
                if not viewer.can_see(room):  # changed since authorize()
                    raise room_not_found(room_id)
                if self._cache.get(room_id) is None:
                    # Someone is about to chat here: spare their first send the reads.
                    self._remember(room, branch, position.begun)
            subscriber.begin([], position.last_event_id)
        except BaseException:
            self.leave(subscriber)
            raise
        live = position.live
        if live is not None:
            for message in messages:
                if message["id"] == live["message_id"]:
                    message["content"] = live["text"]
        ready = protocol.ready_frame(
            room.to_dict(),
            messages,
            live,
            position.last_event_id,
            resync=after is not None,
            earlier=earlier,
        )
        return ready, subscriber

    async def _snapshot(
        self, room_id: str
    ) -> tuple[Room, list[Message], list[dict[str, Any]], Position]:
        """The room, its active branch (and the views of its newest messages, up to
        ``GATEWAY_READY_MAX_BYTES``) from the database, and the bus's position, all
        as of the same change: retried while a change is between its commit and its
        publication (possibly on another process)."""
        for attempt in range(SNAPSHOT_TRIES):
            begun, ended = await self.bus.changes(room_id)
            async with self.db.read() as session:
                store = MessageStore(session)
                room = await load_room(store, room_id)
                branch = await store.branch(room.active_leaf_id)
                shown = newest_within(branch, self.settings.ready_max_bytes)
                messages = await store.views(room_id, shown)
            position = await self.bus.position(room_id)
            if begun == ended and (position.begun, position.ended) == (begun, ended):
                break
            await asyncio.sleep(0.002 * 2**attempt)
        else:
            log.warning("room %s: a change seems stuck; snapshot taken as it is", room_id)
        return room, branch, messages, position

    async def watch(self, room_id: str, viewer: Viewer = OPEN) -> Subscriber:
        """Subscribe to a room's events from now on, with no first frame: for a client
        about to start a generation and follow just that one (``viewer`` was allowed
        in by :meth:`authorize`)."""
        subscriber = self.hub.subscribe(room_id, viewer)
        try:
            await self.bus.listen(room_id)
        except BaseException:
            self.leave(subscriber)
            raise
        subscriber.begin([], 0)
        return subscriber

    def leave(self, subscriber: Subscriber) -> None:
        if self.hub.unsubscribe(subscriber):
            self.bus.forget(subscriber.room_id)

    # --- sending -------------------------------------------------------------------

    async def send(
        self,
        room_id: str,
        content: str,
        client_id: str | None = None,
        sender: str = "anonymous",
    ) -> tuple[dict[str, Any], Started | None]:
        """Store a user message and start answering it.

        Returns the stored message and the generation started for it; None for a
        duplicate (a retry with a ``client_id`` already used in this room: nothing new
        is stored or generated).
        Raises ``Busy`` while the room is generating: queued messages would reach
        the model out of order with the answers, so the client retries instead; and
        ``RateLimited`` when ``sender`` (or the room) is over a quota, and
        ``input_rejected`` when the message fails the room's checks. Either way
        nothing is stored.
        """
        if not content.strip():
            raise BadRequest("message content is empty", code="empty_message")
        if len(content) > self.settings.max_message_chars:
            raise BadRequest(
                f"message has {len(content)} characters; the limit is "
                f"{self.settings.max_message_chars}",
                code="message_too_long",
            )
        async with self._lock(room_id):
            if client_id is not None:
                async with self.db.read() as session:
                    store = MessageStore(session)
                    await load_room(store, room_id)
                    existing = await store.by_client_id(room_id, client_id)
                    if existing is not None:
                        return await store.message_view(existing), None
            generation_id = new_id("gen")
            async with self._claimed(room_id, generation_id) as version:
                state = await self._state(room_id, version)
                room = state.room
                await self._check_input(room, content)
                await self._admit(sender, room_id)
                now = utcnow()
                user = Message(
                    id=new_id("msg"),
                    room_id=room_id,
                    parent_id=room.active_leaf_id,
                    role="user",
                    content=content,
                    status="complete",
                    client_id=client_id,
                    created_at=now,
                    updated_at=now,
                )
                async with (
                    self._releasing_on_error(sender),
                    self.bus.changing(room_id) as changed,
                ):
                    generation = self._plan(
                        room,
                        [*state.branch, user],
                        [],
                        generation_id,
                        temperature=None,
                        sender=sender,
                    )
                    answer = generation.answer
                    await self.writer.write(
                        WriteBatch(
                            inserts=[message_row(user), message_row(answer)],
                            leaves={room_id: answer.id},
                        )
                    )
                    state.branch = self._trimmed(room, [*state.branch, user, answer])
                    state.version = changed
                    room.active_leaf_id = answer.id
                    user_view = user.to_dict()
                    self.bus.publish(room_id, protocol.message_frame(user_view, client_id))
                    return user_view, self._launch(generation)

    async def regenerate(
        self,
        room_id: str,
        message_id: str,
        temperature: float | None = None,
        sender: str = "anonymous",
    ) -> Started:
        """Answer the same user message again as a new sibling."""
        generation_id = new_id("gen")
        async with self._lock(room_id), self._claimed(room_id, generation_id):
            async with self.db.read() as session:
                store = MessageStore(session)
                room, target = await load_message(store, room_id, message_id)
                if target.role != "assistant" or target.parent_id is None:
                    raise BadRequest(
                        "only an assistant message can be regenerated", code="invalid_target"
                    )
                await self._admit(sender, room_id)
                history = await store.branch(target.parent_id)
                branch = await store.views(room_id, history)
                siblings = await store.sibling_ids(room_id, target.parent_id, "assistant")
            async with self._releasing_on_error(sender), self.bus.changing(room_id) as version:
                generation = self._plan(
                    room, history, siblings, generation_id, temperature=temperature, sender=sender
                )
                answer = generation.answer
                await self.writer.write(
                    WriteBatch(inserts=[message_row(answer)], leaves={room_id: answer.id})
                )
                room.active_leaf_id = answer.id
                self._remember(room, [*history, answer], version)
                branch.append(generation.message_view)
                self.bus.publish(room_id, protocol.branch_frame(branch, answer.id))
                return self._launch(generation)

    async def select(self, room_id: str, message_id: str) -> list[dict[str, Any]]:
        """Make the branch through ``message_id`` (down to its newest leaf) active."""
        async with self._lock(room_id), self._claimed(room_id, new_id("select"), cancellable=False):
            async with self.db.read() as session:
                store = MessageStore(session)
                room, target = await load_message(store, room_id, message_id)
                leaf = await store.newest_leaf_under(target)
                messages = await store.branch(leaf)
                branch = await store.views(room_id, messages)
            async with self.bus.changing(room_id) as version:
                await self.writer.write(WriteBatch(leaves={room_id: leaf}))
                room.active_leaf_id = leaf
                self._remember(room, messages, version)
                self.bus.publish(room_id, protocol.branch_frame(branch, leaf))
        return branch

    async def cancel(self, room_id: str, generation_id: str | None = None) -> str:
        """Stop the room's running generation; returns its id.

        The partial answer is stored with status ``cancelled`` and announced with a
        ``cancelled`` frame by the generation itself.
        """
        generation = self._running.get(room_id)
        if generation is not None and generation_id in (None, generation.id):
            if generation.stop("cancelled"):
                return generation.id
        elif generation is None:  # perhaps running on another process
            asked = await self.leases.request_cancel(room_id, generation_id)
            if asked is not None:
                return asked
        async with self.db.read() as session:
            store = MessageStore(session)
            await load_room(store, room_id)
            if generation_id is None:
                raise Conflict("nothing is being generated in this room", code="not_running")
            known = await store.by_generation_id(room_id, generation_id)
        if known is None:
            raise NotFound(f"no generation with id {generation_id!r}", code="generation_not_found")
        raise Conflict(f"generation {generation_id!r} has already ended", code="not_running")

    async def close_room(self, room_id: str) -> None:
        """Stop the room's generation and disconnect its members (room deleted)."""
        generation = self._running.get(room_id)
        if generation is not None:
            generation.stop("cancelled")
            await generation.wait()
        else:
            await self.leases.request_cancel(room_id, None)
        self._cache.drop(room_id)
        await self.bus.close_room(
            room_id,
            protocol.error_frame(NotFound("this room was deleted", code="room_deleted")),
        )

    async def drain(self, flush_timeout: float = DRAIN_FLUSH_SECONDS) -> None:
        """The server is stopping (called before it stops serving): end every running
        answer as ``interrupted`` — each stores its text and publishes its ``error``
        frame — then let every stream send what it has queued and end (a WebSocket
        closes with 1012); streams that cannot within ``flush_timeout`` seconds (a
        client that stopped reading) are cut. Nothing new starts from here on."""
        self._draining = True
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
        self.hub.stop()
        if not await self.hub.emptied(flush_timeout):
            log.info("shutdown: cutting the streams that did not end in time")
            self.hub.cut()

    async def shutdown(self) -> None:
        """Stop every generation, storing its text as ``interrupted``."""
        generations = list(self._running.values())
        for generation in generations:
            generation.stop("interrupted")
        await asyncio.gather(*(g.wait() for g in generations))
        for task in list(self._access_checks):
            task.cancel()
        if self._checkpointer is not None:
            # Also a flag: a cancellation that some library swallows (seen with
            # redis-py) must not keep the loop, and so the shutdown, going forever.
            self._closing = True
            self._checkpointer.cancel()
            await asyncio.gather(self._checkpointer, return_exceptions=True)

    # --- internals -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _claimed(
        self, room_id: str, generation_id: str, *, cancellable: bool = True
    ) -> AsyncIterator[int]:
        """Hold the room's lease for ``generation_id``, yielding the room's change
        count; raises ``Busy`` while another generation holds it. Released on leaving,
        unless the generation was launched (it releases the lease when it ends).
        A cancel that comes meanwhile (from any process) is applied at launch."""
        if cancellable:  # before claiming: a cancel may come back at once
            self._unlaunched[room_id] = generation_id
        try:
            version = await self.leases.claim(room_id, generation_id, cancellable=cancellable)
            if version is None:
                raise Busy("the room is generating; wait for the answer to end, or cancel it")
            try:
                yield version
            finally:
                running = self._running.get(room_id)
                if running is None or running.id != generation_id:
                    self.leases.release(room_id, generation_id)
        finally:
            if self._unlaunched.get(room_id) == generation_id:
                del self._unlaunched[room_id]
            self._cancel_at_launch.discard(generation_id)

    async def _check_input(self, room: Room, content: str) -> None:
        """Run the room's input checks, then its moderation, on a user message."""
        checks = self._checks(room)
        if checks is not None:
            await check_input(checks, content)
        moderator = self._moderator(room)
        if moderator is not None:
            rejected(await moderator.check(content), "input_rejected", "message")

    def _check_names(self, room: Room) -> list[str]:
        return room.checks if room.checks is not None else self.settings.checks

    def _moderator(self, room: Room) -> Moderator | None:
        """The moderation endpoint, when the room's checks include ``moderation``."""
        if "moderation" not in self._check_names(room):
            return None
        if self.moderator is None:
            log.warning("room %s asks for moderation, but none is configured", room.id)
        return self.moderator

    def _checks(self, room: Room) -> CheckPipeline | None:
        """The room's input/output checks (its own list, else the gateway's), plus a
        secret-leak rule when its system prompt is secret; None when there are none."""
        pipeline = build_pipeline(
            [name for name in self._check_names(room) if name not in ("secret_leak", "moderation")],
            max_chars=self.settings.max_message_chars,
        )
        checks = list(pipeline.checks)
        if self._has_secret(room):
            # Also blocks a copied run of the prompt, not only the whole of it: by the
            # time all of it has streamed, it has leaked.
            checks.append(
                SecretLeak(
                    room.system_prompt,
                    fragment_chars=SECRET_FRAGMENT_CHARS,
                    output_every=CHECK_EVERY,  # on every check: text is held back for it
                )
            )
        return CheckPipeline(checks) if checks else None

    @staticmethod
    def _has_secret(room: Room) -> bool:
        return room.secret_prompt and bool(room.system_prompt.strip())

    def _plan(
        self,
        room: Room,
        history: list[Message],
        siblings: list[str],
        generation_id: str,
        *,
        temperature: float | None,
        sender: str,
    ) -> GenerationTask:
        """The task to answer, with its streaming assistant message (not stored yet).

        ``history`` is the branch from the first message down to the user message
        being answered; ``siblings`` the ids of earlier answers to it; ``sender`` who
        asked (its concurrent-generation quota is released when the task ends).
        """
        settings = self.settings
        if temperature is None:
            temperature = room.temperature
        params = {
            "model": room.model or settings.default_model or self.provider.default_model,
            "temperature": settings.default_temperature if temperature is None else temperature,
            "max_tokens": room.max_tokens or settings.default_max_tokens,
            "context_tokens": room.context_tokens or settings.default_context_tokens,
            "system_prompt": room.system_prompt,
        }
        messages = build_prompt(
            room.system_prompt,
            [Turn(m.role, m.content) for m in history],
            context_tokens=params["context_tokens"],
            max_tokens=params["max_tokens"],
            max_turns=self.settings.max_history_messages,
        )
        now = utcnow()
        answer = Message(
            id=new_id("msg"),
            room_id=room.id,
            parent_id=history[-1].id,
            role="assistant",
            content="",
            status="streaming",
            generation_id=generation_id,
            params=params,
            created_at=now,
            updated_at=now,
        )
        return GenerationTask(
            generation_id=generation_id,
            room_id=room.id,
            answer=answer,
            message_view=answer.to_dict([*siblings, answer.id]),
            request=CompletionRequest(
                model=params["model"],
                messages=messages,
                temperature=params["temperature"],
                max_tokens=params["max_tokens"],
            ),
            provider=self.provider,
            checks=self._checks(room),
            moderator=self._moderator(room),
            writer=self.writer,
            bus=self.bus,
            room_lock=self._lock(room.id),
            on_exit=self._on_generation_exit,
            sender=sender,
            hold_back=SECRET_HOLD_BACK_CHARS if self._has_secret(room) else 0,
        )

    async def _admit(self, sender: str, room_id: str) -> None:
        """Count a message of ``sender`` and hold one of its concurrent generations
        (released when the generation ends, or by :meth:`_releasing_on_error`).
        Raises ``server_restarting`` once the server is stopping (see :meth:`drain`)."""
        if self._draining:
            raise Stopping("the gateway is restarting; send again in a moment")
        await self.quotas.admit_message(sender, room_id)
        self.quotas.start_generation(sender)

    @contextlib.asynccontextmanager
    async def _releasing_on_error(self, sender: str) -> AsyncIterator[None]:
        """Give back the generation :meth:`_admit` held if it never starts."""
        try:
            yield
        except BaseException:
            self.quotas.end_generation(sender)
            raise

    def _launch(self, generation: GenerationTask) -> Started:
        """Publish ``start`` and run the generation (caller holds the room lock)."""
        self._running[generation.room_id] = generation
        self.bus.publish(
            generation.room_id, protocol.start_frame(generation.id, generation.message_view)
        )
        generation.start()
        if generation.id in self._cancel_at_launch:
            generation.stop("cancelled")  # it ends at once, stored and announced
        return Started(generation.id, generation.message_id)

    def _on_generation_exit(self, generation: GenerationTask) -> None:
        if self._running.get(generation.room_id) is generation:
            del self._running[generation.room_id]
        self.leases.release(generation.room_id, generation.id)
        self.quotas.end_generation(generation.sender)

    def _stop_requested(
        self, room_id: str, generation_id: str, why: Literal["cancelled", "lost"]
    ) -> None:
        """A client asked to cancel a generation of this process, or another process
        took it over. A cancel of a generation claimed but not launched yet is kept
        for its launch: the client asked before seeing it start, and means it."""
        generation = self._running.get(room_id)
        if generation is not None and generation.id == generation_id:
            generation.stop(why)
        elif why == "cancelled" and self._unlaunched.get(room_id) == generation_id:
            self._cancel_at_launch.add(generation_id)

    async def _adopt(self, orphan: Orphan) -> None:
        """End a generation whose process died: store what it had published as
        ``interrupted``, and tell the room (its members may regenerate)."""
        room_id = orphan.room_id
        try:
            async with self._lock(room_id), self.bus.changing(room_id):
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
                self.bus.publish(
                    room_id,
                    protocol.error_frame(error, generation_id=orphan.generation_id, answer=view),
                )
                self._cache.drop(room_id)
            log.warning(
                "room %s: generation %s lost its process; marked interrupted",
                room_id,
                orphan.generation_id,
            )
        except Exception:
            log.exception("room %s: adopting generation %s failed", room_id, orphan.generation_id)
        finally:
            self.leases.release(room_id, orphan.generation_id)

    async def _checkpoint_loop(self) -> None:
        """Every interval, save the text of all running answers in one write (then look
        for generations whose process died, and now and then let the event logs forget
        what is too old to replay)."""
        loop = asyncio.get_running_loop()
        interval = self.settings.checkpoint_interval
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


async def load_message(store: MessageStore, room_id: str, message_id: str) -> tuple[Room, Message]:
    """The room and one of its messages, or ``room_not_found``/``message_not_found``."""
    room = await load_room(store, room_id)
    message = await store.message(room_id, message_id)
    if message is None:
        raise message_not_found(message_id)
    return room, message


async def load_room(store: MessageStore, room_id: str) -> Room:
    """The room, or ``room_not_found``."""
    room = await store.room(room_id)
    if room is None:
        raise room_not_found(room_id)
    return room
