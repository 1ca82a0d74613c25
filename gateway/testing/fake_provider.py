"""In-process fakes of a chat provider and a moderation endpoint, for tests of the use
cases without sockets (the HTTP fake of an OpenAI-compatible server is
:mod:`gateway.testing.fake_upstream`).

Both can be held: a held call waits until released, so a test can act while an answer
is streaming, or while a message is being moderated.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from gateway.checks import ALLOWED, Verdict
from gateway.providers.base import Chunk, CompletionRequest


class Gate:
    """Lets calls through, or, once :meth:`hold` is called, makes them wait until
    :meth:`release`; :attr:`waiting` is set while one waits."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.waiting = asyncio.Event()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def passage(self) -> None:
        if not self._open.is_set():
            self.waiting.set()
            try:
                await self._open.wait()
            finally:
                self.waiting.clear()


class ScriptedProvider:
    """A :class:`~gateway.providers.base.ChatProvider` answering every request with
    ``tokens`` then ``finish_reason``; while :attr:`gate` is held, each answer waits
    after its first token. With :attr:`queue` positions, each answer first reports
    them, as a model that keeps answers in line does, waiting (while the gate is held)
    after the first. Records the requests, and the streams closed before their end
    (:attr:`stopped`: the upstream work really stopped)."""

    name = "scripted"
    default_model = "scripted-model"

    def __init__(self, tokens: Sequence[str] = ("Hello", ", world"), finish: str = "stop") -> None:
        self.tokens = list(tokens)
        self.finish = finish
        self.gate = Gate()
        self.requests: list[CompletionRequest] = []
        self.stopped = 0
        self.queue: list[int] = []

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        ended = False
        try:
            for i, position in enumerate(self.queue):
                yield Chunk(queue_position=position)
                if i == 0:
                    await self.gate.passage()
            for i, token in enumerate(self.tokens):
                if i == 1:
                    await self.gate.passage()
                yield Chunk(token)
            yield Chunk(finish_reason=self.finish, usage={"completion_tokens": len(self.tokens)})
            ended = True
        finally:
            if not ended:
                self.stopped += 1

    async def aclose(self) -> None:
        pass


class ScriptedModerator:
    """A :class:`~gateway.providers.base.Moderation` that flags texts containing
    one of ``flagged``; while :attr:`gate` is held, each check waits."""

    def __init__(self, flagged: Sequence[str] = ()) -> None:
        self.flagged = list(flagged)
        self.gate = Gate()
        self.checked: list[str] = []

    async def check(self, text: str) -> Verdict:
        self.checked.append(text)
        await self.gate.passage()
        if any(word in text for word in self.flagged):
            return Verdict.reject("moderation", "flagged for testing")
        return ALLOWED
