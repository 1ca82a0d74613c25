"""The guard's pure parts, with literal strings: log redaction and host matching."""

from __future__ import annotations

import logging

import pytest

from gateway.transports.guard import RedactTokens


def redacted(message: str, *args: object) -> str:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, message, args, None)
    assert RedactTokens().filter(record)
    return record.getMessage()


@pytest.mark.parametrize(
    ("logged", "expected"),
    [
        ("/ws/rooms/r?token=abc.def", "/ws/rooms/r?token=[redacted]"),
        ("/api/rooms?api_key=sk-1&limit=5", "/api/rooms?api_key=[redacted]&limit=5"),
        ("/x?limit=5&key=sk-1", "/x?limit=5&key=[redacted]"),
        (
            "/x?access_token=a&refresh_token=b",
            "/x?access_token=[redacted]&refresh_token=[redacted]",
        ),
        ("/x?API-KEY=sk-1", "/x?API-KEY=[redacted]"),
        (
            "/x?apikey=1&password=2&secret=3",
            "/x?apikey=[redacted]&password=[redacted]&secret=[redacted]",
        ),
        ("/x?client_secret=1;sig=2", "/x?client_secret=[redacted];sig=[redacted]"),
        # Not secrets: left as they are.
        ("/x?last_event_id=12&limit=5", "/x?last_event_id=12&limit=5"),
        ("/x?monkey=1&keys=2", "/x?monkey=1&keys=2"),
        ("/api/rooms/room_key=1", "/api/rooms/room_key=1"),
    ],
)
def test_secrets_in_query_strings_are_redacted(logged: str, expected: str) -> None:
    assert redacted("%s", logged) == expected
    assert redacted(logged) == expected


def test_the_access_log_keeps_its_arguments_shape() -> None:
    message = '%s - "%s %s HTTP/%s" %d'
    args = ("127.0.0.1:5", "GET", "/x?api_key=sk-1", "1.1", 401)
    assert redacted(message, *args) == '127.0.0.1:5 - "GET /x?api_key=[redacted] HTTP/1.1" 401'
