"""The provider interface: stream one chat completion.

Guarantees an implementation gives:

- ``stream()`` yields :class:`Chunk` objects in order, never an empty one (no text,
  finish reason, usage or queue position). A network provider yields one per network
  read that completed events: their texts joined in order, with the finish reason and
  usage if one of them carried it (text always comes before them; later chunks carry
  no text). So a chunk may hold many tokens; nothing is lost or reordered. An event
  reporting an error still raises, after a chunk with the text that came before it in
  that read. (The local provider yields one chunk per token.)
- A provider that queues work (the local one, when its batch is full) may yield,
  before any text, chunks carrying only ``queue_position``: the answer's place in
  line (1 = next) when it starts waiting and each time it changes, then one with
  ``queue_position=0`` when the model starts on it. An answer that did not wait
  gets no such chunk.
- Errors are raised as :class:`gateway.errors.UpstreamError` (or a subclass), never as
  the library's own exceptions.
- Cancelling the consuming task, or closing the iterator (``aclose()``), stops the
  upstream work at once: the HTTP response is closed, not drained.
- Retries only happen before the first chunk is yielded; once text reached a client
  a failure ends the stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.checks import Verdict


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    messages: list[dict[str, str]]
    temperature: float
    max_tokens: int
    headers: Mapping[str, str] = field(default_factory=dict)
    """Sent with the request to a network model (the trace's ``traceparent``)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer: new text, and on the last chunks how it ended; or,
    before any text, where the answer waits in line (``queue_position``, 0: started)."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = field(default=None)
    queue_position: int | None = None


class ChatProvider(Protocol):
    """Streams chat completions from some model."""

    name: str
    default_model: str
    """The model asked for when neither the persona nor GATEWAY_DEFAULT_MODEL names one."""

    def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        """Stream the answer to ``request``; see the module docstring for guarantees."""
        ...

    async def aclose(self) -> None:
        """Release connections and workers."""
        ...


class Moderation(Protocol):
    """A moderation endpoint (:class:`gateway.providers.moderation.Moderator`): a
    network call, made once per user message and once per answer."""

    async def check(self, text: str) -> Verdict:
        """Whether ``text`` is allowed; raises ``moderation_unavailable`` when unsure."""
        ...
