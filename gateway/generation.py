"""One running answer: stream from the provider, fan out tokens, store the result."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any, Protocol

from gateway import logs, protocol
from gateway.broker.base import EventBus
from gateway.checks import CheckPipeline, Verdict
from gateway.errors import CheckFailed, GatewayError, Unavailable, UpstreamError, internal_error
from gateway.metrics import OFF, Metrics
from gateway.providers.base import ChatProvider, CompletionRequest, Moderation
from gateway.store.writer import WriteBatch, Writer
from gateway.tracing import NO_TRACE, AnswerTrace, UpstreamCall

log = logging.getLogger(__name__)

INTERRUPTED = {"code": "interrupted", "message": "the gateway stopped mid-answer"}

STORE_RETRY_DELAYS = (0.2, 1.0, 3.0)
"""Seconds before each new attempt at storing a final answer that failed to store."""

CHECK_EVERY = 32
"""Characters of new text between two runs of the output checks (joining the text
for every token would cost more than the checks themselves)."""


def rejected(verdict: Verdict, code: str, what: str) -> None:
    """Raise ``code`` (with the rule's name) unless ``verdict`` allows; ``what`` is
    "message" or "answer"."""
    if not verdict.allowed:
        raise CheckFailed(
            f"the {what} was stopped by the {verdict.rule} check: {verdict.reason}",
            code=code,
            rule=verdict.rule or "unknown",
        )


class GenerationOwner(Protocol):
    """What a generation needs from whoever launched it (the generation registry)."""

    def finishing(self, generation: GenerationTask) -> AbstractAsyncContextManager[None]:
        """Bracket storing and announcing the end as one change of the room: no other
        change of the room, and no snapshot of it, runs meanwhile. On leaving, the
        room's cached state takes :attr:`GenerationTask.final`."""
        ...

    def exited(self, generation: GenerationTask) -> None:
        """The generation is over, however it ended: its room and quota are free."""
        ...


class GenerationTask:
    """Streams one assistant message into a room.

    Owned by the generation registry, not by any connection: a client that disconnects
    never stops a generation for the others. Tokens are published as they arrive; the
    registry checkpoints :attr:`text` periodically (never once per token), and the
    final state is stored before ``done``/``cancelled``/``error`` is published.
    """

    def __init__(
        self,
        *,
        generation_id: str,
        room_id: str,
        message_view: dict[str, Any],
        request: CompletionRequest,
        provider: ChatProvider,
        checks: CheckPipeline | None,
        moderator: Moderation | None,
        writer: Writer,
        bus: EventBus,
        owner: GenerationOwner,
        sender: str = "anonymous",
        hold_back: int = 0,
        metrics: Metrics = OFF,
        trace: AnswerTrace = NO_TRACE,
    ) -> None:
        self.id = generation_id
        self.sender = sender  # who started it: its quotas are released at the end
        self.room_id = room_id
        self.message_id: str = message_view["id"]
        self.message_view = message_view  # the stored message as it was at start
        self.final: dict[str, Any] | None = None  # the answer's final row, once stored
        self.request = request
        self.seq = 0
        self.queue_position = 0  # > 0 while the model keeps it waiting in line
        self.checkpointed_seq = 0
        self._parts: list[str] = []
        self._provider = provider
        self._checks = checks.output_stream() if checks is not None else None
        self._checked_chars = 0
        self._checked_upto = 0  # characters of the answer the checks last passed
        # Text not shown yet: with a secret prompt, tokens wait here until the checks
        # have seen ``hold_back`` characters past them, so a leak is caught before
        # anyone sees it. Never stored either: what is stored was shown.
        self._hold_back = hold_back if checks is not None else 0
        self._held = ""
        self._shown = 0  # characters released from _held
        self._moderator = moderator
        self._writer = writer
        self._bus = bus
        self._owner = owner
        self._stop_status = "cancelled"
        self._finishing = False
        self._running = False  # the task's body has begun
        self._began = 0.0  # when the task's body began, and when the first token was shown
        self._first_token_at: float | None = None
        self._last_token_at = 0.0
        self._metrics = metrics
        self._trace = trace
        trace.launched()  # this generation ends the answer's span
        self._upstream: UpstreamCall | None = None
        self._exited = False  # the owner has been told
        self._task: asyncio.Task[None] | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"generation {self.id}")
        self._task.add_done_callback(self._after_task)

    def stop(self, status: str = "cancelled") -> bool:
        """Stop streaming; the partial text is stored with ``status`` (for ``lost``:
        stored as ``interrupted`` and not announced, as another process has ended the
        answer in the room).

        Returns False when the answer is already being finalised (nothing to stop).
        """
        if self._finishing or self._task is None:
            return False
        self._stop_status = status
        self._finishing = True
        # A task cancelled before its first step never runs its body, so nothing
        # would store the answer or give the room back: until the body has begun,
        # the flag alone asks it to stop (see _run).
        if self._running:
            self._task.cancel()
        return True

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        self._running = True
        self._began = time.monotonic()
        self._metrics.generations.inc()
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        error: GatewayError | None = None
        room_id, generation_id, publish = self.room_id, self.id, self._bus.publish
        try:
            if self._finishing:  # stopped before this task first ran
                raise asyncio.CancelledError
            with self._trace.upstream(self._provider.name, self.request) as upstream:
                self._upstream = upstream
                request = self.request
                if upstream.headers:
                    request = replace(request, headers={**request.headers, **upstream.headers})
                async with contextlib.aclosing(self._provider.stream(request)) as chunks:
                    async for chunk in chunks:
                        # A chunk may carry the last text and how the answer ended together
                        # (one upstream read); noted first, as the text may be held back.
                        if chunk.finish_reason is not None:
                            finish_reason = chunk.finish_reason
                        if chunk.usage is not None:
                            usage = chunk.usage
                        if text := chunk.text:
                            if "\x00" in text:
                                # No database stores U+0000 in text (PostgreSQL refuses
                                # it), and no reader wants it: dropped, everywhere alike.
                                text = text.replace("\x00", "")
                                if not text:
                                    continue
                            if self._hold_back:
                                self._held += text
                                self._check_output(len(text))
                                text = self._releasable()
                                if not text:
                                    continue
                            self._count_token()
                            self._parts.append(text)
                            publish(room_id, protocol.token_frame(generation_id, self.seq, text))
                            if self._checks is not None and not self._hold_back:
                                self._check_output(len(text))
                        elif chunk.queue_position is not None:
                            self._queued(chunk.queue_position)
                if finish_reason is None:
                    raise UpstreamError(
                        "the model's stream ended before the answer was finished",
                        code="upstream_truncated",
                    )
                upstream.finished(finish_reason, usage)
            self._finishing = True
            if self._checks is not None or self._moderator is not None:
                with self._trace.step("checks.output"):
                    await self._check_whole_answer()
            status = "complete"
        except asyncio.CancelledError:
            if not self._finishing:
                raise  # not stop(): let whoever cancelled this task have its way
            status = self._stop_status
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled: later awaits (and timeouts) run as usual
        except CheckFailed as exc:
            status, error = "blocked", exc
        except GatewayError as exc:
            status, error = "error", exc
        except Exception:
            log.exception("generation %s failed", self.id)
            status, error = "error", internal_error()
        self._finishing = True
        try:
            if status == "lost":
                # The process that took the room over has ended the answer in the
                # room; keep the fullest text here, without a second announcement.
                await self._store(self._final("interrupted", None, None, None))
                self._trace.end("interrupted", lost=True)
            else:
                await self._finish(status, finish_reason, usage, error)
        finally:
            self._trace.end("interrupted")  # unless ended above
            self._exit()

    def _queued(self, position: int) -> None:
        """The model keeps the answer waiting at ``position`` in its line (0: started):
        the room is told (a signal: only the latest position matters, none is logged)."""
        self.queue_position = position
        self._bus.signal(self.room_id, protocol.queue_frame(self.id, position))

    async def _check_whole_answer(self) -> None:
        """The last run of the output checks, on the whole answer (then the text held
        back is shown), and its moderation."""
        if self._checks is not None:
            self._check_output(0, final=True)
        if self._held:  # checked whole: shown at last
            self._count_token()
            self._parts.append(self._held)
            self._bus.publish(self.room_id, protocol.token_frame(self.id, self.seq, self._held))
            self._held = ""
        if self._moderator is not None:  # a network call: once, on the whole answer
            rejected(await self._moderator.check(self.text), "output_blocked", "answer")

    def _exit(self) -> None:
        if not self._exited:
            self._exited = True
            self._owner.exited(self)

    def _count_token(self) -> None:
        """One more token shown: its number, and when (the first's delay and the gaps
        between them are measured)."""
        self.seq += 1
        now = time.monotonic()
        if self.seq == 1:
            self._first_token_at = now
            self._metrics.first_token.observe(now - self._began)
            if self._upstream is not None:
                self._upstream.first_token()
        else:
            self._metrics.token_gap.observe(now - self._last_token_at)
        self._last_token_at = now

    def _after_task(self, task: asyncio.Task[None]) -> None:
        """However the task ended, the room and the sender's quota are given back."""
        if self._running:
            self._metrics.generations.dec()
        if not self._exited:
            log.error(
                "generation %s ended without finishing (%s); its room is released",
                self.id,
                "cancelled" if task.cancelled() else repr(task.exception()),
            )
            self._trace.end("interrupted")
            self._exit()

    def _check_output(self, added: int, *, final: bool = False) -> None:
        """Run the output checks on the answer so far (every ``CHECK_EVERY`` new
        characters, and at the end); raise ``output_blocked`` when one fails."""
        assert self._checks is not None
        self._checked_chars += added
        if not final and self._checked_chars < CHECK_EVERY:
            return
        self._checked_chars = 0
        text = self.text + self._held
        rejected(self._checks.check(text, final), "output_blocked", "answer")
        self._checked_upto = len(text)

    def _releasable(self) -> str:
        """Take from the held-back text what may be shown: what the checks passed with
        ``hold_back`` more characters after it (a leak that began there would have
        been caught)."""
        count = self._checked_upto - self._hold_back - self._shown
        if count <= 0:
            return ""
        self._shown += count
        released, self._held = self._held[:count], self._held[count:]
        return released

    async def _finish(
        self,
        status: str,
        finish_reason: str | None,
        usage: dict[str, Any] | None,
        error: GatewayError | None,
    ) -> None:
        final = self._final(status, finish_reason, usage, error)
        # Store, then publish, as one change: a client joining meanwhile sees either
        # the answer streaming plus this frame, or the stored answer alone.
        async with self._owner.finishing(self):
            if not await self._store(final):
                # The room moves on; the stored row stays "streaming" until the next
                # start marks it interrupted. Clients hear what happened, not why.
                status = "error"
                error = Unavailable("the answer could not be saved", code="store_failed")
                final.update(status=status, error=error.to_dict())
            self.final = final
            view = {**self.message_view, **final}
            if status == "complete":
                frame = protocol.done_frame(self.id, view, finish_reason, usage)
            elif status == "cancelled":
                frame = protocol.cancelled_frame(self.id, view)
            else:
                exc = error or GatewayError(INTERRUPTED["message"], code="interrupted")
                frame = protocol.error_frame(exc, generation_id=self.id, answer=view)
            self._bus.publish(self.room_id, frame)
        metrics = self._metrics
        metrics.answers.labels(status).inc()
        # The upstream's count when it gives one: a token frame carries one upstream
        # read, which may hold several tokens.
        tokens = (usage or {}).get("completion_tokens") or self.seq
        metrics.tokens.inc(tokens)
        if isinstance(error, UpstreamError):
            metrics.upstream_errors.labels(error.code).inc()
        timing = final["timing"] or {}
        logs.event(
            logs.answers,
            "answer",
            room=self.room_id,
            generation=self.id,
            sender=self.sender,
            model=self.request.model,
            status=status,
            finish_reason=finish_reason,
            ttft_ms=timing.get("first_token_ms"),
            duration_ms=timing.get("duration_ms"),
            tokens=tokens,
            error=error.code if error is not None else None,
        )
        self._trace.end(
            status,
            error,
            message_id=self.message_id,
            tokens=tokens,
            first_token_ms=timing.get("first_token_ms"),
        )

    def _final(
        self,
        status: str,
        finish_reason: str | None,
        usage: dict[str, Any] | None,
        error: GatewayError | None,
    ) -> dict[str, Any]:
        """The answer's final row (see :data:`gateway.store.writer.FINAL_FIELDS`)."""
        return {
            "id": self.message_id,
            "content": self.text,
            "status": status,
            "finish_reason": finish_reason,
            "usage": usage,
            "timing": self._timing(),
            "error": error.to_dict() if error else INTERRUPTED if status == "interrupted" else None,
        }

    def _timing(self) -> dict[str, int | None] | None:
        """Milliseconds from the answer's start to its first token shown, and to now."""
        if not self._began:
            return None  # never ran
        first = self._first_token_at
        return {
            "first_token_ms": round((first - self._began) * 1000) if first is not None else None,
            "duration_ms": round((time.monotonic() - self._began) * 1000),
        }

    async def _store(self, final: dict[str, Any]) -> bool:
        """Store the answer's final state, retrying a few times (a database restart,
        a lock timeout); False when it could not be stored."""
        for delay in (*STORE_RETRY_DELAYS, None):
            try:
                with self._trace.step("store.write", **{"gateway.store.what": "answer"}):
                    await self._writer.write(WriteBatch(finals=[final]))
                return True
            except Exception as exc:
                if delay is None:
                    log.error("storing the answer %s failed for good: %r", self.message_id, exc)
                    return False
                log.warning(
                    "storing the answer %s failed (%r); retrying in %.1f s",
                    self.message_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        return False
