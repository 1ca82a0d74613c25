"""One running answer: stream from the provider, fan out tokens, persist the result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway import protocol
from gateway.errors import GatewayError, UpstreamError
from gateway.hub import RoomHub
from gateway.providers.base import ChatProvider, CompletionRequest
from gateway.store.db import Database
from gateway.store.models import Message
from gateway.store.repository import MessageStore

log = logging.getLogger(__name__)


class GenerationTask:
    """Streams one assistant message into a room.

    Owned by the chat service, not by any connection: a client that disconnects never
    stops a generation for the others. Tokens are published as they arrive; the text
    is checkpointed to the database every ``checkpoint_interval`` seconds (never once
    per token), so a crash loses about a second of text at most.
    """

    def __init__(
        self,
        *,
        generation_id: str,
        room_id: str,
        message_view: dict[str, Any],
        request: CompletionRequest,
        provider: ChatProvider,
        db: Database,
        hub: RoomHub,
        room_lock: asyncio.Lock,
        checkpoint_interval: float,
        on_exit: Callable[[GenerationTask], None],
    ) -> None:
        self.id = generation_id
        self.room_id = room_id
        self.message_id: str = message_view["id"]
        self.message_view = message_view  # the stored message as it was at start
        self.request = request
        self.seq = 0
        self._parts: list[str] = []
        self._provider = provider
        self._db = db
        self._hub = hub
        self._room_lock = room_lock
        self._checkpoint_interval = checkpoint_interval
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._on_exit = on_exit
        self._stop_status = "cancelled"
        self._finishing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def snapshot(self) -> dict[str, Any]:
        """What a client joining mid-answer needs: the text so far and its last seq."""
        return {
            "generation_id": self.id,
            "message_id": self.message_id,
            "seq": self.seq,
            "text": self.text,
        }

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"generation {self.id}")

    def stop(self, status: str = "cancelled") -> bool:
        """Stop streaming; the partial text is stored with ``status``.

        Returns False when the answer is already being finalised (nothing to stop).
        """
        if self._finishing or self._task is None:
            return False
        self._stop_status = status
        self._finishing = True
        self._task.cancel()
        return True

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        error: GatewayError | None = None
        try:
            next_checkpoint = time.monotonic() + self._checkpoint_interval
            async with contextlib.aclosing(self._provider.stream(self.request)) as chunks:
                async for chunk in chunks:
                    if chunk.text:
                        self.seq += 1
                        self._parts.append(chunk.text)
                        self._hub.publish(
                            self.room_id, protocol.token_frame(self.id, self.seq, chunk.text)
                        )
                        if time.monotonic() >= next_checkpoint:
                            self._checkpoint()
                            next_checkpoint = time.monotonic() + self._checkpoint_interval
                    if chunk.finish_reason is not None:
                        finish_reason = chunk.finish_reason
                    if chunk.usage is not None:
                        usage = chunk.usage
            self._finishing = True
            if finish_reason is None:
                raise UpstreamError(
                    "the model's stream ended before the answer was finished",
                    code="upstream_truncated",
                )
            status = "complete"
        except asyncio.CancelledError:
            status = self._stop_status
        except GatewayError as exc:
            status, error = "error", exc
        except Exception as exc:
            log.exception("generation %s failed", self.id)
            status, error = "error", GatewayError(f"internal error: {exc!r}")
        self._finishing = True
        try:
            await self._finish(status, finish_reason, usage, error)
        finally:
            self._on_exit(self)

    def _checkpoint(self) -> None:
        # At most one checkpoint in flight; a slow disk must not queue up writes.
        if self._checkpoint_task is not None and not self._checkpoint_task.done():
            return
        self._checkpoint_task = asyncio.create_task(self._write_checkpoint(self.text))

    async def _write_checkpoint(self, text: str) -> None:
        try:
            async with self._db.transaction() as session:
                await MessageStore(session).checkpoint(self.message_id, text)
        except Exception:
            log.exception("checkpoint of %s failed", self.message_id)

    async def _finish(
        self,
        status: str,
        finish_reason: str | None,
        usage: dict[str, Any] | None,
        error: GatewayError | None,
    ) -> None:
        if self._checkpoint_task is not None:
            await self._checkpoint_task  # never let a stale checkpoint land last
        async with self._room_lock:
            try:
                async with self._db.transaction() as session:
                    store = MessageStore(session)
                    message = await session.get(Message, self.message_id)
                    if message is None:  # the room was deleted meanwhile
                        return
                    message.content = self.text
                    message.status = status
                    message.finish_reason = finish_reason
                    message.usage = usage
                    if error is not None:
                        message.error = error.to_dict()
                    elif status == "interrupted":
                        message.error = {
                            "code": "interrupted",
                            "message": "the gateway stopped mid-answer",
                        }
                    await session.flush()
                    view = await store.message_view(message)
            except Exception as exc:
                log.exception("storing the answer %s failed", self.message_id)
                self._hub.publish(
                    self.room_id,
                    protocol.error_frame(
                        GatewayError(f"storing the answer failed: {exc!r}"), generation_id=self.id
                    ),
                )
                return
            if status == "complete":
                frame = protocol.done_frame(self.id, view, finish_reason, usage)
            elif status == "cancelled":
                frame = protocol.cancelled_frame(self.id, view)
            else:
                exc = error or GatewayError("the gateway stopped mid-answer", code="interrupted")
                frame = protocol.error_frame(exc, generation_id=self.id, answer=view)
            self._hub.publish(self.room_id, frame)
