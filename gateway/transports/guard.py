"""Access checks in front of every route: Host, API keys, URL tokens, WebSocket Origin.

Runs before any route, so a refused request never reaches room data: HTTP gets a JSON
error (400 for a host not served, 401 without a valid key), a WebSocket is accepted
only to be closed at once with 1008 (policy violation) and a reason — a browser shows
nothing useful for a refused handshake.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import protocol
from gateway.access import OPEN, AccessControl, Client, Unauthorized, Viewer
from gateway.errors import CLOSE_POLICY_VIOLATION, BadRequest, Forbidden, GatewayError
from gateway.metrics import OFF, Metrics
from gateway.settings import is_ip_address
from gateway.transports import error_body_for, is_openai_path

OPEN_PATHS = ("/healthz",)
"""HTTP paths outside ``/api`` and ``/v1`` (the UI's files, health checks) need no
key. The liveness check answers any Host too (probes may use a name of their own); it
tells nothing about rooms."""

# Paths a browser opens without being able to set headers: they take ?token=.
TOKEN_PATHS = re.compile(r"^/api/rooms/[^/]+/events$")


def own_origin(scope: Scope) -> str | None:
    """The origin the request was addressed to (``http[s]://host[:port]``)."""
    host = dict(scope["headers"]).get(b"host")
    if host is None:
        return None
    secure = scope.get("scheme") in ("https", "wss")
    return f"{'https' if secure else 'http'}://{host.decode('latin-1')}"


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without the port, lower case, no final dot."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header[: header.find("]") + 1] or header
    return header.partition(":")[0].rstrip(".")


class HostCheck:
    """Which ``Host`` headers are served: the configured names (``*.example.com``
    for subdomains, ``*`` for any), and IP addresses.

    Why: DNS rebinding. A page on ``rebind.evil.example`` whose name is then pointed
    at 127.0.0.1 reaches the gateway as the same origin as itself (Origin checks
    compare with the Host it sent); only the Host name gives it away. An address
    cannot be rebound, so addresses are always served (as Vite does).
    """

    def __init__(self, allowed: list[str]) -> None:
        self.any = "*" in allowed
        self.names = {name for name in allowed if not name.startswith("*.")}
        self.suffixes = tuple(name[1:] for name in allowed if name.startswith("*."))

    def allows(self, header: bytes | None) -> bool:
        if self.any or header is None:  # no Host: HTTP/1.0, not a browser
            return True
        name = host_name(header.decode("latin-1"))
        return (
            name in self.names
            or (bool(self.suffixes) and name.endswith(self.suffixes))
            or is_ip_address(name)
        )


class AccessGuard:
    """ASGI middleware enforcing the Host allow-list, :class:`AccessControl` and the
    Origin allow-list."""

    def __init__(
        self,
        app: ASGIApp,
        access: AccessControl,
        allowed_origins: list[str],
        allowed_hosts: list[str],
        metrics: Metrics = OFF,
    ) -> None:
        self.app = app
        self.refused = metrics.refused
        self.access = access
        self.allowed_origins = set(allowed_origins)
        self.hosts = HostCheck(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            client = self.authenticate(scope)
        except GatewayError as exc:
            self.refused.labels(exc.code).inc()
            if scope["type"] == "websocket":
                await refuse_websocket(receive, send, exc)
            else:
                await refuse_http(send, exc, scope["path"])
            return
        state = scope.setdefault("state", {})
        if client is not None:
            state["client"] = client
        state["viewer"] = Viewer(client.key_name if client else None, self.access.enabled)
        await self.app(scope, receive, send)

    def authenticate(self, scope: Scope) -> Client | None:
        """The caller, None where no check applies; raises Unauthorized/Forbidden,
        or BadRequest for a host not served."""
        path: str = scope["path"]
        if path not in OPEN_PATHS or scope["type"] == "websocket":
            self.check_host(scope)
        if scope["type"] == "websocket":
            self.check_origin(scope)
            if not self.access.enabled:
                return None
            # A browser can only pass a token in the URL; scripts (wscat -H) may send
            # the key itself as a header, as for the REST API.
            key = bearer(scope)
            if key is not None:
                return self.access.check_key(key)
            return self.access.check_token(query_param(scope, "token"))
        if not self.access.enabled or path in OPEN_PATHS:
            return None
        if not path.startswith("/api/") and not is_openai_path(path) and path != "/metrics":
            return None
        key = bearer(scope)
        if key is None and TOKEN_PATHS.match(path) and scope["method"] == "GET":
            return self.access.check_token(query_param(scope, "token"))
        return self.access.check_key(key)

    def check_host(self, scope: Scope) -> None:
        host = dict(scope["headers"]).get(b"host")
        if not self.hosts.allows(host):
            name = host_name((host or b"").decode("latin-1"))[:100]
            raise BadRequest(
                f"host {name!r} is not served here (GATEWAY_ALLOWED_HOSTS)",
                code="host_not_allowed",
            )

    def check_origin(self, scope: Scope) -> None:
        """Stop cross-site WebSocket hijacking: a page on another site must not open
        a socket with this user's credentials. Exact matches only."""
        origin = dict(scope["headers"]).get(b"origin")
        if origin is None:
            return  # not a browser (wscat, scripts): nothing to hijack
        value = origin.decode("latin-1")
        if value in self.allowed_origins or (
            not self.allowed_origins and value == own_origin(scope)
        ):
            return
        raise Forbidden(
            f"origin {value[:100]!r} is not allowed (GATEWAY_ALLOWED_ORIGINS)",
            code="origin_not_allowed",
        )


def sender_of(scope: Scope) -> str:
    """Who is asking, for quotas: the API key's name, else the IP address."""
    client: Client | None = scope.get("state", {}).get("client")
    if client is not None:
        return f"key:{client.key_name}"
    address = scope.get("client")
    return f"ip:{address[0]}" if address else "ip:unknown"


def viewer_of(scope: Scope) -> Viewer:
    """Who is asking, for room access (set by :class:`AccessGuard`)."""
    return scope.get("state", {}).get("viewer", OPEN)


def bearer(scope: Scope) -> str | None:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, value = header.partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def query_param(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None


async def refuse_http(send: Send, exc: GatewayError, path: str) -> None:
    body = protocol.encode(error_body_for(path, exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if isinstance(exc, Unauthorized):
        headers.append((b"www-authenticate", b'Bearer realm="chat-gateway"'))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def refuse_websocket(receive: Receive, send: Send, exc: GatewayError) -> None:
    message: dict[str, Any] = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION, "reason": exc.code})


SECRET_PARAMETERS = "|".join(
    [
        r"[\w.-]*token",  # token, access_token, refresh_token, id_token
        r"(?:[\w.-]*[_.-])?(?:api)?key",  # key, api_key, apikey, x-api-key (not monkey)
        r"[\w.-]*secret",  # secret, client_secret
        r"(?:[\w.-]*[_.-])?(?:sig|signature)",  # signed URLs (X-Amz-Signature, sig)
        r"(?:[\w.-]*[_.-])?auth(?:orization)?",
        r"[\w.-]*credentials?",
        r"password|passwd|pwd|passphrase",
    ]
)
"""Query parameters whose values are secrets (case-insensitive)."""


class RedactTokens(logging.Filter):
    """Keeps URL tokens, and keys wrongly sent in a URL (``?api_key=``), out of logs:
    uvicorn logs each request's path and query."""

    # A parameter starts a query string or follows a separator (not a path's "/").
    PATTERN = re.compile(rf"(?i)(?<![^?&;\s\"'])((?:{SECRET_PARAMETERS})=)[^&;\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        # Redact inside the arguments, keeping their shape: uvicorn's access
        # formatter unpacks them.
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact(arg) for arg in record.args)
        record.msg = self._redact(record.msg)
        return True

    def _redact(self, value: Any) -> Any:
        if isinstance(value, str) and "=" in value:
            return self.PATTERN.sub(r"\1[redacted]", value)
        return value


def redact_tokens_in_logs() -> None:
    """Install :class:`RedactTokens` on uvicorn's loggers (once)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
