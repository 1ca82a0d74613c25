"""``GET /metrics``: Prometheus' text format, with values that move as clients connect
and answers run (several workers: ``test_cluster.py``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import Gateway, create_room, scaled

ROOT = Path(__file__).resolve().parent.parent


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with ``labels`` (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0


async def scrape(http: httpx2.AsyncClient, headers: dict[str, str] | None = None) -> str:
    response = await http.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


async def test_metrics_move_as_clients_connect_and_answers_run(
    gateway: Gateway, http: httpx2.AsyncClient, connect: Any, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    before = await scrape(http)
    assert sample(before, "gateway_answers_total", status="complete") == 0
    assert sample(before, "gateway_connections_open", transport="websocket") == 0

    client = await connect(room["id"])
    upstream.script(Scenario(tokens=["a", "b", "c", "d", "e"], delay=0.01))
    await client.send({"type": "send", "content": "hi"})
    await client.until("token")
    during = await scrape(http)
    assert sample(during, "gateway_connections_open", transport="websocket") == 1
    assert sample(during, "gateway_rooms_active") == 1
    assert sample(during, "gateway_generations_running") == 1
    await client.until("done")
    await client.send({"type": "send", "content": "again"})
    await client.until("done")

    after = await scrape(http)
    assert sample(after, "gateway_answers_total", status="complete") == 2
    assert sample(after, "gateway_generations_running") == 0
    assert sample(after, "gateway_tokens_total") == 5 + 8  # the fake's default: 8 tokens
    assert sample(after, "gateway_time_to_first_token_seconds_count") == 2
    assert sample(after, "gateway_token_gap_seconds_count") >= 1  # reads, not tokens
    assert sample(after, "gateway_writer_commit_seconds_count") > 0

    await client.ws.close()
    refused = await http.post(f"/api/rooms/{room['id']}/messages", json={"content": ""})
    assert refused.status_code == 400
    last = await scrape(http)
    assert sample(last, "gateway_connections_open", transport="websocket") == 0
    assert sample(last, "gateway_rooms_active") == 0
    assert sample(last, "gateway_refused_total", code="empty_message") == 1


async def test_upstream_failures_and_refusals_are_counted_by_code(
    gateway: Gateway, http: httpx2.AsyncClient, connect: Any, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    client = await connect(room["id"])
    upstream.script(Scenario(count=50, delay=0.05))
    await client.send({"type": "send", "content": "long"})
    await client.until("token")
    await client.send({"type": "send", "content": "while busy"})
    busy = await client.until("error")
    assert busy["code"] == "busy"
    await client.send({"type": "cancel"})
    await client.until("cancelled")
    upstream.script(Scenario(fault="garbage", fault_after=1))
    await client.send({"type": "send", "content": "fails"})
    failed = await client.until("error")

    text = await scrape(http)
    assert sample(text, "gateway_refused_total", code="busy") == 1
    assert sample(text, "gateway_answers_total", status="cancelled") == 1
    assert sample(text, "gateway_answers_total", status="error") == 1
    assert sample(text, "gateway_upstream_errors_total", code=failed["code"]) == 1


async def test_with_api_keys_metrics_need_a_key_and_can_be_turned_off(
    start_gateway: Any,
) -> None:
    locked = start_gateway(api_keys=["prometheus=sk-scraper-123456"])
    async with httpx2.AsyncClient(base_url=locked.url, timeout=scaled(10)) as http:
        refused = await http.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        await scrape(http, {"authorization": "Bearer sk-scraper-123456"})
    off = start_gateway(metrics=False)
    async with httpx2.AsyncClient(base_url=off.url, timeout=scaled(10)) as http:
        assert (await http.get("/metrics")).status_code == 404


def test_the_grafana_dashboard_charts_every_metric_and_only_those() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana" / "chat-gateway.json").read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    charted = {
        re.sub(r"_bucket$", "", name) for q in queries for name in re.findall(r"gateway_\w+", q)
    }
    exported = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in Metrics().registry.collect()
    }
    assert charted == exported
