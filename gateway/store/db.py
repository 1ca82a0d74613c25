"""The database handle: engine, sessions, SQLite tuning and Alembic upgrades."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from gateway.bundled import bundled_dir

T = TypeVar("T")

MIGRATIONS = bundled_dir("migrations")


def alembic_config(database_url: str) -> Config:
    """An Alembic config for ``database_url`` that works without ``alembic.ini``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # Passed as an attribute, not an option: configparser would choke on '%' in URLs.
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (blocking; runs its own event loop).

    Several processes may start at once (``serve --workers N``): on PostgreSQL they
    take turns on an advisory lock (``migrations/env.py``), on a SQLite file on a lock
    file beside it."""
    with _sqlite_file_lock(database_url):
        command.upgrade(alembic_config(database_url), revision)


@contextlib.contextmanager
def _sqlite_file_lock(database_url: str) -> Iterator[None]:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        yield
        return
    with open(f"{url.database}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    """The schema's revision (None: empty), read without changing anything
    (blocking; runs its own event loop)."""
    return asyncio.run(_current_revision_async(database_url))


async def _current_revision_async(database_url: str) -> str | None:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


def describe_database(database_url: str) -> str:
    """The database URL for a log line: the password hidden, a SQLite file's path
    made absolute (a relative one depends on the folder the server started in)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        url = url.set(database=os.path.abspath(url.database))
    return url.render_as_string(hide_password=True)


def _tune_sqlite(engine: Engine, begin: str) -> None:
    """Per-connection PRAGMAs and IMMEDIATE write transactions for SQLite.

    The pool hands out many connections, so PRAGMAs go on each new one. Transactions
    begin IMMEDIATE because busy_timeout does not cover a read lock being upgraded to a
    write lock: a deferred transaction would fail at once with "database is locked".
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)


class Database:
    """Owns the engines; hands out one AsyncSession per unit of work.

    ``transaction()`` is for writes; ``read()`` for reads, which on SQLite use their
    own connections and plain (deferred) transactions, so in WAL mode they never wait
    for the write lock. ``write()`` runs a synchronous unit of work in one transaction:
    the group-committing writer's path (:mod:`gateway.store.writer`).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_async_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        self.read_engine = self.engine
        # SQLite file: the writer's own synchronous engine on one thread of its own.
        self._write_engine: Engine | None = None
        self._write_thread: ThreadPoolExecutor | None = None
        if self.engine.dialect.name == "sqlite":
            _tune_sqlite(self.engine.sync_engine, "BEGIN IMMEDIATE")
            self.read_engine = create_async_engine(url)
            _tune_sqlite(self.read_engine.sync_engine, "BEGIN")
            sync_url = make_url(url).set(drivername="sqlite")
            if sync_url.database not in (None, "", ":memory:"):
                self._write_engine = create_engine(sync_url, pool_size=1, max_overflow=0)
                _tune_sqlite(self._write_engine, "BEGIN IMMEDIATE")
                self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = async_sessionmaker(self.read_engine, expire_on_commit=False)

    async def upgrade(self) -> None:
        """Migrate to the newest revision; Alembic runs its own loop, so use a thread."""
        await asyncio.to_thread(upgrade, self.url)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session inside one transaction: committed on success, rolled back on error."""
        async with self._sessions() as session, session.begin():
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reading (it begins on first use; closing rolls it back)."""
        async with self._read_sessions() as session:
            yield session

    async def write(self, unit: Callable[[Connection], T]) -> T:
        """Run ``unit(connection)`` in one write transaction (committed if it returns,
        rolled back if it raises).

        Why not an async session: with aiosqlite every cursor call is a trip to its
        thread and back through the event loop (about ten per commit: begin, three
        per statement, commit, the pool's reset), which cost more CPU than the
        writes. On a SQLite file the whole unit runs on the writer's own thread in one
        trip; elsewhere (PostgreSQL) it runs in one greenlet on the async engine.
        """
        if self._write_engine is not None:
            engine = self._write_engine
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._write_thread, _in_transaction, engine, unit)
        async with self.engine.connect() as connection:
            return await connection.run_sync(_in_transaction_on, unit)

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether the database answers a trivial query within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout), self.read() as session:
                await session.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()
        if self._write_engine is not None and self._write_thread is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._write_thread, self._write_engine.dispose
            )
            self._write_thread.shutdown()


def _in_transaction(engine: Engine, unit: Callable[[Connection], T]) -> T:
    with engine.connect() as connection:
        return _in_transaction_on(connection, unit)


def _in_transaction_on(connection: Connection, unit: Callable[[Connection], T]) -> T:
    with connection.begin():
        return unit(connection)
