"""Conversation use cases: send a message, edit one (a new version of it, answered
as a new branch), regenerate an answer, select a branch, hide a message (the room
owner's moderation), cancel the running answer.

Every change that clients see is committed first and published second, under the
room's lock and inside the event bus's
:meth:`~gateway.broker.base.EventBus.changing` bracket (see :mod:`gateway.joining`
for why). Reads use read sessions; writes go
through the group-committing :class:`~gateway.store.writer.Writer`, one batch per
change.

A send is the hot path. With the room's state cached and current it reads nothing
from the database: the persona and the branch come from the
:class:`~gateway.roomstate.RoomState`, and so does a retried message (the same
``client_id``) while it is in the cached part of the branch. Any other retry is caught
by the database: ``(room_id, client_id)`` is unique, so storing it again fails, and
only then is the stored one read. Screening the message (checks, moderation: slow)
runs while the send holds the room's lease (one send or answer at a time, on every
process), but before it takes the room's lock, which joins and other changes wait for.
A cancel that comes meanwhile is kept, and the answer ends as ``cancelled`` as it
starts (see :mod:`gateway.generations`). Selecting a branch holds the lease too, but
as nothing to cancel.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from operator import attrgetter, itemgetter
from typing import Any

from gateway import protocol
from gateway.access import OPEN, Viewer
from gateway.broker.base import EventBus
from gateway.errors import BadRequest, Busy, Conflict, Forbidden, NotFound
from gateway.generations import GenerationRegistry, Started
from gateway.people import Person
from gateway.planning import Defaults, plan
from gateway.roomstate import DEFAULT_PAGE, Page, RoomCache, RoomLocks, RoomState, Snapshot
from gateway.screening import Screening
from gateway.store.db import Database
from gateway.store.models import Message, Room, message_row, new_id, utcnow
from gateway.store.repository import MessageStore, load_message, load_room
from gateway.store.writer import WriteBatch, Writer
from gateway.tracing import NO_TRACING, AnswerTrace, Tracing


class _AlreadySent(Exception):
    """The message being sent was stored before (found on storing it again)."""

    def __init__(self, view: dict[str, Any]) -> None:
        self.view = view


class Sending:
    """What members do in a room: send, edit, regenerate, select, hide, cancel."""

    def __init__(
        self,
        *,
        db: Database,
        writer: Writer,
        bus: EventBus,
        cache: RoomCache,
        locks: RoomLocks,
        generations: GenerationRegistry,
        screening: Screening,
        defaults: Defaults,
        max_message_chars: int,
        page: Page = DEFAULT_PAGE,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.db = db
        self.writer = writer
        self.bus = bus
        self.cache = cache
        self.locks = locks
        self.generations = generations
        self.screening = screening
        self.defaults = defaults
        self.max_message_chars = max_message_chars
        self.page = page
        self.tracing = tracing
        # Reads of a branch stop at what a prompt may use and a frame shows.
        self.depth = max(defaults.max_history_messages, page.messages)

    async def send(
        self,
        room_id: str,
        content: str,
        client_id: str | None = None,
        sender: str = "anonymous",
        author: Person | None = None,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> tuple[dict[str, Any], Started | None]:
        """Store a user message and start answering it (with ``temperature`` instead of
        the room's, and at most ``max_tokens``, when given: see :func:`plan`).

        Returns the stored message and the generation started for it; None for a
        duplicate (a retry with a ``client_id`` already used in this room: nothing new
        is stored or generated).
        Raises ``Busy`` while the room is generating: queued messages would reach
        the model out of order with the answers, so the client retries instead; and
        ``RateLimited`` when ``sender`` (or the room) is over a quota, and
        ``input_rejected`` when the message fails the room's checks. Either way
        nothing is stored.
        """
        self._check_content(content)
        if client_id is not None and (known := await self._known(room_id, client_id)):
            return known, None
        room = await self._room(room_id)
        generation_id = new_id("gen")
        async with contextlib.AsyncExitStack() as held:
            trace = held.enter_context(self.tracing.answer("send", room_id, generation_id))
            try:
                claim = self.generations.claimed(room_id, generation_id)
                version = await held.enter_async_context(claim)
            except Busy:
                # Perhaps answering this very message (sent to another process).
                if client_id is not None and (stored := await self._stored(room_id, client_id)):
                    return stored, None
                raise
            while True:
                # Slow: under the room's lease (one send at a time), not its lock.
                with trace.step("checks.input"):
                    await self.screening.check_message(room, content)
                async with self.locks(room_id):
                    state = await self._state(room_id, version)
                    if client_id is not None and (message := state.sent(client_id)) is not None:
                        return message.to_dict(), None
                    if self.screening.rules_of(state.room) != self.screening.rules_of(room):
                        room = state.room  # its checks changed meanwhile: screen it again
                        continue
                    try:
                        return await self._send(
                            state,
                            content,
                            client_id,
                            sender,
                            author,
                            generation_id,
                            trace,
                            temperature=temperature,
                            max_tokens=max_tokens,
                        )
                    except _AlreadySent as already:
                        return already.view, None

    def _check_content(self, content: str) -> None:
        if not content.strip():
            raise BadRequest("message content is empty", code="empty_message")
        if len(content) > self.max_message_chars:
            raise BadRequest(
                f"message has {len(content)} characters; the limit is {self.max_message_chars}",
                code="message_too_long",
            )

    async def _send(
        self,
        state: RoomState,
        content: str,
        client_id: str | None,
        sender: str,
        author: Person | None,
        generation_id: str,
        trace: AnswerTrace,
        *,
        temperature: float | None,
        max_tokens: int | None,
    ) -> tuple[dict[str, Any], Started]:
        """Store the screened message and its streaming answer, publish the message
        and launch the answer (the caller holds the room's lock and lease)."""
        room = state.room
        await self.generations.admit(sender, room.id)
        now = utcnow()
        user = _user_message(room.id, room.active_leaf_id, content, client_id, author, now)
        async with (
            self.generations.releasing_on_error(sender),
            self.bus.changing(room.id) as changed,
        ):
            planned = plan(
                room,
                [*state.branch, user],
                self.defaults,
                generation_id=generation_id,
                message_id=new_id("msg"),
                now=now,
                temperature=temperature,
                max_tokens=max_tokens,
            )
            answer = planned.answer
            batch = WriteBatch(
                inserts=[message_row(user), message_row(answer)], leaves={room.id: answer.id}
            )
            try:
                with trace.step("store.write", **{"gateway.store.what": "message"}):
                    await self.writer.write(batch)
            except Conflict:
                # The unique (room_id, client_id): sent before, beyond what is cached.
                if client_id is not None and (stored := await self._stored(room.id, client_id)):
                    raise _AlreadySent(stored) from None
                raise
            user_view = user.to_dict()
            view = answer.to_dict([answer.id])
            state.extend(user, answer, views=[user_view, view])
            state.version = changed
            room.active_leaf_id = answer.id
            self.bus.publish(room.id, protocol.message_frame(user_view, client_id))
            return user_view, self.generations.launch(
                room, generation_id, view, planned.request, sender, trace
            )

    async def regenerate(
        self,
        room_id: str,
        message_id: str,
        temperature: float | None = None,
        sender: str = "anonymous",
    ) -> Started:
        """Answer the same user message again as a new sibling."""
        generation_id = new_id("gen")
        with self.tracing.answer("regenerate", room_id, generation_id) as trace:
            async with self.locks(room_id), self.generations.claimed(room_id, generation_id):
                async with self.db.read() as session:
                    store = MessageStore(session)
                    room, target = await load_message(store, room_id, message_id)
                    if target.role != "assistant" or target.parent_id is None:
                        raise BadRequest(
                            "only an assistant message can be regenerated",
                            code="invalid_target",
                        )
                    await self.generations.admit(sender, room_id)
                    history, shown = await self._branch(store, room_id, target.parent_id)
                    siblings = await store.sibling_ids(room_id, target.parent_id, "assistant")
                _, started = await self._fork(
                    room, history, shown, None, siblings, generation_id, sender, trace, temperature
                )
                return started

    async def edit(
        self,
        room_id: str,
        message_id: str,
        content: str,
        *,
        author: Person,
        viewer: Viewer = OPEN,
        client_id: str | None = None,
        sender: str = "anonymous",
    ) -> tuple[dict[str, Any], Started | None]:
        """Send ``content`` as a new version of the user message ``message_id`` (a
        sibling: the old one and everything under it are kept) and answer it; the new
        branch becomes the room's active one. Only the message's author may, or the
        room's owner (with API keys: without them there are no owners to trust).

        Returns the new message and its generation; None for a retry (a
        ``client_id`` already used in the room: nothing new is stored).
        """
        self._check_content(content)
        if client_id is not None and (stored := await self._stored(room_id, client_id)):
            return stored, None
        async with self.db.read() as session:
            screened, target = await load_message(MessageStore(session), room_id, message_id)
        _check_editable(screened, target, author, viewer)
        generation_id = new_id("gen")
        with self.tracing.answer("edit", room_id, generation_id) as trace:
            async with self.generations.claimed(room_id, generation_id):
                with trace.step("checks.input"):  # slow: outside the lock
                    await self.screening.check_message(screened, content)
                async with self.locks(room_id):
                    async with self.db.read() as session:
                        store = MessageStore(session)
                        room, target = await load_message(store, room_id, message_id)
                        _check_editable(room, target, author, viewer)
                        if self.screening.rules_of(room) != self.screening.rules_of(screened):
                            with trace.step("checks.input"):  # the checks changed meanwhile
                                await self.screening.check_message(room, content)
                        await self.generations.admit(sender, room_id)
                        history, shown = await self._branch(store, room_id, target.parent_id)
                        siblings = await store.sibling_ids(room_id, target.parent_id, "user")
                    user = _user_message(
                        room_id, target.parent_id, content, client_id, author, utcnow()
                    )
                    try:
                        return await self._fork(
                            room, history, shown, user, siblings, generation_id, sender, trace
                        )
                    except Conflict:
                        if client_id is not None and (
                            stored := await self._stored(room_id, client_id)
                        ):
                            return stored, None  # sent meanwhile with the same id
                        raise

    async def _fork(
        self,
        room: Room,
        history: list[Message],
        shown: Snapshot,
        user: Message | None,
        siblings: list[str],
        generation_id: str,
        sender: str,
        trace: AnswerTrace,
        temperature: float | None = None,
    ) -> tuple[dict[str, Any], Started]:
        """Start a new branch below ``history`` (``shown``: what frames show of it): the new
        version ``user`` of a user message (an edit) if given, and a streaming answer
        (to it, or, a regenerate, to the end of ``history``); ``siblings`` are the
        versions the first new message adds to. Store it, make it the room's active
        branch, publish it and launch the answer (the caller holds the room's lock and
        lease). Returns the first new message's view and the generation."""
        asked = [*history, user] if user is not None else history
        async with (
            self.generations.releasing_on_error(sender),
            self.bus.changing(room.id) as version,
        ):
            planned = plan(
                room,
                asked,
                self.defaults,
                generation_id=generation_id,
                message_id=new_id("msg"),
                now=utcnow(),
                temperature=temperature,
            )
            answer = planned.answer
            added = [answer] if user is None else [user, answer]
            with trace.step("store.write", **{"gateway.store.what": "message"}):
                await self.writer.write(
                    WriteBatch(inserts=[message_row(m) for m in added], leaves={room.id: answer.id})
                )
            room.active_leaf_id = answer.id
            self.cache.remember(room, [*asked, answer], version)
            views = [m.to_dict() for m in added]
            views[0]["siblings"] = [*siblings, added[0].id]
            kept, left_out = self.page.newest([*shown.views, *views], itemgetter("content"))
            frame = protocol.branch_frame(kept, answer.id, earlier=shown.earlier or left_out)
            self.bus.publish(room.id, frame)
            launched = self.generations.launch(
                room, generation_id, views[-1], planned.request, sender, trace
            )
            return views[0], launched

    async def hide(
        self, room_id: str, message_id: str, hidden: bool = True, viewer: Viewer = OPEN
    ) -> dict[str, Any]:
        """Hide a message from the room (or show it again): the room owner's
        moderation. It is kept, but its content is served to nobody else and the
        model gets a placeholder instead. Returns the owner's view of it."""
        async with self.locks(room_id), self.bus.changing(room_id):
            async with self.db.transaction() as session:
                store = MessageStore(session)
                room, message = await load_message(store, room_id, message_id)
                if not viewer.owns(room):
                    raise Forbidden(
                        "only the room's owner may hide a message", code="not_room_owner"
                    )
                if message.status == "streaming":
                    raise Conflict("this answer is still streaming: cancel it first", code="busy")
                message.hidden = hidden
                await session.flush()
                versions = (await store.siblings(room_id, [message])).get(message.id)
                public = message.to_dict(versions)
                view = message.to_dict(versions, reveal_hidden=True)
            self.cache.drop(room_id)  # committed: views and prompts read it again
            self.bus.publish(room_id, protocol.hidden_frame(public))
        return view

    async def select(self, room_id: str, message_id: str) -> Snapshot:
        """Make the branch through ``message_id`` (down to its newest leaf) active
        (holding the room's lease, as nothing to cancel: a cancel meanwhile gets
        ``not_running``)."""
        async with (
            self.locks(room_id),
            self.generations.claimed(room_id, new_id("select"), cancellable=False),
        ):
            async with self.db.read() as session:
                store = MessageStore(session)
                room, target = await load_message(store, room_id, message_id)
                leaf = await store.newest_leaf_under(target)
                messages, shown = await self._branch(store, room_id, leaf)
            async with self.bus.changing(room_id) as version:
                await self.writer.write(WriteBatch(leaves={room_id: leaf}))
                room.active_leaf_id = leaf
                self.cache.remember(room, messages, version)
                self.bus.publish(
                    room_id, protocol.branch_frame(shown.views, leaf, earlier=shown.earlier)
                )
        return shown

    async def cancel(self, room_id: str, generation_id: str | None = None) -> str:
        """Stop the room's running generation; returns its id.

        The partial answer is stored with status ``cancelled`` and announced with a
        ``cancelled`` frame by the generation itself.
        """
        stopped = await self.generations.stop(room_id, generation_id)
        if stopped is not None:
            return stopped
        async with self.db.read() as session:
            store = MessageStore(session)
            await load_room(store, room_id)
            if generation_id is None:
                raise Conflict("nothing is being generated in this room", code="not_running")
            known = await store.by_generation_id(room_id, generation_id)
        if known is None:
            raise NotFound(f"no generation with id {generation_id!r}", code="generation_not_found")
        raise Conflict(f"generation {generation_id!r} has already ended", code="not_running")

    # --- the room's state ----------------------------------------------------------

    async def _room(self, room_id: str) -> Room:
        """The room to screen a message for: as cached (checked again once the room's
        lock is held), else read."""
        state = self.cache.get(room_id)
        if state is not None:
            return state.room
        async with self.db.read() as session:
            return await load_room(MessageStore(session), room_id)

    async def _branch(
        self, store: MessageStore, room_id: str, leaf_id: str | None
    ) -> tuple[list[Message], Snapshot]:
        """The newest messages of the branch ending at ``leaf_id`` that a prompt may use
        (oldest first), and what frames show of them."""
        history = await store.branch(leaf_id, self.depth)
        shown, _ = self.page.newest(history, attrgetter("content"))
        earlier = bool(shown) and shown[0].parent_id is not None
        return history, Snapshot(await store.views(room_id, shown), earlier)

    async def _state(self, room_id: str, version: int) -> RoomState:
        """The room's state as of change ``version``: cached, or read when not cached
        or older (another process changed the room). Caller holds the room's lock."""
        state = self.cache.get(room_id)
        if state is None or state.version != version:
            async with self.db.read() as session:
                store = MessageStore(session)
                room = await load_room(store, room_id)
                branch = await store.branch(room.active_leaf_id, self.depth)
            state = self.cache.remember(room, branch, version)
        return state

    async def _known(self, room_id: str, client_id: str) -> dict[str, Any] | None:
        """The message already sent with ``client_id``, when the cached state has it and
        is current (the room may have been deleted on another process since)."""
        state = self.cache.get(room_id)
        message = state.sent(client_id) if state is not None else None
        if message is None or state is None:
            return None
        if state.version != (await self.bus.changes(room_id))[0]:
            return None
        return message.to_dict()

    async def _stored(self, room_id: str, client_id: str) -> dict[str, Any] | None:
        """The message already sent with ``client_id``, from the database."""
        async with self.db.read() as session:
            store = MessageStore(session)
            await load_room(store, room_id)
            existing = await store.by_client_id(room_id, client_id)
            return await store.message_view(existing) if existing is not None else None


def _user_message(
    room_id: str,
    parent_id: str | None,
    content: str,
    client_id: str | None,
    author: Person | None,
    now: datetime,
) -> Message:
    return Message(
        id=new_id("msg"),
        room_id=room_id,
        parent_id=parent_id,
        role="user",
        content=content,
        status="complete",
        client_id=client_id,
        author_id=author.id if author is not None else None,
        author_name=author.name if author is not None else None,
        hidden=False,
        created_at=now,
        updated_at=now,
    )


def _check_editable(room: Room, target: Message, author: Person, viewer: Viewer) -> None:
    """Raise unless ``author`` may edit ``target``: a user message of theirs, or any
    one for the room's owner (only with API keys: without, there is no owner)."""
    if target.role != "user":
        raise BadRequest("only a user message can be edited", code="invalid_target")
    if target.author_id == author.id or (viewer.enforced and viewer.owns(room)):
        return
    raise Forbidden("only the message's author or the room's owner may edit it", code="not_author")
