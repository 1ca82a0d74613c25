"""Rooms in memory: the cached state a send needs, and the lock ordering a room's
changes in this process. Plain data; nothing here awaits or does I/O.

The database stays the record. A :class:`RoomState` is trusted only at the room's
change count it was taken at (the ``begun`` counter of
:meth:`gateway.broker.base.EventBus.changes`, which claiming the room's lease returns
too): another process changing the room moves the count on, and the state is read
again.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, TypeVar

from gateway.prompt import estimate_tokens
from gateway.store.models import Message, Room

T = TypeVar("T")

MESSAGE_OVERHEAD_BYTES = 512
"""About what a message's view takes on the wire besides its content (ids, times...)."""


def newest_within(items: list[T], budget: int, content: Callable[[T], str]) -> list[T]:
    """The newest of ``items`` (messages, or their views) whose views fit in about
    ``budget`` bytes, and at least the newest one (a running answer is always last). A
    snapshot per joining client is built and sent whole: without a cap, a long room's
    history would be held once per client that joins and does not read it."""
    used = 0
    for i in range(len(items) - 1, -1, -1):
        used += len(content(items[i]).encode()) + MESSAGE_OVERHEAD_BYTES
        if used > budget and i < len(items) - 1:
            return items[i + 1 :]
    return items


@dataclass(frozen=True, slots=True)
class Page:
    """How much of a branch a frame shows (``ready``, ``resync``, ``branch``): its
    newest ``messages`` at most, within about ``max_bytes``. Older ones are read page
    by page over REST (``GET /api/rooms/{id}/messages?before=``), so joining a room
    costs the same whatever its length."""

    messages: int = 50
    max_bytes: int = 256 * 1024

    def newest(self, items: list[T], content: Callable[[T], str]) -> tuple[list[T], bool]:
        """The newest of ``items`` shown, and whether older ones are left out."""
        kept = newest_within(items[-self.messages :], self.max_bytes, content)
        return kept, len(kept) < len(items)


DEFAULT_PAGE = Page()


def trimmed(branch: list[Message], budget: int) -> list[Message]:
    """The newest part of ``branch`` that a prompt of ``budget`` tokens can use (and at
    least its newest two messages): older messages would be trimmed from every prompt
    anyway, and keeping them would let a long-lived room's whole history pile up."""
    used = 0
    for i in range(len(branch) - 1, -1, -1):
        used += estimate_tokens(branch[i].content)
        if used > budget and len(branch) - i > 2:
            return branch[i + 1 :]
    return branch


@dataclass
class Snapshot:
    """What a frame (``ready``, ``branch``) shows of a branch: the views of its newest
    messages (a :class:`Page`), and whether older ones were left out. The active
    branch's is kept current, so a join of a warm room reads nothing from the database."""

    views: list[dict[str, Any]]
    earlier: bool


@dataclass(eq=False)
class RoomState:
    """What answering in a room needs: the persona, the newest part of the active branch
    (oldest first), and the user messages of that part by ``client_id`` (what a retried
    send is recognised by without a read); and, once known, what joining shows."""

    room: Room
    branch: list[Message]
    version: int
    """The room's change count this state is current at."""
    budget: int
    """Prompt tokens the room allows: how much of the branch is kept."""
    snapshot: Snapshot | None = None
    """The ``ready`` snapshot at :attr:`version`; None when unknown (then read)."""
    page: Page = DEFAULT_PAGE
    """How much of the branch :attr:`snapshot` keeps."""
    _sent: dict[str, Message] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.branch = trimmed(self.branch, self.budget)
        self._sent = {m.client_id: m for m in self.branch if m.client_id is not None}

    def sent(self, client_id: str) -> Message | None:
        """The user message sent with ``client_id``, if it is in the kept branch.
        Messages are never changed or removed, so a hit is right at any version (the
        room may since have been deleted: see the caller); a miss proves nothing."""
        return self._sent.get(client_id)

    def extend(self, *messages: Message, views: list[dict[str, Any]] | None = None) -> None:
        """Append ``messages`` to the branch (a send), trimming its oldest part, and
        their ``views`` to the snapshot (without them, the snapshot is forgotten)."""
        snapshot = self.snapshot
        if snapshot is not None:
            if views is None:
                self.snapshot = None
            else:
                kept, left_out = self.page.newest([*snapshot.views, *views], itemgetter("content"))
                self.snapshot = Snapshot(kept, snapshot.earlier or left_out)
        longer = [*self.branch, *messages]
        self.branch = trimmed(longer, self.budget)
        for message in longer[: len(longer) - len(self.branch)]:  # trimmed away
            if message.client_id is not None:
                self._sent.pop(message.client_id, None)
        for message in messages:
            if message.client_id is not None:
                self._sent[message.client_id] = message

    def ended(self, message_id: str, final: dict[str, Any]) -> None:
        """An answer of the branch ended: take its final fields (see
        :data:`gateway.store.writer.FINAL_FIELDS`)."""
        for message in reversed(self.branch):
            if message.id == message_id:
                for name, value in final.items():
                    setattr(message, name, value)
                break
        if self.snapshot is not None:
            views = self.snapshot.views
            for i in range(len(views) - 1, -1, -1):
                if views[i]["id"] == message_id:
                    # A new dict: a ready frame being built may hold the old one.
                    views[i] = {**views[i], **final}
                    break


class RoomCache:
    """The most recently used rooms' :class:`RoomState`, up to ``size`` rooms."""

    def __init__(
        self, default_context_tokens: int, size: int = 10_000, page: Page = DEFAULT_PAGE
    ) -> None:
        self.default_context_tokens = default_context_tokens
        self.size = size
        self.page = page
        self._states: OrderedDict[str, RoomState] = OrderedDict()

    def get(self, room_id: str) -> RoomState | None:
        state = self._states.get(room_id)
        if state is not None:
            self._states.move_to_end(room_id)
        return state

    def remember(
        self,
        room: Room,
        branch: list[Message],
        version: int,
        snapshot: Snapshot | None = None,
    ) -> RoomState:
        """Cache ``room`` with its active ``branch`` (and what joining shows of it, if
        known) as of change ``version`` (the caller holds the room's lock)."""
        budget = room.context_tokens or self.default_context_tokens
        state = RoomState(room, branch, version, budget, snapshot, self.page)
        self._states[room.id] = state
        self._states.move_to_end(room.id)
        while len(self._states) > self.size:
            self._states.popitem(last=False)
        return state

    def answer_ended(
        self, room_id: str, message_id: str, final: dict[str, Any], version: int
    ) -> None:
        """A generation stored its answer's ``final`` fields as change ``version`` (the
        caller holds the room's lock). The state stays current when it was current just
        before: no other change began in between."""
        state = self._states.get(room_id)
        if state is None:
            return
        state.ended(message_id, final)
        if state.version == version - 1:
            state.version = version

    def drop(self, room_id: str) -> None:
        self._states.pop(room_id, None)


class RoomLocks:
    """One :class:`asyncio.Lock` per room, ordering this process's changes to it (and
    snapshots of it) with each other."""

    def __init__(self) -> None:
        # Weak: a room's lock lives while someone holds or awaits it, so probing many
        # unknown room ids leaves nothing behind.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, room_id: str) -> asyncio.Lock:
        lock = self._locks.get(room_id)
        if lock is None:
            lock = self._locks[room_id] = asyncio.Lock()
        return lock
