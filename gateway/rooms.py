"""Room use cases for the REST API: create, list, read, update, delete, history,
export and import."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from gateway import roomfile
from gateway.access import OPEN, Viewer
from gateway.chat import ChatService
from gateway.errors import BadRequest, Forbidden
from gateway.protocol import RoomCreate, RoomUpdate
from gateway.store.db import Database
from gateway.store.models import Message, Room, RoomGrant, message_row, new_id, utcnow
from gateway.store.repository import MessageStore, load_message, load_room, room_not_found


class RoomService:
    """Rooms and their personas. Persona changes apply from the next generation on.

    Every method takes the :class:`Viewer`: a private room is ``room_not_found`` to
    those who may not see it, and only its owner may change or delete it.
    """

    def __init__(self, db: Database, chat: ChatService) -> None:
        self.db = db
        self.chat = chat

    async def create(self, body: RoomCreate, viewer: Viewer = OPEN) -> dict[str, Any]:
        room = _new_room(body, viewer)
        async with self.db.transaction() as session:
            await MessageStore(session).add_room(room)
            view = room.to_dict(owner_view=True)
        self.chat.room_created(room)  # committed
        return view

    async def export(self, room_id: str, viewer: Viewer = OPEN) -> dict[str, Any]:
        """The whole room as a room file (:mod:`gateway.roomfile`), as ``viewer`` may
        see it: a secret system prompt and hidden messages' content for the owner only."""
        async with self.db.read() as session:
            store = MessageStore(session)
            room = await self._visible(store, room_id, viewer)
            owner = viewer.owns(room)
            views = [m.to_dict(reveal_hidden=owner) for m in await store.tree(room_id)]
            return roomfile.export(room.to_dict(owner_view=owner), views, utcnow())

    async def export_markdown(self, room_id: str, viewer: Viewer = OPEN) -> str:
        """The room's active branch as Markdown."""
        async with self.db.read() as session:
            store = MessageStore(session)
            room = await self._visible(store, room_id, viewer)
            branch = [m.to_dict() for m in await store.branch(room.active_leaf_id)]
            return roomfile.markdown(room.to_dict(owner_view=viewer.owns(room)), branch)

    async def import_room(self, data: Any, viewer: Viewer = OPEN) -> dict[str, Any]:
        """A new room from a room file: new ids, the tree and the active branch kept,
        owned by ``viewer``. Checked whole before anything is stored."""
        file = roomfile.read_import(data)
        try:
            body = RoomCreate(**file.room.model_dump())
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(("room", *map(str, first["loc"])))
            raise BadRequest(f"{where}: {first['msg']}", code="invalid_room_file") from None
        room = _new_room(body, viewer)
        ids = [new_id("msg") for _ in file.messages]
        rows = [
            message_row(_imported_message(room.id, ids, i, imported))
            for i, imported in enumerate(file.messages)
        ]
        leaf = file.active_leaf if file.active_leaf is not None else len(ids) - 1
        room.active_leaf_id = ids[leaf] if ids else None
        async with self.db.transaction() as session:
            store = MessageStore(session)
            await store.add_room(room)
            await store.add_messages(rows)
            view = room.to_dict(owner_view=True)
        return {**view, "messages": len(rows)}

    async def list(
        self, *, limit: int = 100, offset: int = 0, viewer: Viewer = OPEN
    ) -> list[dict[str, Any]]:
        async with self.db.read() as session:
            rooms = await MessageStore(session).rooms(
                limit=limit, offset=offset, visible_to=viewer.key_name if viewer.enforced else None
            )
            return [room.to_dict(owner_view=viewer.owns(room)) for room in rooms]

    async def get(self, room_id: str, viewer: Viewer = OPEN) -> dict[str, Any]:
        """The room, with ``members`` (the people in it, on every process) and
        ``connections`` (the clients connected to it on this process)."""
        async with self.db.read() as session:
            room = await self._visible(MessageStore(session), room_id, viewer)
            view = room.to_dict(owner_view=viewer.owns(room))
        members = (await self.chat.bus.position(room_id)).members
        return {**view, "members": members, "connections": self.chat.hub.members(room_id)}

    async def update(self, room_id: str, body: RoomUpdate, viewer: Viewer = OPEN) -> dict[str, Any]:
        async with self.chat.changing_room(room_id):
            async with self.db.transaction() as session:
                room = await self._owned(MessageStore(session), room_id, viewer)
                if body.name is not None:
                    room.name = body.name
                if body.persona is not None:
                    for field, value in body.persona.model_dump(exclude_unset=True).items():
                        # An explicit null resets a field to the gateway default.
                        setattr(
                            room, field, "" if field == "system_prompt" and value is None else value
                        )
                for flag in ("private", "secret_prompt"):
                    if getattr(body, flag) is not None:
                        setattr(room, flag, getattr(body, flag))
                if "checks" in body.model_fields_set:
                    room.checks = body.checks  # null: back to the gateway's default
                if body.grants is not None:
                    room.grants = [RoomGrant(key_name=name) for name in sorted(set(body.grants))]
                await session.flush()
                view = room.to_dict()
                owner_view = room.to_dict(owner_view=True)
            self.chat.room_changed(room, view)  # committed: announce it
        return owner_view

    async def delete(self, room_id: str, viewer: Viewer = OPEN) -> None:
        async with self.db.read() as session:
            await self._owned(MessageStore(session), room_id, viewer)
        await self.chat.close_room(room_id)
        async with self.db.transaction() as session:
            store = MessageStore(session)
            room = await store.room(room_id)
            if room is not None:
                await store.delete_room(room)

    async def messages(
        self,
        room_id: str,
        viewer: Viewer = OPEN,
        *,
        limit: int,
        before: str | None = None,
        include_hidden: bool = False,
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of a branch, oldest first, with the sibling versions of each message:
        the newest ``limit`` messages of the active branch, or of the messages above
        ``before`` (a message of the room: the page before it, on its branch); and
        whether older ones are left out. With ``include_hidden`` (the owner only),
        hidden messages' content too."""
        async with self.db.read() as session:
            store = MessageStore(session)
            room = await self._visible(store, room_id, viewer)
            self._may_reveal(room, viewer, include_hidden)
            leaf = room.active_leaf_id
            if before is not None:
                leaf = (await load_message(store, room_id, before))[1].parent_id
            messages, earlier = await store.page(leaf, limit)
            return await store.views(room_id, messages, reveal_hidden=include_hidden), earlier

    async def message(
        self, room_id: str, message_id: str, viewer: Viewer = OPEN, *, include_hidden: bool = False
    ) -> dict[str, Any]:
        """One message of the room (on any branch), with its versions."""
        async with self.db.read() as session:
            store = MessageStore(session)
            room = await self._visible(store, room_id, viewer)
            self._may_reveal(room, viewer, include_hidden)
            _, message = await load_message(store, room_id, message_id)
            views = await store.views(room_id, [message], reveal_hidden=include_hidden)
            return views[0]

    @staticmethod
    def _may_reveal(room: Room, viewer: Viewer, include_hidden: bool) -> None:
        if include_hidden and not viewer.owns(room):
            raise Forbidden("only the room's owner may read hidden messages", code="not_room_owner")

    @staticmethod
    async def _visible(store: MessageStore, room_id: str, viewer: Viewer) -> Room:
        room = await load_room(store, room_id)
        if not viewer.can_see(room):
            raise room_not_found(room_id)
        return room

    async def _owned(self, store: MessageStore, room_id: str, viewer: Viewer) -> Room:
        room = await self._visible(store, room_id, viewer)
        if not viewer.owns(room):
            raise Forbidden("only the room's owner may change or delete it", code="not_room_owner")
        return room


def _new_room(body: RoomCreate, viewer: Viewer) -> Room:
    """A new room as ``body`` asks, owned by ``viewer``."""
    persona = body.persona
    return Room(
        id=new_id("room"),
        name=body.name,
        system_prompt=persona.system_prompt or "",
        model=persona.model,
        temperature=persona.temperature,
        max_tokens=persona.max_tokens,
        context_tokens=persona.context_tokens,
        owner=viewer.key_name,
        private=body.private,
        secret_prompt=body.secret_prompt,
        grants=[RoomGrant(key_name=name) for name in sorted(set(body.grants))],
        checks=body.checks,
    )


def _imported_message(
    room_id: str, ids: list[str], index: int, imported: roomfile.ImportedMessage
) -> Message:
    """Message ``index`` of a room file as stored in the new room (``ids``: the new
    ids, by position in the file). An answer that was streaming when exported is stored as
    interrupted: nothing will finish it here."""
    fields = imported.fields
    parent = ids[imported.parent] if imported.parent is not None else None
    message = Message(
        id=ids[index],
        room_id=room_id,
        parent_id=parent,
        role=fields.role,
        content=fields.content,
        status="interrupted" if fields.status == "streaming" else fields.status,
        hidden=fields.hidden,
        created_at=fields.created_at,
        updated_at=fields.created_at,
    )
    if fields.role == "assistant":
        message.generation_id = new_id("gen")
        message.params = {
            "model": fields.model,
            "temperature": fields.temperature,
            "max_tokens": fields.max_tokens,
        }
        message.author_name = fields.model
        message.finish_reason = fields.finish_reason
        message.usage = fields.usage
        message.timing = fields.timing
        message.error = fields.error
    elif fields.author is not None:
        message.author_id = fields.author.id
        message.author_name = fields.author.name
    return message
