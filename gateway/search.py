"""Searching messages: ``GET /api/search?q=``. Which rooms a caller may search is the
room list's rule (private rooms never leak); hidden messages and answers still
streaming are never found. The database finds and ranks (:mod:`gateway.store.search`);
this module checks the query and cuts the highlighted snippet."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

from gateway.access import OPEN, Viewer
from gateway.errors import BadRequest
from gateway.store import search as queries
from gateway.store.db import Database
from gateway.store.models import Message, isoformat
from gateway.store.repository import MessageStore, load_room, room_not_found

MAX_QUERY_CHARS = 200
MAX_TERMS = 10
SNIPPET_CHARS = 160


def terms_of(query: str) -> list[str]:
    """The words of a query (split on spaces; a message must hold all of them);
    ``invalid_query`` for an empty or too long one."""
    if len(query) > MAX_QUERY_CHARS:
        raise BadRequest(f"q is limited to {MAX_QUERY_CHARS} characters", code="invalid_query")
    terms = list(dict.fromkeys(query.split()))  # once each, in order
    if not terms:
        raise BadRequest("q must hold at least one word", code="invalid_query")
    if len(terms) > MAX_TERMS:
        raise BadRequest(f"q is limited to {MAX_TERMS} words", code="invalid_query")
    if any(ord(c) < 32 for c in query):
        raise BadRequest("q holds a control character", code="invalid_query")
    return terms


def snippet(content: str, terms: Sequence[str], width: int = SNIPPET_CHARS) -> str:
    """About ``width`` characters of ``content`` around its first match, as HTML: the
    text escaped, every match of a term in ``<mark>``, ``…`` where it was cut."""
    pattern = re.compile("|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)), re.I)
    first = pattern.search(content)
    start = 0 if first is None else max(0, first.start() - width // 3)
    end = min(len(content), start + width)
    start = max(0, min(start, end - width))
    window = content[start:end]
    parts: list[str] = ["…" if start > 0 else ""]
    at = 0
    for match in pattern.finditer(window):
        parts += [
            html.escape(window[at : match.start()]),
            f"<mark>{html.escape(match.group())}</mark>",
        ]
        at = match.end()
    parts += [html.escape(window[at:]), "…" if end < len(content) else ""]
    return "".join(parts)


class SearchService:
    """Finds messages for a :class:`Viewer`."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def search(
        self,
        query: str,
        viewer: Viewer = OPEN,
        *,
        room_id: str | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> dict[str, Any]:
        """``{"results": [...], "next_offset"}``: the messages holding every word of
        ``query``, best first, ``limit`` from ``offset`` on (``next_offset``: where
        the next page starts, None when there is none)."""
        terms = terms_of(query)
        async with self.db.read() as session:
            if room_id is not None:
                room = await load_room(MessageStore(session), room_id)
                if not viewer.can_see(room):
                    raise room_not_found(room_id)
            hits = await queries.search(
                session,
                terms,
                visible_to=viewer.key_name if viewer.enforced else None,
                room_id=room_id,
                limit=limit + 1,
                offset=offset,
            )
        more = len(hits) > limit
        return {
            "results": [_result(hit, terms) for hit in hits[:limit]],
            "next_offset": offset + limit if more else None,
        }


def _result(hit: queries.Hit, terms: Sequence[str]) -> dict[str, Any]:
    author = Message(
        role=hit.role, params=hit.params, author_id=hit.author_id, author_name=hit.author_name
    ).author
    return {
        "room": {"id": hit.room_id, "name": hit.room_name},
        "message": {
            "id": hit.message_id,
            "role": hit.role,
            "author": author,
            "status": hit.status,
            "created_at": isoformat(hit.created_at),
        },
        "snippet": snippet(hit.content, terms),
    }
