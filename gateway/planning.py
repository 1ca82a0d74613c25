"""Planning an answer: from a room's persona, the history and the gateway's defaults to
the completion request and the new assistant message. Pure: no I/O, no clock, no
randomness (ids and the time are given), so it is tested with literal inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.prompt import Turn, build_prompt
from gateway.providers.base import CompletionRequest
from gateway.settings import Settings
from gateway.store.models import Message, Room


@dataclass(frozen=True, slots=True)
class Defaults:
    """What a persona leaves unset falls back to (``GATEWAY_DEFAULT_*``)."""

    model: str
    temperature: float
    max_tokens: int
    context_tokens: int
    max_history_messages: int

    @classmethod
    def of(cls, settings: Settings, provider_model: str) -> Defaults:
        """The gateway's defaults; ``provider_model`` when no default model is set."""
        return cls(
            model=settings.default_model or provider_model,
            temperature=settings.default_temperature,
            max_tokens=settings.default_max_tokens,
            context_tokens=settings.default_context_tokens,
            max_history_messages=settings.max_history_messages,
        )


HIDDEN_TURN = "[message hidden by the room owner]"
"""What the model gets instead of a hidden message: the owner hid it from everyone,
the model included, and the turns still alternate."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What to ask the model, and the answer (``streaming``, empty) it will fill."""

    request: CompletionRequest
    answer: Message


def plan(
    room: Room,
    history: Sequence[Message],
    defaults: Defaults,
    *,
    generation_id: str,
    message_id: str,
    now: datetime,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> Plan:
    """Plan the answer to the last message of ``history`` (the branch from the first
    message down to the user message being answered), with ``temperature`` instead of
    the room's when given (a regenerate may ask for one), and at most ``max_tokens``
    when given (a caller may lower the room's limit, never raise it).

    The answer records the persona values in force (``params``), so that a later
    persona change does not rewrite what produced it.
    """
    if temperature is None:
        temperature = room.temperature
    limit = room.max_tokens or defaults.max_tokens
    params: dict[str, Any] = {
        "model": room.model or defaults.model,
        "temperature": defaults.temperature if temperature is None else temperature,
        "max_tokens": limit if max_tokens is None else min(limit, max_tokens),
        "context_tokens": room.context_tokens or defaults.context_tokens,
        "system_prompt": room.system_prompt,
    }
    messages = build_prompt(
        room.system_prompt,
        [Turn(m.role, HIDDEN_TURN if m.hidden else m.content) for m in history],
        context_tokens=params["context_tokens"],
        max_tokens=params["max_tokens"],
        max_turns=defaults.max_history_messages,
    )
    answer = Message(
        id=message_id,
        room_id=room.id,
        parent_id=history[-1].id,
        role="assistant",
        content="",
        status="streaming",
        generation_id=generation_id,
        params=params,
        author_name=params["model"],
        created_at=now,
        updated_at=now,
    )
    request = CompletionRequest(
        model=params["model"],
        messages=messages,
        temperature=params["temperature"],
        max_tokens=params["max_tokens"],
    )
    return Plan(request, answer)
