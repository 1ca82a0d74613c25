"""The WebSocket/SSE wire protocol, free of I/O.

Client frames are JSON text objects with a ``type``; :func:`parse_client_frame` turns
one into a typed frame or raises :class:`~gateway.errors.BadRequest` with a stable code.
Server frames are built by the ``*_frame`` functions and encoded once by
:func:`encode_bytes`, so fanning one event out to many clients costs one
serialisation; :func:`websocket_text` and :func:`sse_event` then give the bytes each
transport puts on the wire, also once per event however many clients receive it.

Nothing here awaits or imports a transport; tests feed it literal strings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gateway.errors import BadRequest, GatewayError, PayloadTooLarge

Id = Annotated[str, Field(min_length=1, max_length=64)]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Send(_Frame):
    """Post a user message; the assistant answers it."""

    type: Literal["send"]
    content: str
    id: Id | None = None  # client's own id: echoed back, and makes retries idempotent


class Cancel(_Frame):
    """Stop the running generation (or the named one)."""

    type: Literal["cancel"]
    generation_id: Id | None = None


class Regenerate(_Frame):
    """Answer the same user message again, as a new sibling version."""

    type: Literal["regenerate"]
    message_id: Id
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None


class Select(_Frame):
    """Make the branch through ``message_id`` the room's active one."""

    type: Literal["select"]
    message_id: Id


class Edit(_Frame):
    """Send ``content`` as a new version of a user message (a new branch) and answer it."""

    type: Literal["edit"]
    message_id: Id
    content: str
    id: Id | None = None  # as for send


class Hide(_Frame):
    """The room owner hides a message from the room (or, ``hidden`` false, shows it)."""

    type: Literal["hide"]
    message_id: Id
    hidden: bool = True


class Typing(_Frame):
    """The client's person is typing (or, ``active`` false, stopped)."""

    type: Literal["typing"]
    active: bool = True


class Rename(_Frame):
    """The client's person now goes by ``name``."""

    type: Literal["rename"]
    name: str


class Ping(_Frame):
    type: Literal["ping"]
    id: Id | None = None


ClientFrame = Send | Cancel | Regenerate | Select | Edit | Hide | Typing | Rename | Ping
CLIENT_TYPES = (
    "send",
    "cancel",
    "regenerate",
    "select",
    "edit",
    "hide",
    "typing",
    "rename",
    "ping",
)

_client_frame: TypeAdapter[ClientFrame] = TypeAdapter(
    Annotated[ClientFrame, Field(discriminator="type")]
)


def parse_client_frame(text: str | bytes, *, max_bytes: int) -> ClientFrame:
    """Parse one client frame, raising :class:`BadRequest` (or ``PayloadTooLarge``)."""
    # A str of n characters is at most 4n bytes in UTF-8: encode only when it matters.
    size = len(text) if isinstance(text, bytes) or len(text) * 4 <= max_bytes else None
    if size is None:
        size = len(text.encode())  # type: ignore[union-attr]
    if size > max_bytes:
        raise PayloadTooLarge(
            f"frame of {size} bytes exceeds the limit of {max_bytes}", code="frame_too_large"
        )
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"frame is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("a frame must be a JSON object", code="invalid_frame")
    if "\\u0000" in text if isinstance(text, str) else b"\\u0000" in text:
        _refuse_nul(data, "frame")
    kind = data.get("type")
    if kind not in CLIENT_TYPES:
        raise BadRequest(
            f"unknown frame type {kind!r}; expected one of {', '.join(CLIENT_TYPES)}",
            code="unknown_type",
        )
    try:
        return _client_frame.validate_python(data)
    except ValidationError as exc:
        # The first loc item is the union member's tag; name fields from there on.
        raise BadRequest(_describe(exc, skip=1, whole="frame"), code="invalid_frame") from None


BodyT = TypeVar("BodyT", bound=BaseModel)


