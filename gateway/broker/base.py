"""The broker's two interfaces, and the few pure rules their implementations share.

What crosses gateway processes comes in two parts, each a small interface with one
contract test suite over every implementation (``tests/test_broker_contract.py``):

- the :class:`EventBus`, in the terms of Centrifugo: **fan-out** (an event published
  in a room, by any process, reaches the room's subscribers on every process, in the
  order of the room's ``event_id``), **history** (a client reconnecting to any process
  resumes after its last event id), **the live answer** (the text so far of the room's
  running generation, read in one step with the newest event id), and per-room
  **change counters** (whether a cached room, or a snapshot just read from the
  database, is current);
- the :class:`RoomLeases`: **ownership**, one generation per room at a time, held as a
  lease that its holder renews and that expires if the holder dies; cancel requests
  are routed to the holder, and the leases of dead holders are taken over.

Each implementation is a pair sharing one backend: :mod:`gateway.broker.memory` (one
process, nothing shared) and :mod:`gateway.broker.redis` (several processes).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from gateway.hub import Event, RoomHub
from gateway.protocol import Frame

ENDING_FRAMES = frozenset({"done", "cancelled", "error"})


@dataclass(frozen=True, slots=True)
class Position:
    """Where a room is, read in one step: its newest event id, its change counters,
    its running answer (``generation_id``, ``message_id``, ``seq``, ``text``) if any,
    and the people in it (``{"id", "name"}``, one per person, on every process)."""

    last_event_id: int
    live: dict[str, Any] | None
    begun: int = 0
    ended: int = 0
    members: list[dict[str, str]] = field(default_factory=list)


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
"""Called with ``(room_id, generation_id, why)`` to stop a generation whose lease this
process holds: ``cancelled`` (a client, on any process, asked; perhaps before the
generation started, which the holder must then remember until it starts), or
``lost`` (its lease was taken over by another process, which ended the answer: stop
without a word)."""


class EventBus(Protocol):
    """Rooms' events, their ids and history, shared by every gateway process.

    Guarantees:

    - **ids**: each room's events get increasing ids (consecutive, in one room, for a
      given bus), whichever process published them;
    - **delivery**: every event published in a room reaches :meth:`RoomHub.deliver
      <gateway.hub.RoomHub.deliver>` of each process that :meth:`listen`\\ s to the room,
      exactly once and in id order (a process that missed some fills the gap from the
      history, or closes the room's subscriptions with ``resync_required``);
    - **history**: :meth:`replay` gives every event after an id, or None — never a
      part of them;
    - **position**: the newest id, the change counters and the live answer are read
      in one step, so a joining client sees each event either in its snapshot or
      after it, never both or neither;
    - **never awaits to publish**: :meth:`publish` (and the end of :meth:`changing`)
      only enqueue, so a generation publishes a token without waiting for anything;
    - **presence**: a person is in a room while some process has :meth:`enter`\\ ed
      them and not :meth:`exit`\\ ed them (:attr:`Position.members`). Who came in (the
      first process entered them, or their name changed) and who left (the last one
      exited) is noted, and :meth:`announce` publishes what was noted as one
      ``presence`` event, a logged event like the others: each person in it as they
      are at that moment, so however the changes of several processes interleave, the
      last event is right. The people a process entered leave when it stops, or, if
      it dies, within about ``presence_seconds`` (no ghosts);
    - **signals** (:meth:`signal`: typing) reach the room's subscribers on every
      process like events, but are neither numbered nor logged: a client that was
      away never gets them.
    """

    name: str

    @property
    def ready(self) -> bool:
        """Whether the shared parts are reachable (``/readyz``)."""
        ...

    async def start(self, hub: RoomHub) -> None:
        """Begin delivering the rooms' events to ``hub``."""
        ...

    async def aclose(self) -> None:
        """Send what is queued (within a few seconds), then stop."""
        ...

    def publish(self, room_id: str, frame: Frame) -> None:
        """Give ``frame`` the room's next ``event_id``, log it, update the live answer
        (``start``, ``token``, and an ending frame of that generation), and deliver
        it to the room's subscribers on every process, in order; never awaits."""
        ...

    def signal(self, room_id: str, frame: Frame) -> None:
        """Deliver ``frame`` to the room's subscribers on every process, without an
        ``event_id`` and without logging it; never awaits."""
        ...

    async def settle(self) -> None:
        """Wait until everything this process published (entered, exited) so far is
        applied: seen in every process's :meth:`position` and :meth:`replay`."""
        ...

    def enter(self, room_id: str, person: dict[str, str]) -> None:
        """This process has ``person`` (``{"id", "name"}``) in the room (noted as
        joined unless they were in it already under that name); never awaits."""
        ...

    def exit(self, room_id: str, person: dict[str, str]) -> None:
        """This process no longer has ``person`` in the room (noted as left if no
        other process has them); never awaits."""
        ...

    def announce(self, room_id: str) -> None:
        """Publish the room's noted comings and goings, if any, as one ``presence``
        event; never awaits."""
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

    async def replay(self, room_id: str, after: int) -> list[Event] | None:
        """Every logged event after ``after``, or None when the log no longer has them
        all (too old, dropped, or an id it never gave out)."""
        ...

    def prune(self) -> None:
        """Forget history too old to replay (called now and then)."""
        ...

    def changing(self, room_id: str) -> AbstractAsyncContextManager[int]:
        """Bracket a change that is committed, then published: a snapshot taken
        meanwhile is retried. Yields the room's change count with this one begun;
        the change ends after the events published inside the bracket."""
        ...

    async def close_room(self, room_id: str, final: Frame) -> None:
        """End every subscription to the room, on every process, with ``final``, and
        forget its log and live answer (the room was deleted)."""
        ...


class RoomLeases(Protocol):
    """Who may change a room: one lease per room, held by one process at a time.

    Guarantees:

    - **exclusive**: while a lease is held, :meth:`claim` of the same room fails
      everywhere; once :meth:`release`\\ d (after everything its holder published
      before), it can be claimed again;
    - **cancel reaches the holder**: :meth:`request_cancel` of a generation's lease
      calls the holder process's stop handler, from the moment the lease is claimed —
      before the generation has started too (the holder applies it when it starts);
      a lease claimed with ``cancellable=False`` (a short exclusive change, such as
      selecting a branch) is not a generation: nothing is asked, None is returned;
    - **takeover**: a lease whose holder stops renewing it (the process died) is
      offered, with its published answer, by :meth:`orphans` to a live process, and
      the old holder, should it wake, hears ``lost``. One process alone has none.
    """

    async def start(self, on_stop: StopHandler) -> None:
        """Begin routing stop requests (cancel, lease lost) to ``on_stop``, and
        renewing the leases held here."""
        ...

    async def aclose(self) -> None: ...

    async def claim(self, room_id: str, holder_id: str, *, cancellable: bool = True) -> int | None:
        """Take the room's lease for ``holder_id`` (a generation's id, unless not
        ``cancellable``); returns the room's change count (as :meth:`EventBus.changes`
        has it begun), or None when another holder has the lease."""
        ...

    def release(self, room_id: str, holder_id: str) -> None:
        """Give the lease back, after everything published so far; never awaits."""
        ...

    async def request_cancel(self, room_id: str, generation_id: str | None) -> str | None:
        """Ask the holder of the room's lease to stop its generation (``generation_id``,
        or whichever holds it), started or not; returns the id of the generation
        asked, or None when no generation holds the lease."""
        ...

    async def generating(self) -> set[str]:
        """Rooms whose answer some process is streaming (``start`` published, no end
        yet): for startup recovery."""
        ...

    async def orphans(self) -> list[Orphan]:
        """Generations whose holder stopped renewing its lease; the caller now holds
        each one's lease and must end it (and release)."""
        ...
