"""The gateway's error tree.

Every error a client can see carries a stable wire ``code``, an HTTP status for REST
and SSE, and whether retrying the same request later may succeed::

    GatewayError
    ├── CheckFailed                400  input_rejected, output_blocked (with its rule)
    ├── BadRequest                 400  invalid_json, invalid_frame, unknown_type,
    │                                   binary_not_supported, message_too_long,
    │                                   host_not_allowed, ...
    ├── Forbidden                  403  not_room_owner, origin_not_allowed
    ├── NotFound                   404  room_not_found, message_not_found,
    │                                   generation_not_found, not_found
    ├── Conflict                   409  busy, not_running, invalid_target
    ├── PayloadTooLarge            413  frame_too_large
    └── UpstreamError              502  upstream_error, upstream_unavailable,
        │                               upstream_timeout, upstream_bad_response,
        │                               upstream_truncated, upstream_rate_limited (429),
        │                               context_too_long
        ├── ModelBusy              503  busy (the local model's queue is full)
        └── NoProvider             503  no_provider

Defined beside their only raiser: ``Unauthorized`` (401, :mod:`gateway.access`),
``RateLimited`` (429, :mod:`gateway.quotas`), ``BrokerUnavailable`` (503,
:mod:`gateway.broker.redis`) and ``AccessCheckFailed`` (503 ``access_check_failed``,
:mod:`gateway.chat`).

Third-party exceptions (openai, SQLAlchemy) are translated into this tree once, at the
adapter that sees them; nothing above an adapter catches a library's own types.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error with a wire representation."""

    status: int = 500
    code: str = "internal_error"
    retryable: bool = False

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


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class NotFound(GatewayError):
    status = 404
    code = "not_found"


class CheckFailed(GatewayError):
    """A message failed an input or output check (``gateway.checks``); ``rule`` names it."""

    status = 400

    def __init__(self, message: str, *, code: str, rule: str) -> None:
        super().__init__(message, code=code)
        self.rule = rule

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "rule": self.rule}


class Forbidden(GatewayError):
    status = 403
    code = "forbidden"


class Conflict(GatewayError):
    status = 409
    code = "conflict"


class Busy(Conflict):
    """The room is already generating; retry once the running generation ends."""

    code = "busy"
    retryable = True


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class UpstreamError(GatewayError):
    """The model provider failed; the partial answer (if any) is stored with status error."""

    status = 502
    code = "upstream_error"
    retryable = True


class ModelBusy(UpstreamError):
    """Every slot of the local model is generating and its wait queue is full."""

    status = 503
    code = "busy"


class NoProvider(UpstreamError):
    status = 503
    code = "no_provider"
    retryable = False
