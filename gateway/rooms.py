"""Room use cases for the REST API: create, list, read, update, delete, history."""

from __future__ import annotations

from typing import Any

from gateway import protocol
from gateway.chat import ChatService, load_room
from gateway.protocol import RoomCreate, RoomUpdate
from gateway.store.db import Database
from gateway.store.models import Room, new_id
from gateway.store.repository import MessageStore


class RoomService:
    """Rooms and their personas. Persona changes apply from the next generation on."""

    def __init__(self, db: Database, chat: ChatService) -> None:
        self.db = db
        self.chat = chat

    async def create(self, body: RoomCreate) -> dict[str, Any]:
        persona = body.persona
        room = Room(
            id=new_id("room"),
            name=body.name,
            system_prompt=persona.system_prompt or "",
            model=persona.model,
            temperature=persona.temperature,
            max_tokens=persona.max_tokens,
            context_tokens=persona.context_tokens,
        )
        async with self.db.transaction() as session:
            await MessageStore(session).add_room(room)
            return room.to_dict()

    async def list(self, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        async with self.db.read() as session:
            rooms = await MessageStore(session).rooms(limit=limit, offset=offset)
            return [room.to_dict() for room in rooms]

    async def get(self, room_id: str) -> dict[str, Any]:
        """The room, with ``members``: clients connected to it on this process."""
        async with self.db.read() as session:
            view = (await load_room(MessageStore(session), room_id)).to_dict()
        return {**view, "members": self.chat.hub.members(room_id)}

    async def update(self, room_id: str, body: RoomUpdate) -> dict[str, Any]:
        async with self.db.transaction() as session:
            room = await load_room(MessageStore(session), room_id)
            if body.name is not None:
                room.name = body.name
            if body.persona is not None:
                for field, value in body.persona.model_dump(exclude_unset=True).items():
                    # An explicit null resets a field to the gateway default.
                    setattr(
                        room, field, "" if field == "system_prompt" and value is None else value
                    )
            await session.flush()
            view = room.to_dict()
        self.chat.room_changed(room)
        self.chat.hub.publish(room_id, protocol.room_frame(view))
        return view

    async def delete(self, room_id: str) -> None:
        async with self.db.read() as session:
            await load_room(MessageStore(session), room_id)
        await self.chat.close_room(room_id)
        async with self.db.transaction() as session:
            store = MessageStore(session)
            room = await store.room(room_id)
            if room is not None:
                await store.delete_room(room)

    async def messages(self, room_id: str) -> list[dict[str, Any]]:
        """The active branch, oldest first, with sibling versions of each answer."""
        async with self.db.read() as session:
            store = MessageStore(session)
            room = await load_room(store, room_id)
            return await store.views(room_id, await store.branch(room.active_leaf_id))