def _describe(exc: ValidationError, *, skip: int, whole: str) -> str:
    """One line naming each bad field: ``persona.temperature: Input should be ...``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"][skip:]) or whole
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# --- REST bodies -----------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PersonaUpdate(_Body):
    """Persona fields; any omitted field keeps its value (or the gateway default)."""

    system_prompt: Annotated[str, Field(max_length=100_000)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    context_tokens: Annotated[int, Field(ge=256, le=10_000_000)] | None = None


KeyName = Annotated[str, Field(min_length=1, max_length=64)]


def _known_checks(names: list[str]) -> list[str]:
    from gateway.checks import build_pipeline

    build_pipeline([n for n in names if n not in ("secret_leak", "moderation")], max_chars=1)
    return names


CheckNames = Annotated[list[str], Field(max_length=10), AfterValidator(_known_checks)]


class RoomCreate(_Body):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    persona: PersonaUpdate = PersonaUpdate()
    # Access (applies when the gateway has API keys): only the owner and granted keys
    # see a private room; only the owner reads a secret system prompt.
    private: bool = False
    secret_prompt: bool = False
    grants: Annotated[list[KeyName], Field(max_length=1000)] = []
    checks: CheckNames | None = None  # None: the gateway's default checks


class RoomUpdate(_Body):
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    persona: PersonaUpdate | None = None
    private: bool | None = None
    secret_prompt: bool | None = None
    grants: Annotated[list[KeyName], Field(max_length=1000)] | None = None
    checks: CheckNames | None = None


class MessageCreate(_Body):
    """``POST /api/rooms/{id}/messages``: the ``send`` frame as a request body."""

    content: str
    id: Id | None = None


class EditBody(_Body):
    """``POST .../messages/{id}/edit``: the ``edit`` frame as a request body."""

    content: str
    id: Id | None = None


class HideBody(_Body):
    hidden: bool = True


class TypingBody(_Body):
    active: bool = True


class RegenerateBody(_Body):
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None


def parse_body(model: type[BodyT], raw: bytes, *, optional: bool = False) -> BodyT:
    """Parse a JSON request body into ``model``, raising :class:`BadRequest`.
    With ``optional``, an empty body means all defaults."""
    if optional and not raw.strip():
        return model()
    data = parse_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_describe(exc, skip=0, whole="body"), code="invalid_body") from None


def parse_json(raw: bytes) -> Any:
    """A JSON request body, with no U+0000 in any string; :class:`BadRequest`
    (``invalid_json``, ``invalid_character``) otherwise."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}", code="invalid_json") from None
    if b"\\u0000" in raw:
        _refuse_nul(data, "body")
    return data


