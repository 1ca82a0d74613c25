"""The broker interface, and the few pure rules both implementations share.

A broker carries four things between gateway processes, in the terms of Centrifugo:

- **fan-out**: an event published in a room, by any process, reaches the subscribers
  of that room on every process (through :meth:`RoomHub.deliver
  <gateway.hub.RoomHub.deliver>`), in the order the room's ``event_id`` gives;
- **history**: each room's recent events, so that a client reconnecting to any
  process resumes after its last event id (:meth:`Broker.replay`);
- **the live answer**: the text so far of the room's running generation, read in one
  step with the newest event id, for a client joining mid-answer;
- **ownership**: one generation per room at a time, held as a lease that its holder
  renews and that expires if the holder dies; cancel requests are routed to it.

It also keeps a per-room change counter, so that a process can tell whether the room
it has cached, or the snapshot it has just read from the database, is current.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gateway.hub import RoomHub
from gateway.protocol import Frame

ENDING_FRAMES = frozenset({"done", "cancelled", "error"})


@dataclass(frozen=True, slots=True)
class Position:
    """Where a room is, read in one step: its newest event id, its change counters and
    its running answer (``generation_id``, ``message_id``, ``seq``, ``text``) if any."""

    last_event_id: int
    live: dict[str, Any] | None
    begun: int = 0
    ended: int = 0


@dataclass(frozen=True, slots=True)
class Orphan:
    """A generation whose owner died (its lease expired): its room, generation and the
    live answer as far as it was published."""

    room_id: str
    generation_id: str
    message_id: str
    text: str


def live_change(frame: Frame) -> str | None:
    """How ``frame`` changes the room's live answer: ``start``, ``token``, ``end``."""
    kind = frame["type"]
    if kind == "token" or kind == "start":
        return kind
    if kind in ENDING_FRAMES and frame.get("generation_id"):
        return "end"
    return None


StopHandler = Callable[[str, str, Literal["cancelled", "lost"]], None]
"""Called with ``(room_id, generation_id, why)`` to stop a generation this process
runs: ``cancelled`` (a client on another process asked), or ``lost`` (its lease was
taken over by another process, which ended the answer: stop without a word)."""


class Broker(Protocol):
    """What every gateway process shares. Methods that only enqueue never await, so a
    generation publishes a token without waiting for anything."""

    name: str

    @property
    def ready(self) -> bool:
        """Whether the shared parts are reachable (``/readyz``)."""
        ...

    async def start(self, hub: RoomHub, on_stop: StopHandler) -> None:
        """Begin delivering the rooms' events to ``hub``, and stop requests (cancel,
        lease lost) to ``on_stop``."""
        ...

    async def aclose(self) -> None: ...

    # --- fan-out and history -------------------------------------------------------

    def publish(self, room_id: str, frame: Frame) -> None:
        """Give ``frame`` the room's next ``event_id``, log it, and deliver it to the
        room's subscribers on every process, in order; never awaits."""
        ...

    async def listen(self, room_id: str) -> None:
        """Make sure this process receives the room's events from now on."""
        ...

    def forget(self, room_id: str) -> None:
        """This process has no subscriber left in the room."""
        ...

    async def position(self, room_id: str) -> Position:
        """The room's newest event id, change counters and live answer, in one step
        (starting the room's ids, if it has none yet: call it for existing rooms)."""
        ...

    async def changes(self, room_id: str) -> tuple[int, int]:
        """The room's change counters: how many changes have begun, and ended."""
        ...

    async def replay(self, room_id: str, after: int) -> list[Any] | None:
        """Every logged event after ``after``, or None when the log no longer has them
        all (too old, dropped, or an id it never gave out)."""
        ...

    def prune(self) -> None:
        """Forget history too old to replay (called now and then)."""
        ...

    def changing(self, room_id: str) -> AbstractAsyncContextManager[int]:
        """Bracket a change that is committed, then published: a snapshot taken
        meanwhile is retried. Yields the room's change count with this one begun."""
        ...

    async def close_room(self, room_id: str, final: Frame) -> None:
        """End every subscription to the room, on every process, with ``final``, and
        forget its log (the room was deleted)."""
        ...

    # --- ownership -----------------------------------------------------------------

    async def claim(self, room_id: str, generation_id: str) -> int | None:
        """Take the room's lease for ``generation_id``; returns the room's change count,
        or None when another generation holds it."""
        ...

    def release(self, room_id: str, generation_id: str) -> None:
        """Give the lease back, after everything published so far; never awaits."""
        ...

    async def request_cancel(self, room_id: str, generation_id: str | None) -> str | None:
        """Ask the lease holder to stop its generation (``generation_id``, or whichever
        runs); returns the id of the generation asked, or None when none runs."""
        ...

    async def generating(self) -> set[str]:
        """Rooms whose answer some process is streaming (for startup recovery)."""
        ...

    async def orphans(self) -> list[Orphan]:
        """Generations whose owner stopped renewing its lease; the caller now holds
        each one's lease and must end it (and release)."""
        ...
