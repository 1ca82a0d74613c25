"""Queries over rooms and messages. Functions flush, never commit: the caller owns the
transaction (see :meth:`gateway.store.db.Database.transaction`). What clients asked for
and is not there is ``room_not_found``/``message_not_found`` (:func:`load_room`)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence

from sqlalchemy import insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import NotFound
from gateway.store.models import Message, Room, RoomGrant


class MessageStore:
    """Room and message queries bound to one session (one unit of work)."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- rooms ---------------------------------------------------------------------

    async def add_room(self, room: Room) -> None:
        self.session.add(room)
        await self.session.flush()

    async def room(self, room_id: str) -> Room | None:
        return await self.session.get(Room, room_id)

    async def rooms(
        self, *, limit: int, offset: int, visible_to: str | None = None
    ) -> Sequence[Room]:
        """Rooms, the last active first. With ``visible_to`` (a key name, access
        enforced), only public rooms and the private ones that key owns or was granted."""
        order = (Room.updated_at.desc(), Room.id)
        query = select(Room).order_by(*order).limit(limit).offset(offset)
        if visible_to is not None:
            granted = select(RoomGrant.room_id).where(RoomGrant.key_name == visible_to)
            query = query.where(
                Room.private.is_(False) | (Room.owner == visible_to) | Room.id.in_(granted)
            )
        return (await self.session.scalars(query)).all()

    async def delete_room(self, room: Room) -> None:
        await self.session.delete(room)
        await self.session.flush()

    # --- messages ------------------------------------------------------------------

    async def message(self, room_id: str, message_id: str) -> Message | None:
        message = await self.session.get(Message, message_id)
        return message if message is not None and message.room_id == room_id else None

    async def by_client_id(self, room_id: str, client_id: str) -> Message | None:
        query = select(Message).where(Message.room_id == room_id, Message.client_id == client_id)
        return (await self.session.scalars(query)).first()

    async def branch(self, leaf_id: str | None, limit: int | None = None) -> list[Message]:
        """The messages from the root to ``leaf_id``, oldest first: all of them, or the
        newest ``limit`` (one recursive query that stops walking up at ``limit``, so a
        long room costs what the page does)."""
        if leaf_id is None or limit == 0:
            return []
        chain = (
            select(Message.id, Message.parent_id, literal(0).label("depth"))
            .where(Message.id == leaf_id)
            .cte("chain", recursive=True)
        )
        step = select(Message.id, Message.parent_id, (chain.c.depth + 1).label("depth")).join(
            chain, Message.id == chain.c.parent_id
        )
        if limit is not None:
            step = step.where(chain.c.depth < limit - 1)
        chain = chain.union_all(step)
        query = select(Message).join(chain, Message.id == chain.c.id).order_by(chain.c.depth.desc())
        return list((await self.session.scalars(query)).all())

    async def page(self, leaf_id: str | None, limit: int) -> tuple[list[Message], bool]:
        """The newest ``limit`` messages of the branch ending at ``leaf_id``, oldest
        first, and whether older ones are left out."""
        messages = await self.branch(leaf_id, limit + 1)
        return (messages[1:], True) if len(messages) > limit else (messages, False)

    async def tree(self, room_id: str) -> list[Message]:
        """Every message of the room, every branch, oldest first."""
        query = (
            select(Message)
            .where(Message.room_id == room_id)
            .order_by(Message.created_at, Message.id)
        )
        return list((await self.session.scalars(query)).all())

    async def add_messages(self, rows: Sequence[dict]) -> None:
        """Insert messages (column values: :func:`~gateway.store.models.message_row`),
        parents first, in one statement per batch."""
        if rows:
            await self.session.execute(insert(Message), list(rows))

    async def siblings(self, room_id: str, messages: Sequence[Message]) -> dict[str, list[str]]:
        """For each message: the ids of all versions under the same parent, oldest first."""
        parents = {m.parent_id for m in messages}
        if not parents:
            return {}
        query = (
            select(Message.id, Message.parent_id, Message.role)
            .where(Message.room_id == room_id)
            .order_by(Message.created_at, Message.id)
        )
        non_null = [p for p in parents if p is not None]
        if None in parents:
            query = query.where((Message.parent_id.in_(non_null)) | (Message.parent_id.is_(None)))
        else:
            query = query.where(Message.parent_id.in_(non_null))
        groups: dict[tuple[str | None, str], list[str]] = defaultdict(list)
        for message_id, parent_id, role in (await self.session.execute(query)).all():
            groups[(parent_id, role)].append(message_id)
        return {m.id: groups[(m.parent_id, m.role)] for m in messages}

    async def sibling_ids(self, room_id: str, parent_id: str | None, role: str) -> list[str]:
        """Ids of the messages with ``role`` under ``parent_id``, oldest first."""
        column = Message.parent_id
        parent = column.is_(None) if parent_id is None else column == parent_id
        query = (
            select(Message.id)
            .where(Message.room_id == room_id, parent, Message.role == role)
            .order_by(Message.created_at, Message.id)
        )
        return list((await self.session.scalars(query)).all())

    async def newest_leaf_under(self, message: Message) -> str:
        """Follow the newest child from ``message`` down to a leaf; return its id."""
        current = message.id
        while True:
            query = (
                select(Message.id)
                .where(Message.parent_id == current)
                .order_by(Message.created_at.desc(), Message.id.desc())
                .limit(1)
            )
            child = (await self.session.scalars(query)).first()
            if child is None:
                return current
            current = child

    async def interrupt_streaming(self, except_rooms: Collection[str] = ()) -> int:
        """Mark answers left ``streaming`` by a crash as ``interrupted`` (except in
        ``except_rooms``, where another process is streaming); return how many."""
        statement = update(Message).where(Message.status == "streaming")
        if except_rooms:
            statement = statement.where(Message.room_id.not_in(except_rooms))
        result = await self.session.execute(
            statement.values(
                status="interrupted",
                error={"code": "interrupted", "message": "the gateway stopped mid-answer"},
            )
        )
        return result.rowcount or 0

    async def views(
        self, room_id: str, messages: list[Message], *, reveal_hidden: bool = False
    ) -> list[dict]:
        """``messages`` as wire dicts, each with its siblings (its versions)."""
        siblings = await self.siblings(room_id, messages)
        return [m.to_dict(siblings.get(m.id), reveal_hidden=reveal_hidden) for m in messages]

    async def message_view(self, message: Message) -> dict:
        siblings = await self.siblings(message.room_id, [message])
        return message.to_dict(siblings.get(message.id))

    async def by_generation_id(self, room_id: str, generation_id: str) -> Message | None:
        query = select(Message).where(
            Message.room_id == room_id, Message.generation_id == generation_id
        )
        return (await self.session.scalars(query)).first()


def room_not_found(room_id: str) -> NotFound:
    return NotFound(f"no room with id {room_id!r}", code="room_not_found")


def message_not_found(message_id: str) -> NotFound:
    return NotFound(f"no message with id {message_id!r} in this room", code="message_not_found")


async def load_room(store: MessageStore, room_id: str) -> Room:
    """The room, or ``room_not_found``."""
    room = await store.room(room_id)
    if room is None:
        raise room_not_found(room_id)
    return room


async def load_message(store: MessageStore, room_id: str, message_id: str) -> tuple[Room, Message]:
    """The room and one of its messages, or ``room_not_found``/``message_not_found``."""
    room = await load_room(store, room_id)
    message = await store.message(room_id, message_id)
    if message is None:
        raise message_not_found(message_id)
    return room, message
