"""The Redis broker: several gateway processes as one (``GATEWAY_REDIS_URL``).

A process's :class:`RedisEventBus` and :class:`RedisRoomLeases` share one
:class:`RedisBackend`: the client, the scripts, one queue of operations sent in order
(a lease is released after the events published before it) and one subscription.
The only module that imports redis, and loaded only when configured.

Keys and channels, under the prefix ``P`` (``GATEWAY_REDIS_PREFIX``), for a room ``R``:

==========================  ===============================================================
``P:room:R:meta``           hash: ``seq`` (the newest event id), ``begun`` and ``ended``
                            (the change counters); kept while the room exists
``P:room:R:log``            stream of recent events, entry id ``<event_id>-0``, field
                            ``e`` the frame's JSON; capped, and expires when idle
``P:room:R:live``           hash of the running answer: ``g`` generation, ``m`` message,
                            ``s`` seq; ``P:room:R:text`` its text so far (APPEND)
``P:room:R:lease``          ``"<process> <generation>"``, expiring unless renewed
                            (``"<process> <holder> -"``: not cancellable)
``P:generating``            set of rooms with a running answer (for takeover)
``P:room:R:holds``, ...     who is in the room, on which process (see ``PUBLISH``)
``P:presence``              sorted set: each process, until when it is alive
channel ``P:events``        every room's events, one message per published batch
channel ``P:proc:ID``       requests to one process (cancel)
==========================  ===============================================================

Why these choices:

- Ids are given out by Redis, in the same Lua script that logs the event and
  publishes it, so every process sees one order and the same ids, and the log and
  the live answer can never disagree with what was published. A room's ids are
  consecutive; the first counts from the time (in µs) its counter was created, as in
  :mod:`gateway.eventlog`, so a counter lost with Redis's data never reuses an id.
- Publishing never awaits: frames are queued and one task sends everything queued
  in one script call per round trip. Under load, one call carries hundreds of
  tokens, which is what lets Redis keep up.
- One channel for all rooms, one message per batch: under load a batch carries
  hundreds of events, and reading one pub/sub message costs far more than parsing
  one event, so this is what keeps the broker's cost per token low. Each process
  receives every room's events and skips those of rooms it has no client in — cheap
  for the handful of processes a deployment has (per-room channels would suit
  hundreds of processes better).
- Pub/sub is fast but forgets: a process that was disconnected misses messages. As
  ids are consecutive, a process notices any gap and fills it from the room's log, so
  its clients never miss an event (or are told to resync when the log is gone).
- Scripts name keys they build from the prefix, so this needs a single Redis server
  (or a primary), not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import protocol
from gateway.broker.base import Orphan, Position, StopHandler, live_change
from gateway.errors import Unavailable
from gateway.hub import Event, RoomHub
from gateway.metrics import OFF, Metrics
from gateway.protocol import Frame

log = logging.getLogger(__name__)

BATCH_OPS = 2000
"""Most queued operations sent in one script call."""

MAX_PENDING = 200_000
"""Queued operations kept while Redis is unreachable; past this, tokens are dropped
(the answers' final text is still stored and published when Redis returns)."""

RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class BrokerUnavailable(Unavailable):
    """Redis cannot be reached: whatever needs every process's agreement waits."""

    code = "broker_unavailable"


# ``ARGV``: prefix, log length, log ttl (ms), batch id, then 6 per operation:
# kind, room, frame JSON without its opening brace, then per kind:
#   start: generation, message | token: generation, seq, text | end: generation
#   ended: - (a change is published) | release: lease value
#   enter: person, name, process | exit: person, process | announce: - (no frame)
#   signal: - (the frame's whole JSON: not numbered, not logged)
# What a room's events change is read and written once per room and batch (its ids,
# the live answer's generation, seq and text, the log's expiry), not once per event:
# under load a batch carries hundreds of one room's tokens, each then costing Redis
# one XADD.
#
# Presence: ``P:room:R:holds`` has a field ``"<person> <process>"`` for each process
# that has the person in the room, ``P:room:R:count`` how many processes that is per
# person, ``P:room:R:people`` their names; ``P:presence:<process>`` the rooms where
# the process has people (and how many); ``P:room:R:changed`` who came or went since
# the room's last ``presence`` event. An announce publishes one for them, each person
# as they are now (in the room or not): so whichever process announces, and however
# the changes of several processes interleave, the room's last event is right.
PUBLISH = """
local prefix, maxlen, ttl = ARGV[1], ARGV[2], ARGV[3]
-- A batch whose reply was lost (the connection broke) is sent again: apply it once.
if not redis.call('SET', prefix .. ':batch:' .. ARGV[4], '1', 'NX', 'PX', 600000) then
  return 0
end
local function presence(kind, room, person, a, b)
  local base = prefix .. ':room:' .. room
  if kind == 'enter' then
    local name, process = a, b
    if redis.call('HSETNX', base .. ':holds', person .. ' ' .. process, '1') == 1 then
      redis.call('HINCRBY', base .. ':count', person, 1)
      redis.call('HINCRBY', prefix .. ':presence:' .. process, room, 1)
    end
    if redis.call('HGET', base .. ':people', person) ~= name then
      redis.call('HSET', base .. ':people', person, name)
      redis.call('HSET', base .. ':changed', person, name)
    end
    return
  end
  if redis.call('HDEL', base .. ':holds', person .. ' ' .. a) == 0 then return end
  local rooms = prefix .. ':presence:' .. a
  if redis.call('HINCRBY', rooms, room, -1) <= 0 then redis.call('HDEL', rooms, room) end
  if redis.call('HINCRBY', base .. ':count', person, -1) > 0 then return end
  local name = redis.call('HGET', base .. ':people', person) or person
  redis.call('HDEL', base .. ':count', person)
  redis.call('HDEL', base .. ':people', person)
  redis.call('HSET', base .. ':changed', person, name)
end
-- The presence event of who came or went in the room (the frame's JSON without its
-- opening brace), or nil.
local function announcement(room)
  local base = prefix .. ':room:' .. room
  local changed = redis.call('HGETALL', base .. ':changed')
  if #changed == 0 then return nil end
  redis.call('DEL', base .. ':changed')
  local joined, left = {}, {}
  for j = 1, #changed, 2 do
    local name = redis.call('HGET', base .. ':people', changed[j])
    if name then
      table.insert(joined, cjson.encode({id = changed[j], name = name}))
    else
      table.insert(left, cjson.encode({id = changed[j], name = changed[j + 1]}))
    end
  end
  return '"type":"presence","joined":[' .. table.concat(joined, ',') .. '],"left":[' ..
    table.concat(left, ',') .. ']}'
end
local rooms = {}  -- room -> what this batch does to it
local bodies = {}  -- announce operation -> its event, if it has one
for i = 5, #ARGV, 6 do
  local kind, room = ARGV[i], ARGV[i + 1]
  local numbered = kind ~= 'ended' and kind ~= 'release' and kind ~= 'signal'
  if kind == 'enter' or kind == 'exit' then
    presence(kind, room, ARGV[i + 3], ARGV[i + 4], ARGV[i + 5])
    numbered = false
  elseif kind == 'announce' then
    bodies[i] = announcement(room)
    numbered = bodies[i] ~= nil
  end
  if numbered then
    local r = rooms[room]
    if not r then
      r = {base = prefix .. ':room:' .. room, events = 0, text = {}}
      rooms[room] = r
    end
    r.events = r.events + 1
  end
end
-- The ids: one HINCRBY per room. A counter that did not exist starts from the time in
-- µs (see gateway.eventlog), so ids lost with Redis's data are never given again.
for room, r in pairs(rooms) do
  local meta = r.base .. ':meta'
  local last = redis.call('HINCRBY', meta, 'seq', r.events)
  if last == r.events then
    local t = redis.call('TIME')
    local base = tonumber(t[1]) * 1000000 + tonumber(t[2])
    last = base + r.events
    redis.call('HSET', meta, 'seq', string.format('%d', last), 'base', string.format('%d', base))
  end
  r.next = last - r.events + 1
end
local out = {}  -- 'e', room, event: three lines per event, in one message
for i = 5, #ARGV, 6 do
  local kind, room = ARGV[i], ARGV[i + 1]
  local base = prefix .. ':room:' .. room
  if kind == 'ended' then
    redis.call('HINCRBY', base .. ':meta', 'ended', 1)
  elseif kind == 'release' then
    if redis.call('GET', base .. ':lease') == ARGV[i + 3] then
      redis.call('DEL', base .. ':lease')
    end
  elseif kind == 'signal' then
    table.insert(out, 's')
    table.insert(out, room)
    table.insert(out, ARGV[i + 2])
  elseif kind ~= 'enter' and kind ~= 'exit' and (kind ~= 'announce' or bodies[i]) then
    local r = rooms[room]
    if (kind == 'token' or kind == 'start' or kind == 'end') and r.g == nil then
      r.g = redis.call('HGET', base .. ':live', 'g') or false
    end
    if kind == 'token' then
      if r.g == ARGV[i + 3] then
        r.seq = ARGV[i + 4]
        table.insert(r.text, ARGV[i + 5])
      end
    elseif kind == 'start' then
      redis.call('DEL', base .. ':text')
      redis.call('HSET', base .. ':live', 'g', ARGV[i + 3], 'm', ARGV[i + 4], 's', '0')
      redis.call('SADD', prefix .. ':generating', room)
      r.g, r.seq, r.text = ARGV[i + 3], nil, {}
    elseif kind == 'end' and r.g == ARGV[i + 3] then
      redis.call('DEL', base .. ':live', base .. ':text')
      redis.call('SREM', prefix .. ':generating', room)
      r.g, r.seq, r.text = false, nil, {}
    end
    local id = string.format('%d', r.next)
    r.next = r.next + 1
    local payload = '{"event_id":' .. id .. ',' .. (bodies[i] or ARGV[i + 2])
    redis.call('XADD', base .. ':log', 'MAXLEN', maxlen, id .. '-0', 'e', payload)
    table.insert(out, 'e')
    table.insert(out, room)
    table.insert(out, payload)
  end
end
for room, r in pairs(rooms) do
  redis.call('PEXPIRE', r.base .. ':log', ttl)
  if r.seq then
    redis.call('HSET', r.base .. ':live', 's', r.seq)
    redis.call('APPEND', r.base .. ':text', table.concat(r.text))
  end
end
if #out > 0 then redis.call('PUBLISH', prefix .. ':events', table.concat(out, '\\n')) end
return 0
"""

_INIT_SEQ = """
local function init_seq(meta)
  if redis.call('HEXISTS', meta, 'seq') == 0 then
    local t = redis.call('TIME')
    local base = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
    redis.call('HSET', meta, 'seq', base, 'base', base)
  end
end
"""

# ``ARGV``: prefix, room. The newest event id (the counter starts now if it has not
# yet), the change counters and the live answer.
POSITION = (
    _INIT_SEQ
    + """
local base = ARGV[1] .. ':room:' .. ARGV[2]
init_seq(base .. ':meta')
local m = redis.call('HMGET', base .. ':meta', 'seq', 'begun', 'ended')
local live = redis.call('HMGET', base .. ':live', 'g', 'm', 's')
return {m[1], m[2] or '0', m[3] or '0', live[1], live[2], live[3],
        redis.call('GET', base .. ':text'), redis.call('HGETALL', base .. ':people')}
"""
)

# ``ARGV``: prefix, room, after, most entries. Returns the payloads after ``after``,
# or false when the log cannot give every one of them. ``after`` 0 is "before the
# room's first event" (what ``ready`` says of a room that has had none).
REPLAY = """
local base = ARGV[1] .. ':room:' .. ARGV[2]
local meta = redis.call('HMGET', base .. ':meta', 'seq', 'base')
local seq, after = meta[1], tonumber(ARGV[3])
if after == 0 then
  if not seq then return {} end
  after = tonumber(meta[2])
end
if not seq or after > tonumber(seq) then return false end
if after == tonumber(seq) then return {} end
local entries = redis.call('XRANGE', base .. ':log', string.format('%d', after + 1), '+',
                           'COUNT', ARGV[4])
if #entries == 0 then return false end
local first = string.match(entries[1][1], '^(%d+)-')
local last = string.match(entries[#entries][1], '^(%d+)-')
if first ~= string.format('%d', after + 1) or last ~= seq then return false end
local out = {}
for i, entry in ipairs(entries) do out[i] = entry[2][2] end
return out
"""

# ``ARGV``: prefix, room, lease value, ttl (ms). The room's ``begun`` count, or -1.
# A lease value is ``"<process> <holder>"``, with `` -`` after it when not cancellable.
CLAIM = """
local base = ARGV[1] .. ':room:' .. ARGV[2]
if redis.call('SET', base .. ':lease', ARGV[3], 'NX', 'PX', ARGV[4]) then
  return tonumber(redis.call('HGET', base .. ':meta', 'begun') or '0')
end
return -1
"""

# ``ARGV``: prefix, ttl (ms), then pairs of room, lease value. A lease that is gone
# (Redis restarted, or was away longer than the ttl) is taken again while its answer
# is still the room's live one. Returns the rooms whose lease is lost: held by another
# process, or gone with the answer ended by another (that took it over meanwhile).
RENEW = """
local lost = {}
for i = 3, #ARGV, 2 do
  local base = ARGV[1] .. ':room:' .. ARGV[i]
  local holder = redis.call('GET', base .. ':lease')
  if holder == ARGV[i + 1] then
    redis.call('PEXPIRE', base .. ':lease', ARGV[2])
  elseif not holder and redis.call('HGET', base .. ':live', 'g') ==
      string.match(ARGV[i + 1], '^%S+ (%S+)') then
    redis.call('SET', base .. ':lease', ARGV[i + 1], 'PX', ARGV[2])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# ``ARGV``: prefix, room, generation (or ''). The generation asked to stop, or false.
# Asked whether it has started or not (its holder applies a cancel when it starts).
CANCEL = """
local holder = redis.call('GET', ARGV[1] .. ':room:' .. ARGV[2] .. ':lease')
if not holder then return false end
local owner, generation = string.match(holder, '^(%S+) (%S+)$')
if not generation or (ARGV[3] ~= '' and ARGV[3] ~= generation) then return false end
redis.call('PUBLISH', ARGV[1] .. ':proc:' .. owner, 'cancel ' .. ARGV[2] .. ' ' .. generation)
return generation
"""

# ``ARGV``: prefix. The running answers whose lease is gone: room, generation.
UNLEASED = """
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', ARGV[1] .. ':generating')) do
  local base = ARGV[1] .. ':room:' .. room
  if redis.call('EXISTS', base .. ':lease') == 0 then
    local generation = redis.call('HGET', base .. ':live', 'g')
    if not generation then
      redis.call('SREM', ARGV[1] .. ':generating', room)
    else
      table.insert(out, room)
      table.insert(out, generation)
    end
  end
end
return out
"""

# ``ARGV``: prefix, room, generation, this process, ttl (ms). Takes the lease of a
# running answer if still unleased; returns its message and text so far, or false.
ADOPT = """
local base = ARGV[1] .. ':room:' .. ARGV[2]
local live = redis.call('HMGET', base .. ':live', 'g', 'm')
if live[1] ~= ARGV[3] then return false end
if not redis.call('SET', base .. ':lease', ARGV[4] .. ' ' .. ARGV[3], 'NX', 'PX', ARGV[5]) then
  return false
end
return {live[2], redis.call('GET', base .. ':text') or ''}
"""

# ``ARGV``: prefix, room, final frame JSON. Every process closes its subscribers.
CLOSE = """
local base = ARGV[1] .. ':room:' .. ARGV[2]
for _, field in ipairs(redis.call('HKEYS', base .. ':holds')) do
  redis.call('HDEL', ARGV[1] .. ':presence:' .. string.match(field, ' (%S+)$'), ARGV[2])
end
redis.call('DEL', base .. ':meta', base .. ':log', base .. ':live', base .. ':text',
           base .. ':holds', base .. ':count', base .. ':people', base .. ':changed')
redis.call('SREM', ARGV[1] .. ':generating', ARGV[2])
redis.call('PUBLISH', ARGV[1] .. ':events', 'c\\n' .. ARGV[2] .. '\\n' .. ARGV[3])
return 0
"""


# ``ARGV``: prefix, process, until (ms, Redis's clock). Marks the process alive until
# then; returns whether it was alive (False: its people may have been swept: enter
# them again).
HEARTBEAT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local was = redis.call('ZSCORE', ARGV[1] .. ':presence', ARGV[2])
redis.call('ZADD', ARGV[1] .. ':presence', ms + tonumber(ARGV[3]), ARGV[2])
return was ~= false and tonumber(was) >= ms
"""

# ``ARGV``: prefix. The people that processes no longer alive still have in rooms:
# room, person, process; each to be exited (by whichever live process asks:
# an exit applies once). A dead process with none left is forgotten.
GHOSTS = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local out = {}
for _, process in ipairs(redis.call('ZRANGEBYSCORE', ARGV[1] .. ':presence', '-inf', ms)) do
  local rooms = ARGV[1] .. ':presence:' .. process
  local left = 0
  for _, room in ipairs(redis.call('HKEYS', rooms)) do
    local base = ARGV[1] .. ':room:' .. room
    for _, field in ipairs(redis.call('HKEYS', base .. ':holds')) do
      local person, holder = string.match(field, '^(.*) (%S+)$')
      if holder == process then
        left = left + 1
        table.insert(out, room)
        table.insert(out, person)
        table.insert(out, process)
      end
    end
  end
  if left == 0 then
    redis.call('DEL', rooms)
    redis.call('ZREM', ARGV[1] .. ':presence', process)
  end
end
return out
"""


def process_id() -> str:
    """A name for this process, unique among the gateway's (host, pid, random)."""
    return f"{socket.gethostname()}.{os.getpid()}.{os.urandom(3).hex()}"


class RedisBackend:
    """What a process's :class:`RedisEventBus` and :class:`RedisRoomLeases` share: the
    client, the scripts, the queue of operations sent in order by one task (events,
    and releases after them), and the one subscription that brings the rooms' events
    and the requests to this process. Started by the first of the two to start;
    closed by the first to close (the app closes both, after the chat service)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "chat-gateway",
        log_size: int = 1024,
        log_seconds: float = 300.0,
        process: str | None = None,
        metrics: Metrics = OFF,
    ) -> None:
        self.redis = redis  # the caller's, and closed by it
        self.metrics = metrics
        self.prefix = prefix
        self.process = process or process_id()
        self.log_size = log_size
        self.log_ms = int(log_seconds * 1000)
        self.scripts = {
            name: redis.register_script(source)
            for name, source in [
                ("publish", PUBLISH),
                ("position", POSITION),
                ("replay", REPLAY),
                ("claim", CLAIM),
                ("renew", RENEW),
                ("cancel", CANCEL),
                ("unleased", UNLEASED),
                ("adopt", ADOPT),
                ("close", CLOSE),
                ("heartbeat", HEARTBEAT),
                ("ghosts", GHOSTS),
            ]
        }
        self.events_channel = f"{prefix}:events"
        # Set by the bus and the leases before they start the backend.
        self.on_events: Callable[[bytes], None] = lambda data: None
        self.on_request: Callable[[str], None] = lambda request: None
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None
        self._pubsub = redis.pubsub()
        self._pending: list[str] = []  # queued operations, 6 strings each
        self._sending = 0  # operations in the batch being sent
        self._queued = 0  # operations queued since the start, and sent
        self._sent = 0
        self._settling: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started: asyncio.Future[None] | None = None
        self._closed = False
        self.publish_ok = True
        self.reader_ok = False

    @property
    def ready(self) -> bool:
        return self.publish_ok and self.reader_ok

    def room(self, room_id: str) -> str:
        return f"{self.prefix}:room:{room_id}"

    async def call(self, script: str, *args: Any) -> Any:
        try:
            return await self.scripts[script](args=list(args))
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis is unavailable: {exc}") from exc

    async def command(self, awaitable: Awaitable[Any]) -> Any:
        try:
            return await awaitable
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis is unavailable: {exc}") from exc

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe and start the reader and the publisher (once; a second call
        waits for the first)."""
        if self._started is not None:
            return await asyncio.shield(self._started)
        self._started = asyncio.get_running_loop().create_future()
        try:
            await self.redis.ping()  # fail at start, with a clear error, if unreachable
            await self._pubsub.subscribe(self.events_channel, f"{self.prefix}:proc:{self.process}")
            # The first message read is the subscriptions' confirmation.
            await asyncio.wait_for(self._pubsub.get_message(timeout=10), 10)
        except BaseException as exc:
            self._started.set_exception(exc)
            self._started.exception()  # retrieved: the caller has it
            raise
        self.reader_ok = True
        self._tasks = [
            asyncio.create_task(self._read(), name="broker reader"),
            asyncio.create_task(self._flush(), name="broker publisher"),
        ]
        self._started.set_result(None)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Let what is queued (the final frames of stopped answers) go out first.
        for _ in range(100):
            if not (self._pending or self._sending) or not self.publish_ok:
                break
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()

    # --- the queue of operations ---------------------------------------------------

    def queue(self, *op: str) -> None:
        """Send ``op`` (6 strings) after everything queued before; never awaits."""
        if len(self._pending) >= MAX_PENDING * 6:
            self._drop_tokens()
        self._pending.extend(op)
        self._queued += 1
        self._wake.set()

    async def settle(self) -> None:
        """Wait until every operation queued so far has been applied in Redis."""
        if self._sent >= self._queued:
            return
        future = asyncio.get_running_loop().create_future()
        self._settling.append((self._queued, future))
        await future

    def _settled(self) -> None:
        waiting = []
        for target, future in self._settling:
            if target <= self._sent:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((target, future))
        self._settling = waiting

    def _drop_tokens(self) -> None:
        ops = self._pending
        kept = [ops[i : i + 6] for i in range(0, len(ops), 6) if ops[i] != "token"]
        dropped = len(ops) // 6 - len(kept)
        log.error("Redis unreachable: dropping %d queued tokens", dropped)
        self._pending = [part for op in kept for part in op]
        self._sent += dropped  # never sent: nobody waits for them

    async def _flush(self) -> None:
        """Send queued operations, in order, one script call per round trip."""
        for number in itertools.count():
            while not self._pending:
                await self._wake.wait()
                self._wake.clear()
            batch = self._pending[: BATCH_OPS * 6]
            del self._pending[: len(batch)]
            self._sending = len(batch) // 6
            await self._send(f"{self.process}.{number}", batch)
            self._sent += self._sending
            self._sending = 0
            if self._settling:
                self._settled()

    async def _send(self, batch_id: str, batch: list[str]) -> None:
        """Run one batch; while Redis is unreachable, retry the very same batch (the
        script applies a batch id once, should a reply have been lost)."""
        for failures in itertools.count():
            try:
                began = time.monotonic()
                await self.scripts["publish"](
                    args=[self.prefix, self.log_size, self.log_ms, batch_id, *batch]
                )
                self.metrics.publish_seconds.observe(time.monotonic() - began)
            except RedisError as exc:
                if self.publish_ok:
                    self.metrics.redis_outages.inc()
                    log.error("Redis unreachable, holding events: %s", exc)
                self.publish_ok = False
                await asyncio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
                continue
            if not self.publish_ok:
                log.warning("Redis reachable again; held events sent")
            self.publish_ok = True
            return

    # --- the subscription ----------------------------------------------------------

    async def _read(self) -> None:
        """Hand on what the channels bring; after a lost connection, reconnect and
        let the bus fill every room's gap from its log."""
        failures = 0
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                if self.reader_ok:
                    log.error("lost the Redis subscription: %s", exc)
                self.reader_ok = False
                await asyncio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
                failures += 1
                continue
            if not self.reader_ok and self._pubsub.connection is not None:
                if self._pubsub.connection.is_connected:
                    self.reader_ok, failures = True, 0
                    if self.on_reconnect is not None:
                        await self.on_reconnect()
            if message is None or message["type"] != "message":
                continue
            if message["channel"].decode() == self.events_channel:
                self.on_events(message["data"])
            else:
                self.on_request(message["data"].decode())


class RedisEventBus:
    """Rooms' events shared by every gateway process connected to one Redis server."""

    name = "redis"

    def __init__(self, backend: RedisBackend, *, presence_seconds: float = 10.0) -> None:
        self._backend = backend
        self._hub: RoomHub | None = None
        self._listening: dict[str, int] = {}  # room -> newest event id delivered here
        self._background: set[asyncio.Task[None]] = set()
        self.presence_ms = int(presence_seconds * 1000)
        self._entered: dict[str, dict[str, str]] = {}  # room -> person -> name, here
        self._presence: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._backend.ready

    async def start(self, hub: RoomHub) -> None:
        self._hub = hub
        self._backend.on_events = self._received
        self._backend.on_reconnect = self._repair_all
        await self._backend.start()
        await self._heartbeat()
        self._presence = asyncio.create_task(self._keep_presence(), name="broker presence")

    async def aclose(self) -> None:
        if self._presence is not None:
            self._presence.cancel()
            await asyncio.wait([self._presence], timeout=5)
        for room_id, people in list(self._entered.items()):  # they leave with us
            for person, name in list(people.items()):
                self.exit(room_id, {"id": person, "name": name})
            self.announce(room_id)
        await self._backend.aclose()

    def publish(self, room_id: str, frame: Frame) -> None:
        body = protocol.encode(frame)[1:]  # Redis prepends '{"event_id":N,'
        change = live_change(frame)
        if change == "token":
            self._backend.queue(
                "token", room_id, body, frame["generation_id"], str(frame["seq"]), frame["text"]
            )
        elif change == "start":
            self._backend.queue(
                "start", room_id, body, frame["generation_id"], frame["message_id"], ""
            )
        elif change == "end":
            self._backend.queue("end", room_id, body, frame["generation_id"], "", "")
        else:
            self._backend.queue("event", room_id, body, "", "", "")

    def signal(self, room_id: str, frame: Frame) -> None:
        self._backend.queue("signal", room_id, protocol.encode(frame), "", "", "")

    async def settle(self) -> None:
        await self._backend.settle()

    def enter(self, room_id: str, person: dict[str, str]) -> None:
        self._entered.setdefault(room_id, {})[person["id"]] = person["name"]
        self._backend.queue(
            "enter", room_id, "", person["id"], person["name"], self._backend.process
        )

    def exit(self, room_id: str, person: dict[str, str]) -> None:
        people = self._entered.get(room_id, {})
        people.pop(person["id"], None)
        if not people:
            self._entered.pop(room_id, None)
        self._backend.queue("exit", room_id, "", person["id"], self._backend.process, "")

    def announce(self, room_id: str) -> None:
        self._backend.queue("announce", room_id, "", "", "", "")

    async def _keep_presence(self) -> None:
        """Keep this process marked alive, and make the people of dead ones leave."""
        while True:
            await asyncio.sleep(self.presence_ms / 3000)
            try:
                await self._heartbeat()
                await self._exit_ghosts()
            except RedisError as exc:
                log.error("keeping presence failed: %s", exc)

    async def _heartbeat(self) -> None:
        backend = self._backend
        alive = await backend.scripts["heartbeat"](
            args=[backend.prefix, backend.process, self.presence_ms]
        )
        if not alive:  # away too long: our people may have been swept; enter them again
            for room_id, people in self._entered.items():
                for person, name in people.items():
                    self.enter(room_id, {"id": person, "name": name})
                self.announce(room_id)

    async def _exit_ghosts(self) -> None:
        backend = self._backend
        found = await backend.scripts["ghosts"](args=[backend.prefix])
        rooms = set()
        for i in range(0, len(found), 3):
            room, person, process = (part.decode() for part in found[i : i + 3])
            log.info("room %s: %s left with process %s, which stopped", room, person, process)
            backend.queue("exit", room, "", person, process, "")
            rooms.add(room)
        for room in rooms:
            self.announce(room)

    async def listen(self, room_id: str) -> None:
        if room_id in self._listening:
            return
        # From now on this room's events are delivered here (0: no gap check until
        # the first); events up to the room's current id may come too, and are
        # dropped by the joining subscriber, which starts after a later position.
        self._listening[room_id] = 0
        backend = self._backend
        seq = await backend.command(backend.redis.hget(f"{backend.room(room_id)}:meta", "seq"))
        if room_id in self._listening:
            self._listening[room_id] = max(self._listening[room_id], int(seq or 0))

    def forget(self, room_id: str) -> None:
        self._listening.pop(room_id, None)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)  # a reference, until it is done
        task.add_done_callback(self._background.discard)

    def _received(self, data: bytes) -> None:
        """Deliver a batch's events of the rooms listened to here."""
        assert self._hub is not None
        lines = data.split(b"\n")
        for i in range(0, len(lines) - 2, 3):
            room_id = lines[i + 1].decode()
            last = self._listening.get(room_id)
            if last is None:
                continue  # no client of that room here
            if lines[i] == b"c":
                self._hub.close_room(room_id, protocol.decode(lines[i + 2].decode()))
                continue
            if lines[i] == b"s":  # a signal: not numbered
                self._hub.deliver(room_id, Event.decode(lines[i + 2]))
                continue
            event = Event.decode(lines[i + 2])
            event_id = event.event_id
            if event_id <= last:
                continue  # already delivered (by a gap repair)
            if last and event_id > last + 1:
                self._spawn(self._repair(room_id))  # it delivers this one too
                continue
            self._listening[room_id] = event_id
            self._hub.deliver(room_id, event)

    async def _repair_all(self) -> None:
        for room_id in list(self._listening):
            await self._repair(room_id)

    async def _repair(self, room_id: str) -> None:
        """Deliver the room's events missed since the last one delivered here."""
        assert self._hub is not None
        for failures in itertools.count():
            last = self._listening.get(room_id)
            if last is None:
                return
            try:
                missed = await self.replay(room_id, last)
                break
            except BrokerUnavailable:
                await asyncio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
        if missed is None:
            log.warning("room %s: events lost while disconnected; clients must resync", room_id)
            error = Unavailable("missed events; reconnect to resync", code="resync_required")
            self._hub.close_room(room_id, protocol.error_frame(error))
            self._listening.pop(room_id, None)
            return
        for event in missed:
            if event.event_id > self._listening.get(room_id, event.event_id):
                self._listening[room_id] = event.event_id
                self._hub.deliver(room_id, event)

    async def position(self, room_id: str) -> Position:
        seq, begun, ended, generation, message, seqno, text, people = await self._backend.call(
            "position", self._backend.prefix, room_id
        )
        members = [
            {"id": people[i].decode(), "name": people[i + 1].decode()}
            for i in range(0, len(people), 2)
        ]
        live = None
        if generation is not None:
            live = {
                "generation_id": generation.decode(),
                "message_id": message.decode(),
                "seq": int(seqno),
                "text": (text or b"").decode(),
            }
        return Position(int(seq), live, int(begun), int(ended), members)

    async def changes(self, room_id: str) -> tuple[int, int]:
        backend = self._backend
        begun, ended = await backend.command(
            backend.redis.hmget(f"{backend.room(room_id)}:meta", "begun", "ended")
        )
        return int(begun or 0), int(ended or 0)

    async def replay(self, room_id: str, after: int) -> list[Event] | None:
        backend = self._backend
        payloads = await backend.call(
            "replay", backend.prefix, room_id, after, backend.log_size * 2 + 128
        )
        if payloads is None:
            return None
        return [Event.decode(payload) for payload in payloads]

    @contextlib.asynccontextmanager
    async def changing(self, room_id: str) -> AsyncIterator[int]:
        backend = self._backend
        begun = await backend.command(
            backend.redis.hincrby(f"{backend.room(room_id)}:meta", "begun")
        )
        try:
            yield int(begun)
        finally:
            backend.queue("ended", room_id, "", "", "", "")  # after the change's events

    async def close_room(self, room_id: str, final: Frame) -> None:
        await self._backend.call("close", self._backend.prefix, room_id, protocol.encode(final))

    def prune(self) -> None:
        pass  # Redis expires idle logs itself


