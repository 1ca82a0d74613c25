"""How the gateway logs: one format for its own lines and uvicorn's, text (default) or
JSON (``GATEWAY_LOG_FORMAT=json``: one object a line, for log shippers), and the
structured lines operators read — one per answer that ends, one per connection that
closes — whose fields are JSON fields, or ``key=value`` pairs in text.

Keys and URL tokens never reach a log line (see
:class:`gateway.transports.guard.RedactTokens`, installed on uvicorn's loggers)."""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar
from typing import Any, Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

answers = logging.getLogger("gateway.answers")
"""One line per answer that ends (see :func:`event`)."""
connections = logging.getLogger("gateway.connections")
"""One line per WebSocket or event stream that closes."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
"""The id of the HTTP request or WebSocket being served (``X-Request-ID``), set by
:class:`gateway.transports.web.RequestIds`; tasks started while serving it (an answer)
keep it, so their lines carry it too."""

_GOOD_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_from(header: str | None) -> str:
    """A caller's ``X-Request-ID`` if it is a sane one (a proxy's), else a new id."""
    if header is not None and _GOOD_REQUEST_ID.fullmatch(header):
        return header
    return f"req_{secrets.token_urlsafe(9)}"


class RequestIdField(logging.Filter):
    """Adds ``request_id`` to the lines logged while a request is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = request_id.get()
        if current is not None:
            record.request_id = current
        return True


def configure(level: str, log_format: LogFormat = "text") -> None:
    """Send every log line (uvicorn's included: it is run without a logging config of
    its own) to standard error, in one format."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                json_default=str,
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdField())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if level != "trace" else logging.DEBUG)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own handlers, if it set any up, would print its lines twice.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Alembic lists every plugin it sets up, and its dialect, at INFO at each start:
    # noise. What it migrates stays.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, QuietAlembic) for f in migration.filters):
        migration.addFilter(QuietAlembic())


class QuietAlembic(logging.Filter):
    """Drops alembic's "Context impl ..." and "Will assume ... DDL" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl", "Will assume"))


def event(logger: logging.Logger, what: str, **fields: Any) -> None:
    """Log ``what`` with ``fields``: as JSON fields, and as ``key=value`` in the text
    (so a text log says it all too). None values are left out of the text."""
    if not logger.isEnabledFor(logging.INFO):
        return
    text = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
    logger.info("%s %s", what, text, extra={"event": what, **fields})
