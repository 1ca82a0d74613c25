"""Group commit for the chat hot path: one task writes everything, in batches.

Why: SQLite has one writer at a time, and with an async driver each statement of a
transaction costs a trip through the event loop. Under load (hundreds of rooms
starting and finishing answers) transactions holding the write lock across those
trips queue up behind each other — measured at about twenty per second. Here every
write of the hot path (new messages, final answers, checkpoints, active-branch
moves) is a small :class:`WriteBatch`; one task commits all batches pending at that
moment in a single transaction with one multi-row statement per kind of change, so
the cost per commit no longer grows with the number of rooms.

Each kind of change is one SQL statement however many rows it touches (multi-row
``INSERT ... VALUES``, ``UPDATE ... SET col = CASE id ...``), not an executemany:
sqlite3 releases the GIL around every statement step, and while the event loop is
busy relaying tokens each re-acquisition waits up to a switch interval (5 ms), so
an executemany of 500 rows took half a second.

A batch that fails (say, its room was deleted meanwhile) is retried alone, so it
cannot take the others down with it. On PostgreSQL the same batching saves round
trips and transactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table, Update, case, literal
from sqlalchemy.exc import IntegrityError

from gateway.errors import Conflict
from gateway.store.db import Database
from gateway.store.models import Message, Room, utcnow

log = logging.getLogger(__name__)

# Columns a final answer update sets (besides the primary key).
FINAL_FIELDS = ("content", "status", "finish_reason", "usage", "error")


@dataclass
class WriteBatch:
    """The writes of one unit of work, committed atomically with others."""

    # New message rows (see :func:`gateway.store.models.message_row`), parents first.
    inserts: list[dict[str, Any]] = field(default_factory=list)
    # room id → new active leaf id.
    leaves: dict[str, str | None] = field(default_factory=dict)
    # Streaming text checkpoints: {"id", "content"}.
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    # Final state of answers: {"id", *FINAL_FIELDS}.
    finals: list[dict[str, Any]] = field(default_factory=list)


class Writer:
    """Commits :class:`WriteBatch` es in the order submitted, many per transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: list[tuple[WriteBatch, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="store writer")

    async def write(self, batch: WriteBatch) -> None:
        """Commit ``batch``; returns once it is durable, raises if it failed."""
        await self.submit(batch)

    def submit(self, batch: WriteBatch) -> asyncio.Future[None]:
        """Queue ``batch`` without waiting; the future resolves once it is committed."""
        if self._closing:
            raise RuntimeError("the writer is closed")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((batch, future))
        self._wake.set()
        return future

    async def close(self) -> None:
        """Commit what is pending, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                pending, self._pending = self._pending, []
                if pending:
                    await self._commit_pending(pending)
                elif self._closing:
                    return
        finally:
            # However the task ends, nobody may wait forever for a write.
            self._closing = True
            for _, future in self._pending:
                _settle(future, RuntimeError("the store writer has stopped"))
            self._pending = []

    async def _commit_pending(self, pending: list[tuple[WriteBatch, asyncio.Future[None]]]) -> None:
        try:
            await self._commit([batch for batch, _ in pending])
        except Exception as exc:
            if len(pending) == 1:
                _settle(pending[0][1], exc)
                return
            # Find the culprit: commit each batch on its own.
            for batch, future in pending:
                try:
                    await self._commit([batch])
                except Exception as single:
                    _settle(future, single)
                else:
                    _settle(future, None)
            return
        for _, future in pending:
            _settle(future, None)

    async def _commit(self, batches: list[WriteBatch]) -> None:
        inserts = [row for b in batches for row in b.inserts]
        checkpoints = [row for b in batches for row in b.checkpoints]
        finals = [row for b in batches for row in b.finals]
        leaves: dict[str, str | None] = {}
        for b in batches:
            leaves.update(b.leaves)
        now = utcnow()
        leaf_rows = [{"id": k, "active_leaf_id": v, "updated_at": now} for k, v in leaves.items()]
        async with self._db.transaction() as session:
            for rows in _chunks(inserts):
                await session.execute(_messages.insert().values(rows))
            # Checkpoints first: a final answer in the same commit must win. Rows
            # that vanished meanwhile (room deleted) are simply not updated.
            for rows in _chunks(checkpoints):
                statement = _update_by_id(_messages, rows, ("content",))
                await session.execute(statement.where(_messages.c.status == "streaming"))
            for rows in _chunks(finals):
                await session.execute(_update_by_id(_messages, rows, FINAL_FIELDS))
            for rows in _chunks(leaf_rows):
                await session.execute(_update_by_id(_rooms, rows, ("active_leaf_id", "updated_at")))


_messages = Message.__table__
_rooms = Room.__table__
_CHUNK = 200  # rows per statement: well under SQLite's limit of bound parameters


def _chunks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [rows[i : i + _CHUNK] for i in range(0, len(rows), _CHUNK)]


def _update_by_id(table: Table, rows: list[dict[str, Any]], fields: Sequence[str]) -> Update:
    """``UPDATE table SET f = CASE id WHEN ... END ... WHERE id IN (...)``.

    When one id appears several times, the last row wins.
    """
    values = {}
    for name in fields:
        column = table.c[name]
        by_id = {row["id"]: literal(row[name], column.type) for row in rows}
        values[name] = case(by_id, value=table.c.id)
    ids = list({row["id"] for row in rows})
    return table.update().where(table.c.id.in_(ids)).values(values)


def _settle(future: asyncio.Future[None], exc: Exception | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
        return
    if isinstance(exc, IntegrityError):
        log.info("write refused by the database: %s", exc.orig)
        exc = Conflict("the change conflicts with the stored history; reload and retry")
    else:
        log.error("write failed: %r", exc)
    future.set_exception(exc)
