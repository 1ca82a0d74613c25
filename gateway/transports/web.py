"""The browser UI's files, and the headers every HTTP response carries.

The UI is plain ES modules from ``static/``: no inline script anywhere, so the
Content-Security-Policy can forbid it — the strongest guard against markup a model
(or a user) manages to slip into a page.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import logs

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` to every HTTP response (a plain
    ASGI wrapper, so streamed responses stay streamed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RequestIds:
    """ASGI middleware giving every HTTP request and WebSocket an id: the caller's
    ``X-Request-ID`` (a proxy's) if sane, else a new one; answered in the response's
    ``X-Request-ID`` and carried by every log line written while serving it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        sent = dict(scope["headers"]).get(b"x-request-id")
        current = logs.request_id_from(sent.decode("latin-1") if sent is not None else None)
        token = logs.request_id.set(current)
        try:
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return

            async def send_with_id(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    MutableHeaders(scope=message)["x-request-id"] = current
                await send(message)

            await self.app(scope, receive, send_with_id)
        finally:
            logs.request_id.reset(token)


class UIFiles(StaticFiles):
    """``static/`` with cache headers: vendored libraries live in folders named by
    their version, so they never change (cache for a year); everything else is
    revalidated on each load (cheap, with the ETag), so a new release shows at once."""

    def file_response(
        self, full_path: Any, stat_result: Any, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        immutable = scope["path"].startswith("/vendor/")
        response.headers["cache-control"] = (
            "public, max-age=31536000, immutable" if immutable else "no-cache"
        )
        return response
