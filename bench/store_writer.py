"""CPU and wall time the store's group-committing writer takes per answer.

An answer costs the writer two batches: the send (the user's message, the answer's
row, the room's new leaf) and the final answer. This script commits that pair for
1,000 answers at several concurrencies (N answers submitted at once share commits),
on a fresh SQLite file (or ``--database-url``), and prints process CPU and wall time
per answer. Run it on the old and the new code to compare (issue 13: before the
writer's own thread and cached SQL text, 4.0 / 0.98 / 0.67 ms CPU per answer at 1 /
10 / 50; see docs/benchmarks.md)::

    .venv/bin/python bench/store_writer.py
    .venv/bin/python bench/store_writer.py --database-url postgresql+asyncpg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert

from gateway.store.db import Database
from gateway.store.models import Message, Room, message_row, new_id, utcnow
from gateway.store.writer import WriteBatch, Writer


def send_batch(room_id: str, client_id: str) -> tuple[WriteBatch, str]:
    now = utcnow()
    user = Message(
        id=new_id("msg"), room_id=room_id, parent_id=None, role="user", content="hello",
        status="complete", client_id=client_id, created_at=now, updated_at=now,
    )  # fmt: skip
    answer = Message(
        id=new_id("msg"), room_id=room_id, parent_id=user.id, role="assistant", content="",
        status="streaming", generation_id=new_id("gen"), params={"model": "m"},
        created_at=now, updated_at=now,
    )  # fmt: skip
    batch = WriteBatch(
        inserts=[message_row(user), message_row(answer)], leaves={room_id: answer.id}
    )
    return batch, answer.id


def final_batch(message_id: str) -> WriteBatch:
    final = {
        "id": message_id, "content": "word " * 200, "status": "complete",
        "finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 200},
        "error": None,
    }  # fmt: skip
    return WriteBatch(finals=[final])


async def run(url: str, concurrencies: list[int], answers: int) -> None:
    db = Database(url)
    await db.upgrade()
    rooms = [new_id("room") for _ in range(answers)]
    now = utcnow()
    async with db.transaction() as session:
        await session.execute(
            insert(Room.__table__),
            [{"id": r, "name": "bench", "created_at": now, "updated_at": now} for r in rooms],
        )
    writer = Writer(db)
    writer.start()
    client_ids = (f"c{i}" for i in itertools.count())
    print(f"{'answers at once':>16} {'CPU ms/answer':>14} {'wall ms/answer':>15}")
    for concurrency in concurrencies:
        cpu, wall = time.process_time(), time.perf_counter()
        done = 0
        for start in range(0, answers, concurrency):
            sends = [
                send_batch(room, next(client_ids)) for room in rooms[start : start + concurrency]
            ]
            await asyncio.gather(*(writer.write(batch) for batch, _ in sends))
            await asyncio.gather(*(writer.write(final_batch(answer)) for _, answer in sends))
            done += len(sends)
        cpu_ms = 1e3 * (time.process_time() - cpu) / done
        wall_ms = 1e3 * (time.perf_counter() - wall) / done
        print(f"{concurrency:>16} {cpu_ms:>14.3f} {wall_ms:>15.3f}")
    await writer.close()
    await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="default: a new SQLite file in a temp dir")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--answers", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        asyncio.run(run(url, args.concurrency, args.answers))


if __name__ == "__main__":
    main()
