"""Full-text search over messages, on each database's own engine (migration 0005):
SQLite's FTS5 (trigram tokenizer, ranked by bm25) and PostgreSQL's full-text search
(``tsvector`` + GIN, ranked by ``ts_rank``) with ``pg_trgm`` for text without spaces.

A query is a list of terms, all of which a message must contain (case-insensitive,
anywhere in a word: trigram matching). Terms under 3 characters — a Japanese word is
often 2 — cannot use a trigram index: on SQLite they filter the indexed terms' hits,
or, alone, scan the messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, text
from sqlalchemy.ext.asyncio import AsyncSession

TRIGRAM = 3  # characters a term needs for a trigram index to find it


@dataclass(frozen=True, slots=True)
class Hit:
    """A message found, with its room's name."""

    message_id: str
    room_id: str
    room_name: str
    role: str
    content: str
    author_id: str | None
    author_name: str | None
    params: Any
    status: str
    created_at: datetime


def _like(term: str) -> str:
    """A LIKE pattern matching ``term`` anywhere (``\\`` escapes)."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def search(
    session: AsyncSession,
    terms: Sequence[str],
    *,
    visible_to: str | None,
    room_id: str | None,
    limit: int,
    offset: int,
) -> list[Hit]:
    """Messages containing every one of ``terms``, best first: not hidden, not still
    streaming, in rooms ``visible_to`` may see (a key name; None: every room), or in
    ``room_id`` only."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    where = ["m.hidden = false", "m.status != 'streaming'"]
    if room_id is not None:
        where.append("m.room_id = :room_id")
        params["room_id"] = room_id
    if visible_to is not None:
        where.append(
            "(r.private = false OR r.owner = :key"
            " OR r.id IN (SELECT room_id FROM room_grants WHERE key_name = :key))"
        )
        params["key"] = visible_to
    columns = (
        "m.id, m.room_id, r.name, m.role, m.content, m.author_id, m.author_name,"
        " m.params, m.status, m.created_at"
    )
    if session.bind.dialect.name == "postgresql":
        sql = _postgres(terms, where, params, columns)
    else:
        sql = _sqlite(terms, where, params, columns)
    typed = text(sql).columns(created_at=DateTime(timezone=True), params=JSON)
    rows = (await session.execute(typed, params)).all()
    return [Hit(*row) for row in rows]


def _postgres(terms: Sequence[str], where: list[str], params: dict, columns: str) -> str:
    # Words (the tsvector, ranked), or else every term inside the text (trigrams).
    likes = []
    for i, term in enumerate(terms):
        params[f"t{i}"] = _like(term)
        likes.append(f"m.content ILIKE :t{i}")
    params["q"] = " ".join(terms)
    where.append(f"(m.search_vector @@ q.query OR ({' AND '.join(likes)}))")
    return (
        f"SELECT {columns} FROM messages m JOIN rooms r ON r.id = m.room_id,"
        " plainto_tsquery('simple', :q) AS q(query)"
        f" WHERE {' AND '.join(where)}"
        " ORDER BY ts_rank(m.search_vector, q.query) DESC, m.created_at DESC, m.id"
        " LIMIT :limit OFFSET :offset"
    )


def _sqlite(terms: Sequence[str], where: list[str], params: dict, columns: str) -> str:
    long = [t for t in terms if len(t) >= TRIGRAM]
    for i, term in enumerate(t for t in terms if len(t) < TRIGRAM):
        params[f"t{i}"] = _like(term)
        where.append(f"m.content LIKE :t{i} ESCAPE '\\'")
    if not long:  # nothing the index can find: the short terms alone
        return (
            f"SELECT {columns} FROM messages m JOIN rooms r ON r.id = m.room_id"
            f" WHERE {' AND '.join(where)}"
            " ORDER BY m.created_at DESC, m.id LIMIT :limit OFFSET :offset"
        )
    # Each term a quoted phrase (quotes doubled): all of them, anywhere in the text.
    params["match"] = " ".join('"' + t.replace('"', '""') + '"' for t in long)
    return (
        f"SELECT {columns} FROM messages_fts"
        " JOIN message_search s ON s.rowid = messages_fts.rowid"
        " JOIN messages m ON m.id = s.message_id JOIN rooms r ON r.id = m.room_id"
        f" WHERE messages_fts MATCH :match AND {' AND '.join(where)}"
        " ORDER BY bm25(messages_fts), m.created_at DESC, m.id"
        " LIMIT :limit OFFSET :offset"
    )
