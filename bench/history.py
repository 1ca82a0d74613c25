"""Long rooms: what joining, reading and sending cost when a room's active branch holds
many messages (issue 15: "joining a room with 10,000 messages stays fast").

The script starts a fresh fake upstream and gateway (SQLite file in a temp dir),
creates R rooms over REST, stops the gateway, writes a chain of M messages into each
room straight into the SQLite file (user and assistant turns alternating, about 200 and
600 characters), and starts the gateway again, so that nothing is cached. Then, per
room, one after the other:

* **cold join**: WebSocket connect → ``ready`` received (the branch is read from the
  database), and the size of that ``ready`` frame;
* **warm joins**: W more joins of the same room (served from the room's cached state);
* **GET messages**: ``GET /api/rooms/{id}/messages`` (the API's default page), time and
  body size;
* **cold send** (on a second set of R rooms, never joined): ``POST .../messages`` →
  ``202`` (the branch read, the prompt planned, the message stored, the answer
  launched);

and prints the medians over rooms (p90 too), with the gateway's CPU seconds for each
phase. Figures only; nothing passes or fails.

    .venv/bin/python bench/history.py --messages 10000 --rooms 5
    .venv/bin/python bench/history.py --source /tmp/wt-before   # another checkout's gateway

``--source DIR`` runs the gateway of another checkout (``PYTHONPATH=DIR``), with this
script and this venv, to compare two versions in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx2
import orjson
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay import Service, create_rooms, launch_fake_upstream, launch_gateway

USER_TEXT = "Could you tell me more about the second point, and how it applies here? " * 3
ANSWER_TEXT = "Here is a longer answer that goes over the point step by step, as asked. " * 8


def seed(database: Path, room_ids: list[str], messages: int) -> None:
    """A chain of ``messages`` alternating turns in each room, active to its end."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with sqlite3.connect(database) as db:
        for r, room_id in enumerate(room_ids):
            rows = []
            parent = None
            for i in range(messages):
                message_id = f"msg_b{r:03d}{i:07d}"
                user = i % 2 == 0
                at = (start + timedelta(seconds=i)).strftime("%Y-%m-%d %H:%M:%S.%f")
                rows.append(
                    (
                        message_id, room_id, parent, "user" if user else "assistant",
                        USER_TEXT if user else ANSWER_TEXT, "complete",
                        None if user else f"gen_b{r:03d}{i:07d}",
                        None if user else json.dumps({"model": "fake-model"}),
                        None if user else "stop", "bench", "bench", 0, at, at,
                    )
                )  # fmt: skip
                parent = message_id
            db.executemany(
                "INSERT INTO messages (id, room_id, parent_id, role, content, status,"
                " generation_id, params, finish_reason, author_id, author_name, hidden,"
                " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
            db.execute("UPDATE rooms SET active_leaf_id = ? WHERE id = ?", (parent, room_id))


async def join(ws_url: str) -> tuple[float, int]:
    """Seconds from connecting to ``ready``, and the frame's size in bytes."""
    began = time.perf_counter()
    async with websockets.connect(ws_url, max_size=None, compression=None) as ws:
        raw = await ws.recv()
        took = time.perf_counter() - began
    frame = orjson.loads(raw)
    assert frame["type"] == "ready", frame
    return took, len(raw)


async def cold_send(http: httpx2.AsyncClient, room_id: str) -> float:
    """Seconds for ``POST .../messages`` to answer 202 (the message stored and its
    answer launched) in a room nobody joined."""
    began = time.perf_counter()
    response = await http.post(f"/api/rooms/{room_id}/messages", json={"content": "and now?"})
    took = time.perf_counter() - began
    assert response.status_code == 202, response.text
    return took


def stats(values: list[float], scale: float = 1000.0) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered) * scale:9.1f} {p90 * scale:9.1f}"


async def measure(gateway: Service, joined: list[str], sent: list[str], warm: int) -> dict:
    ws_base = gateway.url.replace("http://", "ws://")
    result: dict[str, Any] = {}

    cpu = gateway.cpu_seconds()
    cold = [await join(f"{ws_base}/ws/rooms/{room}") for room in joined]
    result["cold join"] = ([t for t, _ in cold], gateway.cpu_seconds() - cpu)
    result["ready bytes"] = [size for _, size in cold]

    cpu = gateway.cpu_seconds()
    times = [(await join(f"{ws_base}/ws/rooms/{room}"))[0] for room in joined for _ in range(warm)]
    result["warm join"] = (times, gateway.cpu_seconds() - cpu)

    async with httpx2.AsyncClient(base_url=gateway.url, timeout=120) as http:
        cpu = gateway.cpu_seconds()
        times, sizes = [], []
        for room in joined:
            began = time.perf_counter()
            response = await http.get(f"/api/rooms/{room}/messages")
            times.append(time.perf_counter() - began)
            response.raise_for_status()
            sizes.append(len(response.content))
        result["GET messages"] = (times, gateway.cpu_seconds() - cpu)
        result["GET bytes"] = sizes

        cpu = gateway.cpu_seconds()
        times = [await cold_send(http, room) for room in sent]
        result["cold send"] = (times, gateway.cpu_seconds() - cpu)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rooms", type=int, default=5)
    parser.add_argument("--warm", type=int, default=5, help="warm joins per room")
    parser.add_argument("--source", type=Path, help="run the gateway of this checkout")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    env: dict[str, str] = {}
    if args.source is not None:
        env["PYTHONPATH"] = str(args.source.resolve())
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        workdir = Path(tmp)
        upstream = launch_fake_upstream(workdir, tokens=5, delay=0.0, cpus=None)
        gateway = launch_gateway(workdir, upstream_url=f"{upstream.url}/v1", cpus=None, env=env)
        try:
            rooms = asyncio.run(create_rooms(gateway.url, 2 * args.rooms))
            gateway.stop()
            began = time.perf_counter()
            seed(workdir / "gateway.db", rooms, args.messages)
            print(
                f"seeded {2 * args.rooms} rooms x {args.messages} messages"
                f" in {time.perf_counter() - began:.1f} s",
                file=sys.stderr,
            )
            gateway = launch_gateway(workdir, upstream_url=f"{upstream.url}/v1", cpus=None, env=env)
            result = asyncio.run(
                measure(gateway, rooms[: args.rooms], rooms[args.rooms :], args.warm)
            )
        finally:
            gateway.stop()
            upstream.stop()

    source = str(args.source) if args.source else "this checkout"
    if args.json:
        print(json.dumps({"source": source, "messages": args.messages, **result}))
        return 0
    print(f"\n{args.messages} messages per room, {args.rooms} rooms, gateway from {source}")
    print(f"{'':18} {'median ms':>9} {'p90 ms':>9} {'gateway CPU s':>14}")
    for name in ("cold join", "warm join", "GET messages", "cold send"):
        times, cpu = result[name]
        print(f"{name:18} {stats(times)} {cpu:14.2f}")
    for name in ("ready bytes", "GET bytes"):
        print(f"{name:18} {statistics.median(result[name]):9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
