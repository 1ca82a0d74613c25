"""Tables of the gateway. Alembic (``migrations/``) owns the schema; these mirror it.

Messages form a tree per room: each message points at its ``parent_id``; regenerating
an answer adds a sibling under the same parent. ``rooms.active_leaf_id`` names the tip
of the branch the room currently shows; walking parents from it gives the history.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

Role = Literal["user", "assistant"]
# streaming: being generated; complete: finished normally; cancelled: stopped by a
# client; error: the upstream failed; interrupted: the process stopped mid-answer.
# blocked: an output check stopped it.
Status = Literal["streaming", "complete", "cancelled", "error", "interrupted", "blocked"]

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s_%(column_1_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id(prefix: str) -> str:
    """A URL-safe, unguessable id such as ``room_V1StGXR8_Z5j``."""
    return f"{prefix}_{secrets.token_urlsafe(9)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def isoformat(value: datetime) -> str:
    # SQLite hands datetimes back naive; they were stored as UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat().replace("+00:00", "Z")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


PERSONA_FIELDS = ("system_prompt", "model", "temperature", "max_tokens", "context_tokens")


class Room(Base):
    """A chat room and its persona."""

    __tablename__ = "rooms"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    system_prompt: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str | None] = mapped_column(String(200))
    temperature: Mapped[float | None] = mapped_column(Float)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    context_tokens: Mapped[int | None] = mapped_column(Integer)
    active_leaf_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Last activity (a message, an answer, a branch selected, a setting changed).
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, index=True
    )
    # Access (enforced only when the gateway has API keys): the key that created the
    # room; a private room is visible to its owner and granted keys only; a secret
    # system prompt is shown to the owner only.
    owner: Mapped[str | None] = mapped_column(String(64))
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    secret_prompt: Mapped[bool] = mapped_column(Boolean, default=False)
    # The input/output checks this room runs (gateway.checks names); None: the default.
    checks: Mapped[list[str] | None] = mapped_column(JSON)
    grants: Mapped[list[RoomGrant]] = relationship(
        lazy="selectin", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def granted(self) -> list[str]:
        return sorted(grant.key_name for grant in self.grants)

    def persona(self, *, reveal_prompt: bool = True) -> dict[str, Any]:
        persona = {field: getattr(self, field) for field in PERSONA_FIELDS}
        if self.secret_prompt and not reveal_prompt:
            persona["system_prompt"] = None
        return persona

    def to_dict(self, *, owner_view: bool = False) -> dict[str, Any]:
        """The room as clients see it; a secret system prompt only in ``owner_view``."""
        view: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "persona": self.persona(reveal_prompt=owner_view),
            "active_leaf_id": self.active_leaf_id,
            "owner": self.owner,
            "private": self.private,
            "secret_prompt": self.secret_prompt,
            "checks": self.checks,
            "created_at": isoformat(self.created_at),
            "updated_at": isoformat(self.updated_at),
        }
        if owner_view:
            view["grants"] = self.granted
        return view


class RoomGrant(Base):
    """A key allowed into a private room."""

    __tablename__ = "room_grants"

    room_id: Mapped[str] = mapped_column(
        ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True
    )
    key_name: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class Message(Base):
    """One user or assistant message; assistant messages record what produced them."""

    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("room_id", "client_id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    room_id: Mapped[str] = mapped_column(ForeignKey("rooms.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), index=True)
    client_id: Mapped[str | None] = mapped_column(String(64))
    generation_id: Mapped[str | None] = mapped_column(String(40))
    # The persona values in force when the answer was generated (model, temperature,
    # max_tokens, context_tokens, system_prompt), and how it ended.
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Who wrote it: a user message's sender (see gateway.people); an answer's model
    # (no id). Null on messages stored before authors were recorded.
    author_id: Mapped[str | None] = mapped_column(String(64))
    author_name: Mapped[str | None] = mapped_column(String(200))
    # Hidden by the room's owner: kept, but its content is served to nobody else.
    hidden: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # An answer's ``first_token_ms`` and ``duration_ms`` from its start, as streamed.
    timing: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    @property
    def author(self) -> dict[str, Any]:
        """``{"id", "name", "kind"}``: ``user`` (its sender) or ``model`` (an answer)."""
        if self.role == "assistant":
            model = (self.params or {}).get("model") or self.author_name
            return {"id": f"model:{model}", "name": model, "kind": "model"}
        return {"id": self.author_id, "name": self.author_name, "kind": "user"}

    def to_dict(
        self, siblings: list[str] | None = None, *, reveal_hidden: bool = False
    ) -> dict[str, Any]:
        """The message as clients see it: a hidden one without its content, unless
        ``reveal_hidden`` (the room owner's REST view)."""
        hidden = bool(self.hidden)
        data: dict[str, Any] = {
            "id": self.id,
            "room_id": self.room_id,
            "role": self.role,
            "content": "" if hidden and not reveal_hidden else self.content,
            "status": self.status,
            "parent_id": self.parent_id,
            "client_id": self.client_id,
            "author": self.author,
            "hidden": hidden,
            "created_at": isoformat(self.created_at),
            "siblings": siblings if siblings is not None else [self.id],
        }
        if self.role == "assistant":
            params = self.params or {}
            data.update(
                generation_id=self.generation_id,
                model=params.get("model"),
                temperature=params.get("temperature"),
                max_tokens=params.get("max_tokens"),
                finish_reason=self.finish_reason,
                usage=self.usage,
                timing=self.timing,
                error=self.error,
            )
        return data


MESSAGE_COLUMNS = tuple(c.key for c in Message.__table__.columns)


def message_row(message: Message) -> dict[str, Any]:
    """A message's column values, for bulk inserts (see :mod:`gateway.store.writer`)."""
    row = {key: getattr(message, key) for key in MESSAGE_COLUMNS}
    row["hidden"] = bool(row["hidden"])  # a column default applies only on flush
    return row


# The full-text index of messages (migration 0005) is the database's own: its tables,
# column and indexes are made and kept in step by the migration, not by these models.
SEARCH_TABLES = frozenset({"message_search", "messages_fts"})
SEARCH_COLUMNS = frozenset({"search_vector"})
SEARCH_INDEXES = frozenset({"ix_messages_search_vector", "ix_messages_content_trgm"})


def described_by_models(
    item: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """Alembic's ``include_object``: False for the search index's objects (and FTS5's
    shadow tables), which the models leave to migration 0005."""
    if type_ == "table":
        return not (name in SEARCH_TABLES or (name or "").startswith("messages_fts_"))
    if type_ == "column":
        return name not in SEARCH_COLUMNS
    if type_ == "index":
        return name not in SEARCH_INDEXES
    return True
