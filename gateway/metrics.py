"""What the gateway counts, for Prometheus (``GET /metrics``), with the
``prometheus-client`` library.

Under ``serve --workers N`` every worker is its own process: the CLI points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before they start, each writes its
values there, and whichever worker answers ``/metrics`` reads them all
(``prometheus_client.multiprocess``): counters and histograms are summed, gauges of
live things summed over the living workers. ``GATEWAY_METRICS=false`` turns it off:
:data:`OFF` is then passed everywhere, and counting costs nothing.

Metric names are ``gateway_*``; docs/metrics.md lists them with their labels.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds: a first token comes in 0.1-10 s; tokens come 5-200 ms apart.
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
GAP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _Off:
    """A metric that counts nothing (``GATEWAY_METRICS=false``)."""

    def labels(self, *args: Any, **kwargs: Any) -> _Off:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


class Metrics:
    """The gateway's metrics, in a registry of their own (several apps in one
    process, as in tests, do not collide); with ``enabled=False`` they count nothing."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry()

        def make(kind: Any, name: str, doc: str, labels: tuple[str, ...] = (), **opts: Any) -> Any:
            if not enabled:
                return _Off()
            return kind(name, doc, list(labels), registry=self.registry, **opts)

        live = {"multiprocess_mode": "livesum"}  # gauges: summed over the workers alive
        self.connections = make(
            Gauge, "gateway_connections_open", "Clients connected", ("transport",), **live
        )
        self.rooms = make(Gauge, "gateway_rooms_active", "Rooms with a client connected", **live)
        self.generations = make(
            Gauge, "gateway_generations_running", "Answers being generated", **live
        )
        self.answers = make(
            Counter, "gateway_answers", "Answers that ended, by final status", ("status",)
        )
        self.first_token = make(
            Histogram,
            "gateway_time_to_first_token_seconds",
            "From an answer's start to its first token shown",
            buckets=FIRST_TOKEN_BUCKETS,
        )
        self.token_gap = make(
            Histogram,
            "gateway_token_gap_seconds",
            "Between consecutive tokens of an answer, as relayed",
            buckets=GAP_BUCKETS,
        )
        self.tokens = make(Counter, "gateway_tokens", "Tokens relayed from the upstream")
        self.upstream_errors = make(
            Counter, "gateway_upstream_errors", "Answers the upstream failed, by code", ("code",)
        )
        self.refused = make(
            Counter,
            "gateway_refused",
            "Requests and frames refused, by error code (rate_limited, busy, ...)",
            ("code",),
        )
        self.slow_clients = make(
            Counter,
            "gateway_slow_clients_dropped",
            "Clients cut off for not reading",
            ("transport",),
        )
        self.writer_queue = make(
            Gauge, "gateway_writer_queue_depth", "Changes waiting for the store's writer", **live
        )
        self.commit_seconds = make(
            Histogram,
            "gateway_writer_commit_seconds",
            "The store writer's commits",
            buckets=LATENCY_BUCKETS,
        )
        self.publish_seconds = make(
            Histogram,
            "gateway_broker_publish_seconds",
            "Publishing room events to the broker (Redis)",
            buckets=LATENCY_BUCKETS,
        )
        self.redis_outages = make(Counter, "gateway_redis_outages", "Times the broker lost Redis")

    def exposition(self) -> bytes:
        """The text format: this process's values, or every worker's (multiprocess)."""
        if os.environ.get(MULTIPROCESS_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


OFF = Metrics(enabled=False)
"""Metrics that count nothing: the default where none are given (unit tests)."""
