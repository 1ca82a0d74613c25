"""Joining rooms: who may, the snapshot a new member starts from, resuming after a
dropped connection, leaving, and access checked again when a room's access changes.

A snapshot and the subscription are taken together under the room's lock, and inside
no change of the event bus's :meth:`~gateway.broker.base.EventBus.changing` bracket,
so a client joining while a change is committed and published (on this process or
another) gets either the old state plus the event, or the new state without it —
never a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from operator import attrgetter

from gateway import protocol
from gateway.access import OPEN, Viewer
from gateway.broker.base import EventBus, Position
from gateway.errors import Unavailable
from gateway.hub import RoomHub, Subscriber
from gateway.people import Person, check_name
from gateway.presence import Presence
from gateway.roomstate import Page, RoomCache, RoomLocks, Snapshot
from gateway.store.db import Database
from gateway.store.models import Room
from gateway.store.repository import MessageStore, load_room, room_not_found

log = logging.getLogger(__name__)

SETTLE_SECONDS = 1.0
"""How long a join waits for its arrival in the room to be applied by the broker."""

SNAPSHOT_TRIES = 8
"""Attempts at a snapshot with no change under way before taking one anyway (a
change begun by a process that then died never ends)."""


class Joining:
    """Subscriptions to rooms, on top of the hub (this process) and the event bus
    (every process)."""

    def __init__(
        self,
        *,
        db: Database,
        hub: RoomHub,
        bus: EventBus,
        cache: RoomCache,
        locks: RoomLocks,
        presence: Presence,
        page: Page,
        depth: int,
        queue_position: Callable[[str], int] = lambda room_id: 0,
    ) -> None:
        self.db = db
        self.queue_position = queue_position
        """Where the room's answer, if it runs here, waits in the model's line (0: not)."""
        self.hub = hub
        self.presence = presence
        self.bus = bus
        self.cache = cache
        self.locks = locks
        self.page = page
        # A cold join reads this many of the branch's newest messages: the page it
        # shows, and what the next answer's prompt may use (the room's state is cached).
        self.depth = max(depth, page.messages)
        # Rooms whose access is being checked again: how many changes were announced
        # since the check began (see _check_access).
        self._access_asks: dict[str, int] = {}
        self._access_checks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self.hub.on_room_frame = self._room_frame

    def shutdown(self) -> None:
        for task in list(self._access_checks):
            task.cancel()

    async def authorize(self, room_id: str, viewer: Viewer) -> None:
        """Raise ``room_not_found`` unless ``viewer`` may see the room (a private room
        must look like no room at all to others)."""
        if not viewer.enforced:
            return
        state = self.cache.get(room_id)
        # The cached room is current only if no change has begun since (another
        # process may have made it private).
        if state is not None and state.version == (await self.bus.changes(room_id))[0]:
            room = state.room
        else:
            async with self.db.read() as session:
                room = await load_room(MessageStore(session), room_id)
        if not viewer.can_see(room):
            raise room_not_found(room_id)

    async def join(
        self,
        room_id: str,
        after: int | None = None,
        viewer: Viewer = OPEN,
        person: Person | None = None,
    ) -> tuple[protocol.Frame, Subscriber]:
        """Subscribe to a room; returns the first frame for the client and the
        subscription.

        A new client (``after`` None) gets ``ready``: the active branch, with the text
        so far of a running answer, as of the newest event id; every later event
        follows exactly once. A client coming back after event ``after`` gets
        ``resumed`` and every event it missed, from the room's log, then live ones; or,
        when the log no longer has them all, ``resync`` (like ``ready``).

        The snapshot and the subscription are taken together under the room lock, and
        the live text of a running answer is read in the same step as subscribing.

        Access is checked once this process listens to the room: a change committed
        before is seen here, and one announced after reaches the subscription (see
        :meth:`_room_frame`).

        ``person``, once allowed in, is in the room (``presence`` ``join`` to the
        others, if they were not there yet) until :meth:`leave`.
        """
        # From here on, nothing is missed.
        subscriber = self.hub.subscribe(room_id, viewer, person)
        you = person.view() if person is not None else None
        try:
            await self.bus.listen(room_id)
            await self.authorize(room_id, viewer)
            if person is not None:
                if self.presence.arrive(room_id, person):
                    # So that whoever joins after this one's ready lists them; not for
                    # long if the broker is away (its join is announced when it is back).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(SETTLE_SECONDS):
                            await self.bus.settle()
                subscriber.present = True
            if after is not None:
                missed = await self.bus.replay(room_id, after)
                # Tokens are merged in the queue; other events each take a slot. A
                # replay that would overflow the queue at once is better as a resync.
                if missed is not None and (
                    sum(event.frame["type"] != "token" for event in missed)
                    <= self.hub.queue_limit // 2
                ):
                    subscriber.begin(missed, missed[-1].event_id if missed else after)
                    resumed = protocol.resumed_frame(room_id, after, len(missed), you)
                    return resumed, subscriber
            async with self.locks(room_id):
                room, snapshot, position = await self._snapshot(room_id)
                if not viewer.can_see(room):  # changed since authorize()
                    raise room_not_found(room_id)
            subscriber.begin([], position.last_event_id)
        except BaseException:
            self.leave(subscriber)
            raise
        messages = snapshot.views
        live = position.live
        if live is not None:
            if waiting := self.queue_position(room_id):
                live = {**live, "queue_position": waiting}
            messages = [
                {**view, "content": live["text"]} if view["id"] == live["message_id"] else view
                for view in messages
            ]
        ready = protocol.ready_frame(
            room.to_dict(),
            messages,
            live,
            position.last_event_id,
            resync=after is not None,
            earlier=snapshot.earlier,
            members=_with(position.members, you),
            you=you,
        )
        return ready, subscriber

    async def _snapshot(self, room_id: str) -> tuple[Room, Snapshot, Position]:
        """The room, what ``ready`` shows of its active branch, and the event bus's
        position, all as of the same change (the caller holds the room's lock).

        From the room's cached state when it is current: the bus's change counter is
        where the state was taken and no change is under way (one bus call, no
        database read). Otherwise read from the database, retried while a change is
        between its commit and its publication (possibly on another process), and
        cached for the next joins and sends."""
        state = self.cache.get(room_id)
        if state is not None and state.snapshot is not None:
            position = await self.bus.position(room_id)
            if position.begun == position.ended == state.version:
                snapshot = state.snapshot
                return state.room, Snapshot(list(snapshot.views), snapshot.earlier), position
        for attempt in range(SNAPSHOT_TRIES):
            begun, ended = await self.bus.changes(room_id)
            async with self.db.read() as session:
                store = MessageStore(session)
                room = await load_room(store, room_id)
                branch = await store.branch(room.active_leaf_id, self.depth)
                shown, _ = self.page.newest(branch, attrgetter("content"))
                views = await store.views(room_id, shown)
            # Older messages are left out when the oldest shown is not the first.
            snapshot = Snapshot(views, bool(shown) and shown[0].parent_id is not None)
            position = await self.bus.position(room_id)
            if begun == ended and (position.begun, position.ended) == (begun, ended):
                self.cache.remember(room, branch, begun, Snapshot(list(views), snapshot.earlier))
                return room, snapshot, position
            await asyncio.sleep(0.002 * 2**attempt)
        log.warning("room %s: a change seems stuck; snapshot taken as it is", room_id)
        return room, snapshot, position

    async def watch(self, room_id: str, viewer: Viewer = OPEN) -> Subscriber:
        """Subscribe to a room's events from now on, with no first frame: for a client
        about to start a generation and follow just that one (``viewer`` was allowed
        in by :meth:`authorize`)."""
        subscriber = self.hub.subscribe(room_id, viewer)
        try:
            await self.bus.listen(room_id)
        except BaseException:
            self.leave(subscriber)
            raise
        subscriber.begin([], 0)
        return subscriber

    def leave(self, subscriber: Subscriber) -> None:
        if subscriber.present and subscriber.person is not None:
            subscriber.present = False
            self.presence.depart(subscriber.room_id, subscriber.person)
        if self.hub.unsubscribe(subscriber):
            self.bus.forget(subscriber.room_id)

    def rename(self, subscriber: Subscriber, name: str) -> Person:
        """The subscriber's person now goes by ``name`` (checked); returns them."""
        assert subscriber.person is not None, "rename of a subscription without a person"
        person = Person(subscriber.person.id, check_name(name))
        subscriber.person = person
        if subscriber.present:
            self.presence.rename(subscriber.room_id, person)
        return person

    # --- access changes ------------------------------------------------------------

    def _room_frame(self, room_id: str, view: protocol.Frame, members: list[Subscriber]) -> None:
        """A ``room`` frame is reaching this process's members of the room (from any
        process). Those the frame does not show still allowed in — a private room they
        do not own; the frame has no grants — are held until the room is read again.
        Nothing is read for an open gateway, a public room, or the owner."""
        doubtful = [s for s in members if not s.viewer.sees_in(view)]
        for subscriber in doubtful:
            subscriber.suspend()
        asks = self._access_asks.get(room_id)
        if not doubtful and asks is None:
            return
        self._access_asks[room_id] = (asks or 0) + 1
        if asks is None:  # else the running check reads the room again
            task = asyncio.create_task(self._check_access(room_id), name="access check")
            self._access_checks.add(task)
            task.add_done_callback(self._access_checks.discard)

    async def _check_access(self, room_id: str) -> None:
        """Read the room, then end the held subscriptions of viewers who may no longer
        see it (``room_not_found``, as for a room they never saw) and let the others
        go on. One read per change, never per event; read again while more changes
        come (the read may predate a later change's commit)."""
        room: Room | None = None
        failed = False
        try:
            while True:
                asks = self._access_asks[room_id]
                try:
                    async with self.db.read() as session:
                        room = await MessageStore(session).room(room_id)
                    failed = False
                except Exception:
                    log.exception("room %s: reading it to check access failed", room_id)
                    failed = True
                if self._access_asks[room_id] == asks:
                    break
        finally:
            del self._access_asks[room_id]
        for subscriber in self.hub.subscribers(room_id):
            if not subscriber.suspended:
                continue
            if room is not None and subscriber.viewer.can_see(room):
                subscriber.resume()
            elif failed:  # unsure: let the client come back and be checked on joining
                error = Unavailable(
                    "could not check access to the room; reconnect", code="access_check_failed"
                )
                subscriber.close(protocol.error_frame(error))
            else:
                subscriber.close(protocol.error_frame(room_not_found(room_id)))


def _with(members: list[dict[str, str]], you: dict[str, str] | None) -> list[dict[str, str]]:
    """``members`` with ``you`` in it: a joining client is in the room, whether or not
    the bus has said so yet (with Redis, its ``join`` may still be on its way)."""
    if you is None:
        return members
    return [*(m for m in members if m["id"] != you["id"]), you]
