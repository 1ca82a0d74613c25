"""The chat use cases without sockets: join, send, cancel, regenerate, select and drain,
driven directly on the parts (:class:`~gateway.chat.ChatService` wires them) with the
memory event bus and room leases, a SQLite file (or PostgreSQL, see ``TEST_DATABASE_URL``), and an
in-process scripted provider.

The end-to-end tests (real servers, real sockets) are the acceptance layer; these say
what each use case does, and run in a fraction of a second each.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from gateway.broker.memory import MemoryEventBus, MemoryRoomLeases
from gateway.chat import ChatService
from gateway.errors import BadRequest, Busy, CheckFailed, Conflict, NotFound, Stopping
from gateway.eventlog import EventLogs
from gateway.hub import RoomHub, Subscriber
from gateway.protocol import Frame, PersonaUpdate, RoomCreate, RoomUpdate
from gateway.rooms import RoomService
from gateway.settings import Settings
from gateway.store.db import Database, upgrade
from gateway.store.models import Message
from gateway.store.writer import Writer
from gateway.testing.fake_provider import ScriptedModerator, ScriptedProvider
from tests.conftest import scaled


@pytest.fixture(scope="session")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty database at the newest schema, copied for each test (migrating takes
    longer than a test)."""
    path = tmp_path_factory.mktemp("template") / "gateway.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


class Member:
    """A client in a room, reading its frames."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber
        self._pending: list[Frame] = []

    async def until(self, kind: str) -> list[Frame]:
        """The frames up to and including the next one of type ``kind``."""
        seen: list[Frame] = []
        async with asyncio.timeout(scaled(2)):
            while True:
                while self._pending:
                    frame = self._pending.pop(0)
                    seen.append(frame)
                    if frame["type"] == kind:
                        return seen
                self._pending = [item.frame for item in await self.subscriber.next_batch()]

    async def queued(self) -> list[str]:
        """The types of the frames waiting to be read (waiting a moment for them)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                self._pending += [item.frame for item in await self.subscriber.next_batch()]
        return [frame["type"] for frame in self._pending]


class Parts:
    """The chat parts over one database, as a process has them."""

    def __init__(self, chat: ChatService, rooms: RoomService, db: Database) -> None:
        self.chat = chat
        self.rooms = rooms
        self.db = db

    async def new_room(self, **fields: Any) -> str:
        return (await self.rooms.create(RoomCreate(name="test", **fields)))["id"]

    async def member(self, room_id: str) -> Member:
        ready, subscriber = await self.chat.joining.join(room_id)
        assert ready["type"] == "ready"
        return Member(subscriber)

    async def answered(self, member: Member, content: str, client_id: str | None = None) -> str:
        """Send ``content`` to ``member``'s room and wait for the answer; its id."""
        await self.chat.sending.send(member.subscriber.room_id, content, client_id)
        return (await member.until("done"))[-1]["message"]["id"]

    async def stored(self, room_id: str) -> list[Message]:
        """Every message of the room, oldest first."""
        async with self.db.read() as session:
            query = select(Message).where(Message.room_id == room_id)
            return list((await session.scalars(query.order_by(Message.created_at))).all())

    async def count(self, room_id: str) -> int:
        async with self.db.read() as session:
            query = select(func.count()).where(Message.room_id == room_id)
            return (await session.execute(query)).scalar_one()

    def reads(self) -> list[str]:
        """A list that collects the SELECT statements run from now on."""
        statements: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.lstrip().upper().startswith(("SELECT", "WITH")):
                statements.append(statement)

        for engine in {self.db.engine, self.db.read_engine}:
            event.listen(engine.sync_engine, "before_cursor_execute", record)
        return statements


@pytest.fixture
def provider() -> ScriptedProvider:
    return ScriptedProvider()


@pytest.fixture
def moderator() -> ScriptedModerator:
    return ScriptedModerator(flagged=["forbidden"])


@pytest.fixture
def open_parts(
    database_url: str, migrated: Path, provider: ScriptedProvider, moderator: ScriptedModerator
) -> Callable[[], Any]:
    """``async with open_parts() as parts``: a process's chat parts, started, over this
    test's database (open it again for a process that starts afresh). SQLite, or
    PostgreSQL with TEST_DATABASE_URL."""
    if database_url.startswith("sqlite"):
        shutil.copy(migrated, database_url.split(":///", 1)[1])
    else:
        upgrade(database_url)

    @asynccontextmanager
    async def opened() -> AsyncIterator[Parts]:
        settings = Settings(_env_file=None, database_url=database_url)  # type: ignore[call-arg]
        db = Database(settings.database_url)
        writer = Writer(db)
        writer.start()
        bus = MemoryEventBus(EventLogs(1024, 300))
        chat = ChatService(
            db=db,
            writer=writer,
            hub=RoomHub(),
            bus=bus,
            leases=MemoryRoomLeases(bus),
            provider=provider,
            settings=settings,
            moderator=moderator,
        )
        await chat.start()
        try:
            yield Parts(chat, RoomService(db, chat), db)
        finally:
            provider.gate.release()
            moderator.gate.release()
            await chat.shutdown()
            await writer.close()
            await db.dispose()

    return opened


