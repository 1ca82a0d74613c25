"""Alembic migrations: the plain ``alembic`` command works, and models match migrations.

``alembic`` runs as a user runs it: a subprocess in the repository root (where
``alembic.ini`` is), with the database named by ``GATEWAY_DATABASE_URL``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from gateway.store.db import alembic_config
from gateway.store.models import Base, described_by_models
from tests.conftest import scaled

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TABLES = {"rooms", "messages", "room_grants", "message_search"}
FTS_TABLES = {
    "messages_fts",
    *(f"messages_fts_{t}" for t in ("data", "idx", "content", "docsize", "config")),
}


def alembic_command() -> str:
    """The venv's ``alembic`` script: next to the running interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / "alembic"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("alembic")
    assert found, "alembic is not installed (pip install -e '.[test]')"
    return found


def alembic(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    env["GATEWAY_DATABASE_URL"] = f"sqlite+aiosqlite:///{db}"
    return subprocess.run(
        [alembic_command(), *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )


def upgraded(db: Path) -> None:
    result = alembic(db, "upgrade", "head")
    assert result.returncode == 0, result


def sqlite_tables(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows if not name.startswith("sqlite_")}


def alembic_versions(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [v for (v,) in conn.execute("SELECT version_num FROM alembic_version")]


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def test_single_head() -> None:
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, f"migrations have several heads, merge them: {heads}"


def test_upgrade_head_from_empty_then_downgrade_base(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    upgraded(db)
    assert sqlite_tables(db) == {*TABLES, *FTS_TABLES, "alembic_version"}
    assert alembic_versions(db) == [head_revision()]

    result = alembic(db, "downgrade", "base")
    assert result.returncode == 0, result
    assert sqlite_tables(db) == {"alembic_version"}
    assert alembic_versions(db) == []

    upgraded(db)  # and back up again, on the same file
    assert sqlite_tables(db) == {*TABLES, *FTS_TABLES, "alembic_version"}


def test_models_match_migrations(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    upgraded(db)
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            # The same comparison options as migrations/env.py uses for autogenerate.
            opts = {"compare_type": True, "include_object": described_by_models}
            context = MigrationContext.configure(conn, opts=opts)
            diffs = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diffs == []


def test_alembic_check_passes(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    upgraded(db)
    result = alembic(db, "check")
    assert result.returncode == 0, result
    assert "No new upgrade operations detected" in result.stdout + result.stderr


def test_messages_stored_before_the_search_index_are_found_after_upgrading(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.db"
    assert alembic(db, "upgrade", "0004").returncode == 0
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute(
            "INSERT INTO rooms (id, name, system_prompt, private, secret_prompt, created_at,"
            " updated_at) VALUES ('r', 'r', '', 0, 0, '2026-01-01', '2026-01-01')"
        )
        conn.execute(
            "INSERT INTO messages (id, room_id, role, content, status, hidden, created_at,"
            " updated_at) VALUES ('m1', 'r', 'user', '古い天気の話', 'complete', 0,"
            " '2026-01-01', '2026-01-01'), ('m2', 'r', 'assistant', 'half', 'streaming', 0,"
            " '2026-01-01', '2026-01-01')"
        )
    upgraded(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = (
            "SELECT s.message_id FROM messages_fts JOIN message_search s"
            " ON s.rowid = messages_fts.rowid WHERE messages_fts MATCH ?"
        )
        assert conn.execute(query, ('"天気の"',)).fetchall() == [("m1",)]
        assert conn.execute(query, ('"half"',)).fetchall() == []  # streaming: not yet
