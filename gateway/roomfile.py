"""Room files: a whole room as versioned JSON (export, import), and its active branch
as Markdown. Pure: no I/O; the room use cases (:mod:`gateway.rooms`) read and store.

An export holds the room's name and persona (a secret system prompt only in the
owner's export) and every message of its tree — each with its ``parent_id``, so the
versions a regenerate or an edit made are siblings — with statuses, authors,
timestamps and usage, and the ``active_leaf_id``. Importing checks all of it before
anything is stored (:func:`read_import`), and gives every message a new id.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter, itemgetter
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import BadRequest
from gateway.protocol import PersonaUpdate

T = TypeVar("T")

FORMAT = "chat-gateway.room"
VERSION = 1
STATUSES = ("complete", "cancelled", "error", "interrupted", "blocked", "streaming")
MAX_MESSAGES = 100_000
MAX_CONTENT_CHARS = 1_000_000

# Fields of a message view (see gateway.store.models.Message.to_dict) an export keeps:
# the room and the versions are implied by where it is.
_DROPPED = ("room_id", "siblings", "client_id")


def export(room: dict[str, Any], messages: Sequence[dict[str, Any]], now: datetime) -> dict:
    """The room file of ``room`` (its view, as its reader may see it) and ``messages``
    (views of every message of its tree, as its reader may see them)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": _iso(now),
        "room": {
            "id": room["id"],
            "name": room["name"],
            "persona": room["persona"],
            "private": room["private"],
            "secret_prompt": room["secret_prompt"],
            "checks": room["checks"],
            "created_at": room["created_at"],
        },
        "active_leaf_id": room["active_leaf_id"],
        "messages": [
            {k: v for k, v in m.items() if k not in _DROPPED}
            for m in parents_first(
                # A user message and its answer can share a timestamp: ids break ties,
                # and parents_first puts each after its parent.
                sorted(messages, key=itemgetter("created_at", "id")),
                itemgetter("id"),
                itemgetter("parent_id"),
            )
        ],
    }


def parents_first(
    items: Sequence[T], id_of: Callable[[T], str], parent_of: Callable[[T], str | None]
) -> list[T]:
    """``items`` (messages) ordered so that each comes after its parent, siblings in
    their given order; those that never reach a first message (a cycle of parent
    links) are left out."""
    children: dict[str | None, list[T]] = defaultdict(list)
    for item in items:
        children[parent_of(item)].append(item)
    ordered: list[T] = []
    stack = list(reversed(children[None]))
    while stack:
        item = stack.pop()
        ordered.append(item)
        stack.extend(reversed(children[id_of(item)]))
    return ordered


def markdown(room: dict[str, Any], branch: Sequence[dict[str, Any]]) -> str:
    """The active branch as readable Markdown: who said what, and when."""
    lines = [f"# {room['name']}", ""]
    prompt = room["persona"].get("system_prompt")
    if prompt:
        lines += [*(f"> {line}" for line in prompt.splitlines()), ""]
    for message in branch:
        author = message["author"]["name"] or message["role"]
        notes = [message["created_at"]]
        if message.get("hidden"):
            notes.append("hidden")
        if message["status"] not in ("complete",):
            notes.append(message["status"])
        lines += [f"**{author}** · {' · '.join(notes)}", "", message["content"], ""]
    return "\n".join(lines)


# --- import --------------------------------------------------------------------------


class _Author(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(None, max_length=64)
    name: str | None = Field(None, max_length=200)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=64)
    parent_id: str | None = Field(None, max_length=64)
    role: str
    content: str = Field("", max_length=MAX_CONTENT_CHARS)
    status: str = "complete"
    created_at: datetime
    author: _Author | None = None
    hidden: bool = False
    model: str | None = Field(None, max_length=200)
    temperature: float | None = None
    max_tokens: int | None = None
    finish_reason: str | None = Field(None, max_length=32)
    usage: dict[str, Any] | None = None
    timing: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class _Room(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=200)
    persona: PersonaUpdate = PersonaUpdate()
    private: bool = False
    secret_prompt: bool = False
    checks: list[str] | None = None