class RedisRoomLeases:
    """Rooms' leases on one Redis server: held by a process, renewed every third of
    ``lease_seconds``, taken over by another process when not renewed in time."""

    def __init__(self, backend: RedisBackend, *, lease_seconds: float = 10.0) -> None:
        self._backend = backend
        self.lease_ms = int(lease_seconds * 1000)
        self._on_stop: StopHandler | None = None
        self._held: dict[str, str] = {}  # room -> lease value this process holds
        # (room, generation) -> when first seen running without a lease
        self._suspects: dict[tuple[str, str], float] = {}
        self._renewer: asyncio.Task[None] | None = None

    def _value(self, holder_id: str, cancellable: bool = True) -> str:
        value = f"{self._backend.process} {holder_id}"
        return value if cancellable else f"{value} -"

    async def start(self, on_stop: StopHandler) -> None:
        self._on_stop = on_stop
        self._backend.on_request = self._requested
        await self._backend.start()
        self._renewer = asyncio.create_task(self._renew(), name="broker leases")

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.wait([self._renewer], timeout=5)
        await self._backend.aclose()

    def _requested(self, request: str) -> None:
        command, room_id, generation_id = request.split(" ")
        if command == "cancel" and self._on_stop is not None:
            self._on_stop(room_id, generation_id, "cancelled")

    async def claim(self, room_id: str, holder_id: str, *, cancellable: bool = True) -> int | None:
        value = self._value(holder_id, cancellable)
        backend = self._backend
        begun = await backend.call("claim", backend.prefix, room_id, value, self.lease_ms)
        if begun < 0:
            return None
        self._held[room_id] = value
        return int(begun)

    def _forget(self, room_id: str, value: str) -> bool:
        if self._held.get(room_id) == value:
            del self._held[room_id]
            return True
        return False

    def release(self, room_id: str, holder_id: str) -> None:
        for value in (self._value(holder_id), self._value(holder_id, cancellable=False)):
            if self._forget(room_id, value):
                self._backend.queue("release", room_id, "", value, "", "")

    async def _renew(self) -> None:
        backend = self._backend
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            if not self._held:
                continue
            held = dict(self._held)
            pairs = [part for room, value in held.items() for part in (room, value)]
            try:
                lost = await backend.scripts["renew"](args=[backend.prefix, self.lease_ms, *pairs])
            except RedisError as exc:
                log.error("renewing %d leases failed: %s", len(self._held), exc)
                continue
            for room in (name.decode() for name in lost):
                value = held[room]
                if self._held.get(room) != value:
                    continue  # released meanwhile
                del self._held[room]
                holder_id = value.split(" ")[1]
                log.warning(
                    "room %s: %s lost its lease to another process; stopping it",
                    room,
                    holder_id,
                )
                if self._on_stop is not None:
                    self._on_stop(room, holder_id, "lost")

    async def request_cancel(self, room_id: str, generation_id: str | None) -> str | None:
        backend = self._backend
        asked = await backend.call("cancel", backend.prefix, room_id, generation_id or "")
        return asked.decode() if asked is not None else None

    async def generating(self) -> set[str]:
        backend = self._backend
        rooms = await backend.command(backend.redis.smembers(f"{backend.prefix}:generating"))
        return {room.decode() for room in rooms}

    async def orphans(self) -> list[Orphan]:
        """Generations seen without a lease for longer than a lease lasts: their owner
        had that long to renew it (after a Redis restart, say) and did not."""
        backend = self._backend
        found = await backend.call("unleased", backend.prefix)
        now = asyncio.get_running_loop().time()
        unleased = {(found[i].decode(), found[i + 1].decode()) for i in range(0, len(found), 2)}
        self._suspects = {key: self._suspects.get(key, now) for key in unleased}
        orphans = []
        for (room, generation), since in self._suspects.items():
            if now - since < self.lease_ms / 1000:
                continue
            adopted = await backend.call(
                "adopt", backend.prefix, room, generation, backend.process, self.lease_ms
            )
            if adopted is not None:
                self._held[room] = self._value(generation)
                message, text = (part.decode() for part in adopted)
                orphans.append(Orphan(room, generation, message, text))
        return orphans
