"""The error tree: every error knows its status, wire code, close code and whether a
retry may succeed; clients never see a library's text."""

from __future__ import annotations

from typing import Any

import pytest

import gateway.broker.redis  # noqa: F401  (defines BrokerUnavailable in the tree)
from gateway.errors import (
    CLOSE_ROOM_GONE,
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN_LATER,
    GatewayError,
    internal_error,
)
from tests.conftest import run_sql


def _tree(cls: type[GatewayError]) -> list[type[GatewayError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _tree(child))]


@pytest.mark.parametrize("error", _tree(GatewayError), ids=lambda cls: cls.__name__)
def test_retryable_errors_and_only_they_close_with_reconnect_codes(
    error: type[GatewayError],
) -> None:
    reconnect = error.close_code in (CLOSE_TRY_AGAIN_LATER, CLOSE_SERVICE_RESTART)
    assert reconnect == error.retryable, error
    assert 400 <= error.status < 600
    assert 1000 <= error.close_code < 5000


def test_not_found_says_gone_and_internal_errors_say_nothing_of_the_cause() -> None:
    from gateway.errors import NotFound

    assert NotFound("x").close_code == CLOSE_ROOM_GONE
    assert internal_error().to_dict() == {
        "code": "internal_error",
        "message": "internal error; the gateway's log has the details",
    }


async def test_an_unexpected_rest_failure_is_a_json_500_without_driver_text(
    gateway: Any, http: Any, room: dict, database_url: str
) -> None:
    # Break the database behind the gateway's back: the next read fails inside
    # the driver, which no client should hear about.
    await run_sql(database_url, "ALTER TABLE rooms RENAME TO rooms_gone")
    response = await http.get("/api/rooms")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": {**internal_error().to_dict(), "retryable": False}}
    assert "rooms_gone" not in response.text and "sql" not in response.text.lower()
