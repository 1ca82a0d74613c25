"""The group-commit writer on a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import Conflict
from gateway.store.db import Database
from gateway.store.models import Message, Room, message_row, utcnow
from gateway.store.writer import WriteBatch, Writer


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    await database.upgrade()
    async with database.transaction() as session:
        session.add(Room(id="room", name="r"))
    yield database
    await database.dispose()


@pytest.fixture
async def writer(db: Database) -> AsyncIterator[Writer]:
    w = Writer(db)
    w.start()
    yield w
    await w.close()


def answer(message_id: str, room_id: str = "room") -> Message:
    now = utcnow()
    return Message(
        id=message_id,
        room_id=room_id,
        parent_id=None,
        role="assistant",
        content="",
        status="streaming",
        created_at=now,
        updated_at=now,
    )


async def stored(db: Database, message_id: str) -> Message | None:
    async with db.read() as session:
        return await session.get(Message, message_id)


async def test_concurrent_batches_all_land(db: Database, writer: Writer) -> None:
    ids = [f"m{i}" for i in range(300)]
    await asyncio.gather(*(writer.write(WriteBatch(inserts=[message_row(answer(i))])) for i in ids))
    for message_id in ids[::50]:
        assert await stored(db, message_id) is not None


async def test_a_failing_batch_does_not_take_the_others_down(db: Database, writer: Writer) -> None:
    good = writer.submit(WriteBatch(inserts=[message_row(answer("ok1"))]))
    bad = writer.submit(WriteBatch(inserts=[message_row(answer("orphan", "no-such-room"))]))
    also_good = writer.submit(WriteBatch(inserts=[message_row(answer("ok2"))]))
    await good
    await also_good
    with pytest.raises(Conflict):
        await bad
    assert await stored(db, "ok1") is not None
    assert await stored(db, "ok2") is not None
    assert await stored(db, "orphan") is None


async def test_final_state_wins_over_a_checkpoint_in_the_same_commit(
    db: Database, writer: Writer
) -> None:
    await writer.write(WriteBatch(inserts=[message_row(answer("m"))], leaves={"room": "m"}))
    final = {
        "id": "m",
        "content": "full text",
        "status": "complete",
        "finish_reason": "stop",
        "usage": {"completion_tokens": 2},
        "timing": {"first_token_ms": 40, "duration_ms": 90},
        "error": None,
    }
    await asyncio.gather(
        writer.write(WriteBatch(checkpoints=[{"id": "m", "content": "full"}])),
        writer.write(WriteBatch(finals=[final])),
    )
    # A late checkpoint never touches an answer that is no longer streaming.
    await writer.write(WriteBatch(checkpoints=[{"id": "m", "content": "stale"}]))
    message = await stored(db, "m")
    assert message is not None
    assert (message.content, message.status, message.usage, message.timing) == (
        "full text",
        "complete",
        {"completion_tokens": 2},
        {"first_token_ms": 40, "duration_ms": 90},
    )
    async with db.read() as session:
        room = await session.get(Room, "room")
    assert room is not None and room.active_leaf_id == "m"


async def test_updates_of_vanished_rows_are_skipped(writer: Writer) -> None:
    await writer.write(WriteBatch(checkpoints=[{"id": "gone", "content": "x"}]))
    await writer.write(WriteBatch(leaves={"gone-room": None}))


async def test_writes_fail_instead_of_hanging_once_the_writer_stopped(db: Database) -> None:
    writer = Writer(db)
    writer.start()
    await writer.close()
    with pytest.raises(RuntimeError):
        writer.submit(WriteBatch(leaves={"room": None}))


async def test_of_several_updates_of_one_row_in_a_commit_the_last_wins(
    db: Database, writer: Writer
) -> None:
    await writer.write(WriteBatch(inserts=[message_row(answer("m"))]))
    await asyncio.gather(
        *(
            writer.write(WriteBatch(checkpoints=[{"id": "m", "content": "a" * n}]))
            for n in range(1, 6)
        )
    )
    await writer.write(
        WriteBatch(checkpoints=[{"id": "m", "content": "x"}, {"id": "m", "content": "xy"}])
    )
    message = await stored(db, "m")
    assert message is not None and message.content == "xy"


async def test_a_commit_larger_than_one_statement_lands_whole(db: Database, writer: Writer) -> None:
    ids = [f"m{i}" for i in range(450)]  # statements carry 200 rows at most
    await writer.write(WriteBatch(inserts=[message_row(answer(i)) for i in ids]))
    await writer.write(WriteBatch(checkpoints=[{"id": i, "content": f"text {i}"} for i in ids]))
    for message_id in (ids[0], ids[199], ids[200], ids[449]):
        message = await stored(db, message_id)
        assert message is not None and message.content == f"text {message_id}"