class _File(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: str
    version: int
    room: _Room
    active_leaf_id: str | None = None
    messages: list[_Message] = Field(max_length=MAX_MESSAGES)


@dataclass(frozen=True, slots=True)
class ImportedMessage:
    """A message of a room file, checked: ``parent`` is the index of its parent in the
    list (parents come first), None for a first message."""

    parent: int | None
    fields: _Message


@dataclass(frozen=True, slots=True)
class RoomImport:
    """A room file, checked: what to store."""

    room: _Room
    messages: list[ImportedMessage]
    active_leaf: int | None
    """Index of the active branch's leaf in :attr:`messages`."""


def read_import(data: Any) -> RoomImport:
    """Check a room file (parsed JSON); :class:`BadRequest` with a code saying what is
    wrong: ``not_a_room_file``, ``unsupported_version``, ``invalid_room_file`` (a
    field), ``duplicate_message_id``, ``broken_tree_link``, ``tree_cycle``,
    ``invalid_tree`` (a user message must follow an answer, an answer a user
    message), ``unknown_status``, ``invalid_role``."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadRequest(f"not a room file: its format must be {FORMAT!r}", code="not_a_room_file")
    if data.get("version") != VERSION:
        raise BadRequest(
            f"room file version {data.get('version')!r} is not supported (only {VERSION})",
            code="unsupported_version",
        )
    try:
        file = _File.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"]))
        raise BadRequest(f"{where}: {first['msg']}", code="invalid_room_file") from None
    by_id: dict[str, _Message] = {}
    for message in file.messages:
        if message.id in by_id:
            raise BadRequest(
                f"message id {message.id!r} appears twice", code="duplicate_message_id"
            )
        if message.role not in ("user", "assistant"):
            raise BadRequest(f"message {message.id!r}: unknown role", code="invalid_role")
        if message.status not in STATUSES:
            raise BadRequest(
                f"message {message.id!r}: unknown status {message.status!r}", code="unknown_status"
            )
        by_id[message.id] = message
    for message in file.messages:
        parent = by_id.get(message.parent_id) if message.parent_id is not None else None
        if message.parent_id is not None and parent is None:
            raise BadRequest(
                f"message {message.id!r}: its parent {message.parent_id!r} is not in the file",
                code="broken_tree_link",
            )
        allowed = (None, "assistant") if message.role == "user" else ("user",)
        if (parent.role if parent else None) not in allowed:
            raise BadRequest(
                f"message {message.id!r}: a {message.role} message cannot follow "
                f"{'nothing' if parent is None else 'a ' + parent.role + ' message'}",
                code="invalid_tree",
            )
    ordered = _parents_first(file.messages)
    index = {m.id: i for i, m in enumerate(ordered)}
    if file.active_leaf_id is not None and file.active_leaf_id not in index:
        raise BadRequest(
            f"active_leaf_id {file.active_leaf_id!r} is not a message of the file",
            code="broken_tree_link",
        )
    return RoomImport(
        room=file.room,
        messages=[
            ImportedMessage(index[m.parent_id] if m.parent_id is not None else None, m)
            for m in ordered
        ],
        active_leaf=index.get(file.active_leaf_id) if file.active_leaf_id else None,
    )


def _parents_first(messages: list[_Message]) -> list[_Message]:
    """Parents before children; ``tree_cycle`` if some messages never reach a root."""
    ordered = parents_first(messages, attrgetter("id"), attrgetter("parent_id"))
    if len(ordered) < len(messages):
        placed = {m.id for m in ordered}
        stuck = next(m.id for m in messages if m.id not in placed)
        raise BadRequest(
            f"message {stuck!r} is in a cycle of parent links (it never reaches a first message)",
            code="tree_cycle",
        )
    return ordered


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