def _refuse_nul(data: Any, where: str) -> None:
    """Raise ``invalid_character`` for a string holding U+0000 anywhere in ``data``.

    No text column stores it (PostgreSQL refuses it outright), so it is refused the
    same on every database, before anything is stored. Only JSON's ``\\u0000`` escape
    can produce it (a raw control character is invalid JSON), so callers look for
    that first and walk the data only when it appears.
    """
    stack: list[tuple[str, Any]] = [(where, data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise BadRequest(
                    f"{path}: text must not contain the NUL character (U+0000)",
                    code="invalid_character",
                )
        elif isinstance(value, dict):
            stack.extend((f"{path}.{key}", item) for key, item in value.items())
            stack.extend((f"{path} key", key) for key in value)
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def parse_event_id(raw: str | None) -> int | None:
    """A client's last seen ``event_id`` (``Last-Event-ID``, ``?last_event_id=``)."""
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        raise BadRequest(
            f"last event id must be a non-negative integer, got {raw[:40]!r}",
            code="invalid_last_event_id",
        )
    return int(raw)


# --- server frames ---------------------------------------------------------------

Frame = dict[str, Any]


def encode(frame: Frame) -> str:
    """Serialise a server frame to the JSON text sent on the wire."""
    return orjson.dumps(frame).decode()


def encode_bytes(frame: Frame) -> bytes:
    """:func:`encode`, as the UTF-8 bytes that go on the wire."""
    return orjson.dumps(frame)


def websocket_text(payload: bytes) -> bytes:
    """One unfragmented WebSocket text frame (RFC 6455 §5.2) carrying ``payload``
    (UTF-8), as a server sends it: unmasked, no extension (the gateway offers no
    compression: per-token frames cost more CPU to deflate than they save)."""
    size = len(payload)
    if size < 126:
        return b"\x81%c%b" % (size, payload)
    if size < 65536:
        return b"\x81\x7e%b%b" % (size.to_bytes(2, "big"), payload)
    return b"\x81\x7f%b%b" % (size.to_bytes(8, "big"), payload)


def sse_event(kind: str, data: bytes, event_id: int | None = None) -> bytes:
    """One Server-Sent Event: ``id:`` (logged room events only), ``event:`` (the frame's
    type) and ``data:`` (a frame's JSON, which never contains a newline)."""
    if event_id is not None:
        return b"id: %d\nevent: %b\ndata: %b\n\n" % (event_id, kind.encode(), data)
    return b"event: %b\ndata: %b\n\n" % (kind.encode(), data)


def decode(text: str | bytes) -> Frame:
    """A server frame from its JSON text (as another gateway process sent it)."""
    frame: Frame = orjson.loads(text)
    return frame


def ready_frame(
    room: Frame,
    messages: list[Frame],
    generation: Frame | None,
    last_event_id: int,
    *,
    resync: bool = False,
    earlier: bool = False,
    members: list[Frame] | None = None,
    you: Frame | None = None,
) -> Frame:
    """The room as it is: its active branch (a running answer's text so far included)
    and the people in it, as of event ``last_event_id``; ``you``: who the client is.
    ``resync`` when a resume could not replay; ``earlier`` when ``messages`` holds
    only the newest part of the branch."""
    return {
        "type": "resync" if resync else "ready",
        "room": room,
        "messages": messages,
        "earlier": earlier,
        "generation": generation,
        "members": members or [],
        "you": you,
        "last_event_id": last_event_id,
    }


def resumed_frame(room_id: str, after: int, replayed: int, you: Frame | None = None) -> Frame:
    """A resume succeeded: the ``replayed`` events after ``after`` follow, then live ones."""
    return {
        "type": "resumed",
        "room_id": room_id,
        "after": after,
        "replayed": replayed,
        "you": you,
    }


def presence_frame(joined: list[Frame], left: list[Frame]) -> Frame:
    """Who came into the room (or changed their name: in ``joined`` again), and who
    left, since the room's last ``presence`` event."""
    return {"type": "presence", "joined": joined, "left": left}


TYPING_SECONDS = 6
"""How long a ``typing`` frame says someone is typing, unless another one follows."""


def typing_frame(person: Frame, active: bool) -> Frame:
    frame: Frame = {"type": "typing", "person": person, "active": active}
    if active:
        frame["expires_in"] = TYPING_SECONDS
    return frame


def hidden_frame(message: Frame) -> Frame:
    """The room's owner hid (or showed again) a message: its view as everyone sees it
    now (without its content while hidden)."""
    return {
        "type": "hidden",
        "message_id": message["id"],
        "hidden": message["hidden"],
        "message": message,
    }


def message_frame(message: Frame, client_id: str | None = None) -> Frame:
    frame: Frame = {"type": "message", "message": message}
    if client_id is not None:
        frame["id"] = client_id
    return frame


def start_frame(generation_id: str, message: Frame) -> Frame:
    return {
        "type": "start",
        "generation_id": generation_id,
        "message_id": message["id"],
        "parent_id": message["parent_id"],
        "message": message,
    }


def queue_frame(generation_id: str, position: int) -> Frame:
    """Where a waiting answer is in the model's line (1: next); 0 once it has started."""
    return {"type": "queue", "generation_id": generation_id, "position": position}


def token_frame(generation_id: str, seq: int, text: str) -> Frame:
    return {"type": "token", "generation_id": generation_id, "seq": seq, "text": text}


def done_frame(
    generation_id: str, message: Frame, finish_reason: str | None, usage: Frame | None
) -> Frame:
    return {
        "type": "done",
        "generation_id": generation_id,
        "message": message,
        "finish_reason": finish_reason,
        "usage": usage,
    }


def cancelled_frame(generation_id: str, message: Frame) -> Frame:
    return {"type": "cancelled", "generation_id": generation_id, "message": message}


def error_body(error: GatewayError) -> Frame:
    """A REST (and refused request's) error body: ``{"error": {code, message, retryable}}``."""
    return {"error": {**error.to_dict(), "retryable": error.retryable}}


def error_frame(
    error: GatewayError,
    *,
    generation_id: str | None = None,
    answer: Frame | None = None,
    client_id: str | None = None,
) -> Frame:
    frame: Frame = {"type": "error", **error.to_dict(), "retryable": error.retryable}
    if generation_id is not None:
        frame["generation_id"] = generation_id
    if answer is not None:
        frame["answer"] = answer  # the stored assistant message the error ended
    if client_id is not None:
        frame["id"] = client_id
    return frame


def branch_frame(
    messages: list[Frame], active_leaf_id: str | None, *, earlier: bool = False
) -> Frame:
    """The room's active branch changed: its newest ``messages`` (``earlier`` when
    older ones are left out, read over REST)."""
    return {
        "type": "branch",
        "active_leaf_id": active_leaf_id,
        "messages": messages,
        "earlier": earlier,
    }


def room_frame(room: Frame) -> Frame:
    """The room's name or persona changed."""
    return {"type": "room", "room": room}


def pong_frame(client_id: str | None = None) -> Frame:
    frame: Frame = {"type": "pong"}
    if client_id is not None:
        frame["id"] = client_id
    return frame


def merge_tokens(frames: list[Frame]) -> Frame:
    """Coalesce consecutive token frames of one generation into one frame.

    Used for a connection that has fallen behind: it receives the same text in fewer
    frames. ``seq`` is the last merged frame's, ``seq_from`` the first's.
    """
    first, last = frames[0], frames[-1]
    merged = {
        "type": "token",
        "generation_id": first["generation_id"],
        "seq": last["seq"],
        "seq_from": first["seq"],
        "text": "".join(f["text"] for f in frames),
    }
    if "event_id" in last:
        merged["event_id"] = last["event_id"]
    return merged