@pytest.fixture
async def parts(open_parts: Callable[[], Any]) -> AsyncIterator[Parts]:
    async with open_parts() as parts:
        yield parts


# --- send ------------------------------------------------------------------------------


async def test_a_send_is_stored_published_and_answered(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room(persona=PersonaUpdate(system_prompt="Be brief."))
    member = await parts.member(room_id)

    message, started = await parts.chat.sending.send(room_id, "Hi", "c1", sender="alice")

    assert started is not None
    assert message["content"] == "Hi" and message["client_id"] == "c1"
    frames = await member.until("done")
    assert [f["type"] for f in frames if f["type"] != "token"] == ["message", "start", "done"]
    assert "".join(f["text"] for f in frames if f["type"] == "token") == "Hello, world"
    assert frames[1]["generation_id"] == started.generation_id
    assert frames[-1]["message"]["content"] == "Hello, world"
    assert provider.requests[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    rows = await parts.stored(room_id)
    assert [(m.role, m.content, m.status) for m in rows] == [
        ("user", "Hi", "complete"),
        ("assistant", "Hello, world", "complete"),
    ]


async def test_a_send_to_a_joined_room_reads_nothing_from_the_database(parts: Parts) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)  # joining caches the room
    await parts.answered(member, "one", "c1")

    reads = parts.reads()
    _, started = await parts.chat.sending.send(room_id, "two", "c2")
    await member.until("done")
    again, duplicate = await parts.chat.sending.send(room_id, "two", "c2")

    assert started is not None and duplicate is None
    assert again["content"] == "two"
    assert reads == []


# --- join ------------------------------------------------------------------------------


async def test_joining_a_warm_room_reads_nothing_and_shows_what_the_database_holds(
    parts: Parts,
) -> None:
    reads = parts.reads()
    room_id = await parts.new_room()  # creating it caches it
    first = await parts.member(room_id)
    await parts.answered(first, "one", "c1")
    await parts.answered(first, "two", "c2")
    warm, _ = await parts.chat.joining.join(room_id)
    assert reads == []

    parts.chat.cache.drop(room_id)  # as after a restart: the same snapshot, from the database
    cold, _ = await parts.chat.joining.join(room_id)

    assert reads, "a cold join reads the room"
    for frame in (warm, cold):
        del frame["room"]["updated_at"]
    assert warm == cold
    assert [(m["role"], m["content"]) for m in warm["messages"]] == [
        ("user", "one"),
        ("assistant", "Hello, world"),
        ("user", "two"),
        ("assistant", "Hello, world"),
    ]
    assert warm["messages"][-1]["status"] == "complete" and not warm["earlier"]


async def test_a_join_during_an_answer_shows_its_text_so_far(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    provider.gate.hold()  # the answer waits after its first token
    await parts.chat.sending.send(room_id, "Hi")
    await member.until("token")
    await provider.gate.waiting.wait()

    ready, _ = await parts.chat.joining.join(room_id)

    assert ready["generation"]["text"] == "Hello"
    assert ready["messages"][-1]["status"] == "streaming"
    assert ready["messages"][-1]["content"] == "Hello"


async def test_an_answer_the_model_keeps_waiting_tells_the_room_its_place_in_line(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    provider.queue = [2, 1, 0]
    provider.gate.hold()  # the answer waits, 2nd in line
    await parts.chat.sending.send(room_id, "Hi")
    await provider.gate.waiting.wait()
    assert (await member.until("queue"))[-1]["position"] == 2

    ready, _ = await parts.chat.joining.join(room_id)  # someone comes in meanwhile
    assert ready["generation"]["queue_position"] == 2
    assert ready["messages"][-1]["status"] == "streaming"

    provider.gate.release()
    frames = await member.until("done")
    assert [(f["type"], f.get("position")) for f in frames if f["type"] != "token"] == [
        ("queue", 1),
        ("queue", 0),
        ("done", None),
    ]
    assert "event_id" in frames[-1]
    assert all("event_id" not in f for f in frames if f["type"] == "queue")  # not logged
    ready, _ = await parts.chat.joining.join(room_id)
    assert ready["generation"] is None


async def test_after_a_regenerate_the_next_join_reads_again_then_not(parts: Parts) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    answer_id = await parts.answered(member, "one")
    await parts.chat.sending.regenerate(room_id, answer_id)
    await member.until("done")

    reads = parts.reads()
    ready, _ = await parts.chat.joining.join(room_id)
    read_once = len(reads)
    again, _ = await parts.chat.joining.join(room_id)

    assert read_once > 0 and len(reads) == read_once
    assert ready == again
    assert len(ready["messages"][-1]["siblings"]) == 2


async def test_the_next_send_answers_after_the_previous_answer(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    await parts.answered(member, "one")
    await parts.answered(member, "two")

    assert [m["content"] for m in provider.requests[1].messages] == ["one", "Hello, world", "two"]
    rows = await parts.stored(room_id)
    assert [m.parent_id for m in rows] == [None, rows[0].id, rows[1].id, rows[2].id]


async def test_a_send_while_the_room_is_generating_is_busy(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room()
    provider.gate.hold()
    await parts.chat.sending.send(room_id, "one")

    with pytest.raises(Busy):
        await parts.chat.sending.send(room_id, "two")
    assert await parts.count(room_id) == 2


async def test_a_retry_while_its_answer_streams_is_a_duplicate(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    provider.gate.hold()
    first, started = await parts.chat.sending.send(room_id, "one", "c1")

    again, duplicate = await parts.chat.sending.send(room_id, "one", "c1")

    assert started is not None and duplicate is None
    assert again == first
    provider.gate.release()
    frames = await member.until("done")
    assert [f["type"] for f in frames].count("message") == 1
    assert len(provider.requests) == 1


async def test_a_retry_off_the_active_branch_is_found_by_the_database(parts: Parts) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    first_answer = await parts.answered(member, "one", "c1")
    await parts.answered(member, "two", "c2")
    await parts.chat.sending.regenerate(room_id, first_answer)  # "two" is now off the branch
    await member.until("done")

    again, duplicate = await parts.chat.sending.send(room_id, "two", "c2")

    assert duplicate is None
    assert again["content"] == "two"
    assert await parts.count(room_id) == 5
    assert await member.queued() == []  # nothing was published


async def test_a_retry_after_a_restart_is_a_duplicate(open_parts: Callable[[], Any]) -> None:
    async with open_parts() as parts:
        room_id = await parts.new_room()
        member = await parts.member(room_id)
        first, _ = await parts.chat.sending.send(room_id, "one", "c1")
        await member.until("done")
    async with open_parts() as parts:  # a new process: nothing cached
        again, duplicate = await parts.chat.sending.send(room_id, "one", "c1")

        assert duplicate is None
        assert again == first
        assert await parts.count(room_id) == 2


async def held_in_moderation(
    parts: Parts, moderator: ScriptedModerator, room_id: str, content: str
) -> asyncio.Task[Any]:
    """A send of ``content`` started, and held while its message is moderated."""
    moderator.gate.hold()
    sending = asyncio.create_task(parts.chat.sending.send(room_id, content))
    await asyncio.wait_for(moderator.gate.waiting.wait(), scaled(2))
    return sending


async def test_a_message_is_screened_outside_the_room_lock(
    parts: Parts, moderator: ScriptedModerator
) -> None:
    room_id = await parts.new_room(checks=["moderation"])
    member = await parts.member(room_id)
    sending = await held_in_moderation(parts, moderator, room_id, "one")

    # Joining takes the room's lock: it is free while the message is moderated.
    other = await parts.member(room_id)

    moderator.gate.release()
    _, started = await sending
    assert started is not None
    assert (await other.until("done"))[0]["type"] == "message"
    await member.until("done")


async def test_a_flagged_message_is_rejected_and_costs_nothing(
    parts: Parts, moderator: ScriptedModerator, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room(checks=["moderation"])
    member = await parts.member(room_id)

    with pytest.raises(CheckFailed) as rejected:
        await parts.chat.sending.send(room_id, "something forbidden", "c1")

    assert rejected.value.code == "input_rejected"
    assert await parts.count(room_id) == 0
    assert provider.requests == [] and await member.queued() == []


async def test_a_persona_change_applies_to_the_next_send(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room(persona=PersonaUpdate(system_prompt="Old."))
    member = await parts.member(room_id)
    await parts.answered(member, "one")

    await parts.rooms.update(room_id, RoomUpdate(persona=PersonaUpdate(system_prompt="New.")))
    await parts.answered(member, "two")

    assert provider.requests[1].messages[0] == {"role": "system", "content": "New."}


# --- cancel ----------------------------------------------------------------------------


async def test_cancel_stops_the_answer_and_keeps_its_text(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    provider.gate.hold()
    _, started = await parts.chat.sending.send(room_id, "one")
    await asyncio.wait_for(provider.gate.waiting.wait(), scaled(2))
    assert started is not None

    assert await parts.chat.sending.cancel(room_id) == started.generation_id

    cancelled = (await member.until("cancelled"))[-1]
    assert cancelled["message"]["content"] == "Hello"
    assert provider.stopped == 1  # the upstream stream was closed, not drained
    rows = await parts.stored(room_id)
    assert (rows[1].status, rows[1].content) == ("cancelled", "Hello")
    await parts.chat.sending.send(room_id, "two")  # the room is free again


async def test_cancel_says_what_is_not_running(parts: Parts) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    with pytest.raises(Conflict) as nothing:
        await parts.chat.sending.cancel(room_id)
    _, started = await parts.chat.sending.send(room_id, "one")
    await member.until("done")
    assert started is not None
    with pytest.raises(Conflict) as ended:
        await parts.chat.sending.cancel(room_id, started.generation_id)
    with pytest.raises(NotFound) as unknown:
        await parts.chat.sending.cancel(room_id, "gen_unknown")

    assert nothing.value.code == ended.value.code == "not_running"
    assert unknown.value.code == "generation_not_found"


async def test_a_cancel_while_the_message_is_screened_ends_its_answer_as_it_starts(
    parts: Parts, moderator: ScriptedModerator, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room(checks=["moderation"])
    member = await parts.member(room_id)
    sending = await held_in_moderation(parts, moderator, room_id, "one")

    # The send holds the room's lease: its answer is cancelled before it starts.
    cancelled_id = await parts.chat.sending.cancel(room_id)
    moderator.gate.release()
    _, started = await sending

    assert started is not None and started.generation_id == cancelled_id
    frames = await member.until("cancelled")
    assert [f["type"] for f in frames] == ["message", "start", "cancelled"]
    assert frames[-1]["message"]["content"] == ""
    assert provider.requests == []  # the model was never asked
    rows = await parts.stored(room_id)
    assert [(r.role, r.status, r.content) for r in rows] == [
        ("user", "complete", "one"),
        ("assistant", "cancelled", ""),
    ]
    await parts.answered(member, "two")  # the room is free again


async def test_a_cancel_during_an_exclusive_change_finds_nothing_running(
    parts: Parts,
) -> None:
    room_id = await parts.new_room()
    # What select holds: the room's lease, but as nothing to cancel.
    async with parts.chat.generations.claimed(room_id, "select_1", cancellable=False):
        with pytest.raises(Conflict) as nothing:
            await parts.chat.sending.cancel(room_id)
    assert nothing.value.code == "not_running"


# --- regenerate and select -------------------------------------------------------------


async def test_regenerate_adds_a_version_and_select_goes_back_to_the_first(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    first = await parts.answered(member, "one")

    started = await parts.chat.sending.regenerate(room_id, first, temperature=1.3)

    frames = await member.until("done")
    branch = frames[0]
    assert branch["type"] == "branch" and branch["active_leaf_id"] == started.message_id
    assert branch["messages"][-1]["siblings"] == [first, started.message_id]
    assert provider.requests[-1].temperature == 1.3
    assert [m["content"] for m in provider.requests[-1].messages] == ["one"]

    shown = await parts.chat.sending.select(room_id, first)

    assert [m["id"] for m in shown.views][-1] == first
    assert not shown.earlier
    assert (await member.until("branch"))[-1]["active_leaf_id"] == first
    await parts.chat.sending.send(room_id, "two")
    rows = await parts.stored(room_id)
    assert rows[-2].parent_id == first  # the next message continues the selected branch


async def test_only_an_answer_can_be_regenerated(parts: Parts) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    answer = await parts.answered(member, "one")
    question = (await parts.stored(room_id))[0].id

    with pytest.raises(BadRequest) as refused:
        await parts.chat.sending.regenerate(room_id, question)
    with pytest.raises(NotFound) as missing:
        await parts.chat.sending.regenerate(room_id, "msg_unknown")

    assert refused.value.code == "invalid_target"
    assert missing.value.code == "message_not_found"
    await parts.chat.sending.regenerate(room_id, answer)


# --- drain -----------------------------------------------------------------------------


async def test_drain_interrupts_running_answers_and_admits_nothing_new(
    parts: Parts, provider: ScriptedProvider
) -> None:
    room_id = await parts.new_room()
    member = await parts.member(room_id)
    provider.gate.hold()
    await parts.chat.sending.send(room_id, "one")
    await asyncio.wait_for(provider.gate.waiting.wait(), scaled(2))

    await parts.chat.drain(flush_timeout=0.2)  # nobody reads: the streams are cut

    error = (await member.until("error"))[-1]
    assert error["code"] == "interrupted" and error["answer"]["content"] == "Hello"
    assert (await parts.stored(room_id))[1].status == "interrupted"
    other = await parts.new_room()
    with pytest.raises(Stopping):
        await parts.chat.sending.send(other, "two")
    assert await parts.count(other) == 0
