"""Every way a generation ends gives the room back: its lease, its sender's quota, and a
final status stored for its answer — even when it is stopped before it first runs."""

from __future__ import annotations

from typing import Any

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import create_room, get_messages, run_sql


async def test_cancel_sent_right_behind_send_ends_the_answer_and_frees_the_room(
    start_gateway: Any, connect: Any, upstream: FakeUpstream
) -> None:
    # One concurrent generation per client: a quota never given back would refuse
    # every later send of this client, in any room.
    gateway = start_gateway(max_concurrent_generations=1)
    for _ in range(10):
        # Each time anew: a cancel that beats the upstream request leaves its
        # scenario queued, and the next request would take it.
        upstream.reset()
        upstream.script(Scenario(count=200, delay=0.01))
        room = await create_room(gateway)
        client = await connect(room["id"], gateway_=gateway)
        # Both frames in one go: the cancel arrives before the generation's task runs.
        await client.send({"type": "send", "content": "x"})
        await client.send({"type": "cancel"})
        start = await client.until("start")
        ended = await client.until("cancelled", "done", "error")
        assert ended["type"] == "cancelled", ended
        assert ended["generation_id"] == start["generation_id"]
        assert ended["message"]["status"] == "cancelled"
        stored = await get_messages(gateway, room["id"])
        assert [m["status"] for m in stored] == ["complete", "cancelled"]

        # The room, and the client's quota, are free again.
        upstream.reset()
        upstream.script(Scenario(count=3))
        await client.send({"type": "send", "content": "again"})
        done = await client.until("done", "error")
        assert done["type"] == "done", done


async def test_cancel_sent_right_behind_regenerate_ends_the_new_version(
    connect: Any, room: dict, gateway: Any, upstream: FakeUpstream
) -> None:
    client = await connect(room["id"])
    await client.send({"type": "send", "content": "hello"})
    first = await client.until("done")
    upstream.script(Scenario(count=200, delay=0.01))
    await client.send({"type": "regenerate", "message_id": first["message"]["id"]})
    await client.send({"type": "cancel"})
    start = await client.until("start")
    ended = await client.until("cancelled", "done", "error")
    assert ended["type"] == "cancelled", ended
    assert ended["generation_id"] == start["generation_id"]
    stored = await get_messages(gateway, room["id"])
    assert stored[-1]["status"] == "cancelled"
    assert len(stored[-1]["siblings"]) == 2

    upstream.script(Scenario(count=3))
    await client.send({"type": "regenerate", "message_id": first["message"]["id"]})
    assert (await client.until("done", "error"))["type"] == "done"


async def test_an_answer_that_cannot_be_stored_ends_with_store_failed_and_frees_the_room(
    connect: Any, room: dict, upstream: FakeUpstream, database_url: str
) -> None:
    # The database refuses to store this one answer's end (every attempt), as a full
    # disk or a broken replica would.
    if database_url.startswith("sqlite"):
        await run_sql(
            database_url,
            "CREATE TRIGGER refuse_poison BEFORE UPDATE ON messages "
            "WHEN NEW.content LIKE '%poison%' AND NEW.status != 'streaming' "
            "BEGIN SELECT RAISE(ABORT, 'disk full (simulated)'); END",
        )
    else:
        await run_sql(
            database_url,
            "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
            "IF NEW.content LIKE '%poison%' AND NEW.status <> 'streaming' THEN "
            "RAISE EXCEPTION 'disk full (simulated)'; END IF; RETURN NEW; END $$ "
            "LANGUAGE plpgsql",
        )
        await run_sql(
            database_url,
            "CREATE TRIGGER refuse_poison BEFORE UPDATE ON messages "
            "FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
        )
    client = await connect(room["id"])
    upstream.script(Scenario(tokens=["poison ", "pill"]))
    await client.send({"type": "send", "content": "x"})
    ended = await client.until("done", "cancelled", "error", timeout=15)  # after retries
    assert (ended["type"], ended["code"], ended["retryable"]) == ("error", "store_failed", True)
    assert ended["answer"]["status"] == "error"
    assert "simulated" not in str(ended)  # the database's words stay in the log

    upstream.script(Scenario(tokens=["fine"]))
    await client.send({"type": "send", "content": "and now?"})
    done = await client.until("done", "error")
    assert done["type"] == "done", done
