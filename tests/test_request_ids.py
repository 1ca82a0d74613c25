"""Request ids: every response says which request it answered (``X-Request-ID``), a
proxy's own id is kept when sane, and log lines written meanwhile carry it."""

from __future__ import annotations

import httpx2

from gateway.logs import request_id_from


async def test_a_response_carries_the_callers_id_or_a_new_one(http: httpx2.AsyncClient) -> None:
    kept = await http.get("/api/rooms", headers={"x-request-id": "lb-7f3a.42"})
    assert kept.headers["x-request-id"] == "lb-7f3a.42"
    fresh = [(await http.get("/healthz")).headers["x-request-id"] for _ in range(2)]
    assert all(i.startswith("req_") for i in fresh) and fresh[0] != fresh[1]
    refused = await http.get("/api/rooms", headers={"x-request-id": "no spaces <here>"})
    assert refused.headers["x-request-id"].startswith("req_")  # not echoed into logs


def test_only_sane_ids_are_kept() -> None:
    assert request_id_from("abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in (None, "", "x" * 65, "a b", "a\nb", "é"):
        assert request_id_from(bad).startswith("req_"), bad
