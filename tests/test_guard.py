"""The guard's pure parts, with literal strings: log redaction and Host matching."""

from __future__ import annotations

import logging

import pytest

from gateway.settings import SettingsError, load_settings
from gateway.transports.guard import HostCheck, RedactTokens, host_name


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


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8000", "localhost"),
        ("LocalHost.", "localhost"),
        ("[::1]:8000", "[::1]"),
        ("[::1]", "[::1]"),
        ("127.0.0.1", "127.0.0.1"),
        ("chat.example.com:443", "chat.example.com"),
    ],
)
def test_host_name_drops_the_port_and_case(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("allowed", "host", "served"),
    [
        (["localhost"], b"localhost:8000", True),
        (["localhost"], b"127.0.0.1:8000", True),  # addresses cannot be rebound
        (["localhost"], b"[::1]:8000", True),
        (["localhost"], b"192.168.1.20", True),
        (["localhost"], b"rebind.evil.example:8000", False),
        (["localhost"], b"localhost.evil.example", False),
        (["localhost"], b"", False),
        (["localhost"], None, True),  # no Host at all: not a browser
        (["chat.example.com"], b"CHAT.example.com.:443", True),
        (["chat.example.com"], b"localhost", False),
        (["*.example.com"], b"a.b.example.com", True),
        (["*.example.com"], b"example.com", False),
        (["*.example.com"], b"evilexample.com", False),
        (["*"], b"anything.example", True),
        ([], b"localhost", False),
        ([], b"127.0.0.1", True),
    ],
)
def test_host_check(allowed: list[str], host: bytes | None, served: bool) -> None:
    assert HostCheck(load_settings(allowed_hosts=allowed).allowed_hosts).allows(host) is served


@pytest.mark.parametrize(
    "entry", ["https://chat.example.com", "chat.example.com:8000", "chat.*.com", "a/b", "*x.com"]
)
def test_an_allowed_host_is_a_name_without_scheme_port_or_path(entry: str) -> None:
    with pytest.raises(SettingsError, match="GATEWAY_ALLOWED_HOSTS"):
        load_settings(allowed_hosts=[entry])
