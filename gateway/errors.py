"""The gateway's error tree.

Every error a client can see knows its stable wire ``code``, its HTTP status (REST
and SSE), the WebSocket close code used when it ends a connection, and whether the
same request may succeed later (``retryable``)::

    GatewayError                   500  1011  internal_error (details only in the log)
    ├── BadRequest                 400  4400  invalid_json, invalid_frame, unknown_type,
    │   │                                     binary_not_supported, message_too_long,
    │   │                                     invalid_character, invalid_target,
    │   │                                     host_not_allowed, ...
    │   └── CheckFailed            400  4400  input_rejected, output_blocked (+ rule)
    ├── Unauthorized               401  1008  unauthorized
    ├── Forbidden                  403  1008  not_room_owner, origin_not_allowed, ...
    ├── NotFound                   404  4404  room_not_found, room_deleted,
    │                                         message_not_found, generation_not_found
    ├── Conflict                   409  4409  not_running, conflict
    │   └── Busy                   409  1013  busy (retryable)
    ├── PayloadTooLarge            413  1009  frame_too_large, body_too_large
    ├── RateLimited                429  1013  rate_limited, ... (retryable, retry_after)
    ├── Unavailable                503  1013  broker_unavailable, store_failed,
    │   │                                     access_check_failed (retryable)
    │   └── Stopping               503  1013  server_restarting (retryable)
    └── UpstreamError              502  1013  upstream_error, upstream_unavailable,
        │                                     upstream_timeout, upstream_bad_response,
        │                                     upstream_truncated, context_too_long,
        │                                     upstream_rate_limited (429)   (retryable)
        ├── ModelBusy              503  1013  busy (the local model's queue is full)
        └── NoProvider             503  1011  no_provider (not retryable)

Close codes: 1008 policy (credentials), 1009 too big, 1011 server fault, 1012 the
server is restarting and 1013 try again later (both: reconnect, resuming), 4400 a bad
request, 4404 the room does not exist or is not visible (do not reconnect).

Third-party exceptions (openai, SQLAlchemy, redis) are translated into this tree once,
at the adapter that sees them; nothing above an adapter catches a library's own types,
and no client ever sees a library's message or an exception's ``repr``.
"""

from __future__ import annotations

from typing import Final

CLOSE_NORMAL: Final = 1000
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SERVICE_RESTART: Final = 1012
CLOSE_TRY_AGAIN_LATER: Final = 1013
CLOSE_BAD_REQUEST: Final = 4400
CLOSE_ROOM_GONE: Final = 4404


class GatewayError(Exception):
    """Base of every error with a wire representation."""

    status: int = 500
    code: str = "internal_error"
    retryable: bool = False
    close_code: int = CLOSE_INTERNAL_ERROR
    """How a WebSocket that this error ends is closed (retryable errors: 1013)."""

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, object]:
        """The ``{"code", "message"}`` body shared by REST errors and ``error`` frames."""
        return {"code": self.code, "message": self.message}


def internal_error() -> GatewayError:
    """What a client is told of an unexpected failure (the log has the details)."""
    return GatewayError("internal error; the gateway's log has the details")


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"
    close_code = CLOSE_BAD_REQUEST


class CheckFailed(BadRequest):
    """A message failed an input or output check (``gateway.checks``); ``rule`` names it."""

    def __init__(self, message: str, *, code: str, rule: str) -> None:
        super().__init__(message, code=code)
        self.rule = rule

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "rule": self.rule}


class Unauthorized(GatewayError):
    """No valid key or token."""

    status = 401
    code = "unauthorized"
    close_code = CLOSE_POLICY_VIOLATION


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"
    close_code = CLOSE_POLICY_VIOLATION


class NotFound(GatewayError):
    status = 404
    code = "not_found"
    close_code = CLOSE_ROOM_GONE


class Conflict(GatewayError):
    status = 409
    code = "conflict"
    close_code = 4409


class Busy(Conflict):
    """The room is already generating; retry once the running generation ends."""

    code = "busy"
    retryable = True
    close_code = CLOSE_TRY_AGAIN_LATER


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"
    close_code = CLOSE_TOO_BIG


class RateLimited(GatewayError):
    """Over a rate limit or quota; retry after ``retry_after`` seconds."""

    status = 429
    code = "rate_limited"
    retryable = True
    close_code = CLOSE_TRY_AGAIN_LATER

    def __init__(self, message: str, *, retry_after: float, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, round(retry_after))

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "retry_after": self.retry_after}


class Unavailable(GatewayError):
    """A shared part (Redis, the database) is not answering; retry shortly."""

    status = 503
    code = "unavailable"
    retryable = True
    close_code = CLOSE_TRY_AGAIN_LATER


class Stopping(Unavailable):
    """The gateway is shutting down: nothing new starts here; retry (elsewhere, or
    once it is back)."""

    code = "server_restarting"
    close_code = CLOSE_SERVICE_RESTART


class UpstreamError(GatewayError):
    """The model provider failed; the partial answer (if any) is stored with status error."""

    status = 502
    code = "upstream_error"
    retryable = True
    close_code = CLOSE_TRY_AGAIN_LATER


class ModelBusy(UpstreamError):
    """Every slot of the local model is generating and its wait queue is full."""

    status = 503
    code = "busy"


class NoProvider(UpstreamError):
    status = 503
    code = "no_provider"
    retryable = False
    close_code = CLOSE_INTERNAL_ERROR
