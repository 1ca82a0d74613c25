"""Summarise a py-spy raw profile of the gateway (``py-spy record --format raw``).

    py-spy record -d 30 -r 100 --nonblocking --threads -f raw -o /tmp/gw.txt -p PID
    .venv/bin/python bench/profile_summary.py /tmp/gw.txt

Two views, both in % of all on-CPU samples of the process (all threads):

* **by activity** — which gateway code path the sample is under (walking from the
  root of the stack): relaying a generation, the WebSocket writer, handling a
  ``send``, storing/checkpointing an answer, ...
* **by layer** — which library the CPU is actually spent in (walking from the leaf,
  skipping stdlib helpers such as ``inspect``/``typing``/``json``): openai SDK,
  httpx2/httpcore2/h11/anyio, websockets framing + permessage-deflate, SQLAlchemy, ...

py-spy without ``--native`` charges C code to the Python frame that called it (orjson
to ``protocol.encode``, zlib to ``PerMessageDeflate.encode``, sqlite3 to the aiosqlite
thread); samples whose only frame is the event loop's ``run`` are uvloop's own C code.
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterator

# Leaf-ward: the first frame (from the leaf up) whose file matches wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("asyncio.timeout() enter/exit/reschedule", ("asyncio/timeouts.py",)),
    (
        "upstream HTTP client: httpx2 / httpcore2 / h11 / anyio",
        ("httpx2/", "httpcore2/", "h11/", "anyio/"),
    ),
    ("openai SDK: SSE decoding + chunk model construction", ("openai/",)),
    (
        "WebSocket send: uvicorn sansio + websockets framing + deflate",
        ("uvicorn/protocols/websockets", "websockets/", "starlette/websockets"),
    ),
    (
        "SQLAlchemy / aiosqlite (event-loop side)",
        ("sqlalchemy/", "aiosqlite/", "gateway/store/", "greenlet"),
    ),
    ("pydantic", ("pydantic",)),
    ("gateway code (incl. orjson encode)", ("gateway/",)),
    ("uvicorn / starlette (other)", ("uvicorn/", "starlette/")),
    ("asyncio (locks, tasks, events)", ("asyncio/",)),
]

# Root-ward: the first frame (from the root down) whose function matches wins.
ACTIVITIES: list[tuple[str, tuple[str, ...]]] = [
    ("generation: read upstream, parse chunk, publish token", ("GenerationTask._run",)),
    (
        "generation: store answer / checkpoint (DB)",
        ("GenerationTask._finish", "GenerationTask._write_checkpoint"),
    ),
    ("WebSocket writer: coalesce + send frames", ("Connection._write",)),
    ("WebSocket reader: parse frame + Sending.send", ("Connection._read",)),
    ("WebSocket connect / join (DB)", ("Connection.serve", "room_socket")),
    ("HTTP API (rooms)", ("create_room", "list_rooms", "get_room")),
]

# Frames of the event loop's own entry (``uvicorn.run`` → ``asyncio.run``): a sample
# whose stack ends here is in uvloop's C code or a syscall.
LOOP_FRAMES = frozenset(
    {"_run_module_as_main", "_run_code", "<module>", "main", "run", "Server.run",
     "asyncio_run", "Runner.run", "run_until_complete", "_serve", "serve"}
)  # fmt: skip

# Activity of a stack whose root is missing (py-spy --nonblocking truncates some
# coroutine stacks): guessed from the layer of its outermost known frame.
_FALLBACK_ACTIVITY = {
    "upstream HTTP client: httpx2 / httpcore2 / h11 / anyio": 0,
    "openai SDK: SSE decoding + chunk model construction": 0,
    "WebSocket send: uvicorn sansio + websockets framing + deflate": 2,
    "SQLAlchemy / aiosqlite (event-loop side)": -1,
}

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse(path: str) -> Iterator[tuple[str, list[tuple[str, str]], int]]:
    """(thread, [(function, file), ...] root first, count) per line of a raw profile."""
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            parts = stack.split(";")
            thread = parts[0] if parts[0].startswith("thread") else ""
            frames = []
            for part in parts[1:] if thread else parts:
                match = _FRAME.match(part)
                func, file = (match["func"], match["file"]) if match else (part, "")
                if file == "openai.py" and func.startswith("OpenAIProvider"):
                    file = "gateway/providers/openai.py"  # py-spy shortens this one
                frames.append((func, file))
            yield thread, frames, int(count)


def classify_layer(thread: str, frames: list[tuple[str, str]]) -> str:
    if "_connection_worker_thread" in thread or any(
        func == "_connection_worker_thread" for func, _ in frames
    ):
        return "SQLite worker threads (aiosqlite + sqlite3 C code)"
    for func, file in reversed(frames):
        if func in LOOP_FRAMES:
            continue
        for label, needles in LAYERS:
            if any(n in file for n in needles):
                return label
    if frames and frames[-1][0] in LOOP_FRAMES:
        return "event loop itself (uvloop C: I/O, callbacks, task switches)"
    return "other"


def classify_activity(thread: str, frames: list[tuple[str, str]]) -> str:
    if "_connection_worker_thread" in thread:
        return "SQLite worker threads (aiosqlite + sqlite3 C code)"
    for func, _ in frames:
        for label, needles in ACTIVITIES:
            if func in needles:
                return label
    if frames and frames[-1][0] in LOOP_FRAMES:
        return "event loop itself (uvloop C: I/O, callbacks, task switches)"
    for func, file in frames:  # truncated stack: go by its outermost known frame
        if func in LOOP_FRAMES:
            continue
        for label, needles in LAYERS:
            if any(n in file for n in needles):
                index = _FALLBACK_ACTIVITY.get(label)
                if index is None:
                    break
                if index < 0:
                    return "DB work on the event loop (truncated stack)"
                return ACTIVITIES[index][0] + " (truncated stack)"
        else:
            continue
        break
    return "other (uvicorn protocol callbacks, timers, truncated stacks)"


def report(path: str, top: int = 25) -> str:
    layers: collections.Counter[str] = collections.Counter()
    activities: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for thread, frames, count in parse(path):
        total += count
        layers[classify_layer(thread, frames)] += count
        activities[classify_activity(thread, frames)] += count
        if frames:
            func, file = frames[-1]
            leaves[f"{func} ({file})"] += count
    lines = [f"{total} samples (all threads, on-CPU only)", "", "by activity:"]
    lines += [f"  {100 * c / total:5.1f} %  {label}" for label, c in activities.most_common()]
    lines += ["", "by layer:"]
    lines += [f"  {100 * c / total:5.1f} %  {label}" for label, c in layers.most_common()]
    lines += ["", f"top {top} leaf frames (self time):"]
    lines += [f"  {100 * c / total:5.1f} %  {label}" for label, c in leaves.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", help="py-spy raw output (--format raw)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(report(args.profile, args.top))


if __name__ == "__main__":
    main()
