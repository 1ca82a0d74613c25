"""Traces of answers with OpenTelemetry: off unless configured (``GATEWAY_TRACING``).

Each answer is one trace span, ``answer``, from the moment a send, an edit or a
regeneration is taken in to the answer stored and announced, with a child span per
step:

- ``checks.input``: the room's checks and moderation on the user's message;
- ``store.write``: each write to the store (the message and the answer's row; the
  final answer);
- ``chat {model}``: the request to the model (kind CLIENT, the OpenTelemetry GenAI
  attribute names), whose W3C ``traceparent`` is sent upstream, so the model server's
  own spans join the trace;
- ``checks.output``: the last run of the output checks and moderation on the answer.

An HTTP request carrying a ``traceparent`` (a client's or a proxy's) becomes the
answer's parent (:class:`TraceContext`); a WebSocket's answers are traces of their own
(a connection lives for hours: one trace for all its answers would help nobody).

This is the only module that imports ``opentelemetry`` (the ``otel`` extra). With
tracing off, :data:`NO_TRACING` hands out :data:`NO_TRACE`, whose methods do nothing;
tokens never touch tracing either way: spans are per answer and per step, not per token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

from gateway import installed_version, logs
from gateway.errors import GatewayError, UpstreamError
from gateway.settings import Settings, SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from starlette.types import ASGIApp, Receive, Scope, Send

    from gateway.providers.base import CompletionRequest

log = logging.getLogger(__name__)

SERVICE_NAME = "chat-gateway"


class UpstreamCall(Protocol):
    """The span of one request to the model, as the generation sees it."""

    headers: Mapping[str, str]
    """What to send upstream with the request (``traceparent``; empty when off)."""

    def first_token(self) -> None:
        """The first text of the answer came."""
        ...

    def finished(self, finish_reason: str | None, usage: Mapping[str, Any] | None) -> None:
        """How the model ended the answer, and what it counted."""
        ...


class AnswerTrace(Protocol):
    """The span of one answer; ended by :meth:`end` (the generation's), or on leaving
    :meth:`Tracing.answer` when no answer was launched."""

    def step(self, name: str, **attributes: Any) -> AbstractContextManager[None]:
        """A child span around one step (``checks.input``, ``store.write``, ...)."""
        ...

    def upstream(
        self, provider: str, request: CompletionRequest
    ) -> AbstractContextManager[UpstreamCall]:
        """A child span around the request to the model and the reading of its stream."""
        ...

    def launched(self) -> None:
        """A generation took the span over: it ends it (see :meth:`end`)."""
        ...

    def end(self, status: str, error: GatewayError | None = None, **attributes: Any) -> None:
        """The answer is over with ``status`` (``complete``, ``cancelled``, ...)."""
        ...


class Tracing(Protocol):
    """Makes the span of each answer."""

    def answer(
        self, action: str, room_id: str, generation_id: str
    ) -> AbstractContextManager[AnswerTrace]:
        """The span of an answer a ``send``/``edit``/``regenerate`` starts: ended on
        leaving unless a generation was launched with it (then the generation ends it);
        an exception leaving it is recorded on it."""
        ...

    def shutdown(self) -> None:
        """Send what is buffered and stop (blocks: call in a thread)."""
        ...


# ----------------------------------------------------------------------------- off


class _NoCall:
    headers: Mapping[str, str] = {}

    def first_token(self) -> None:
        pass

    def finished(self, finish_reason: str | None, usage: Mapping[str, Any] | None) -> None:
        pass


class _NoTrace:
    def __init__(self) -> None:
        # One of each, reused: a nullcontext may be entered any number of times.
        self._step = nullcontext()
        self._upstream = nullcontext(_NoCall())

    def step(self, name: str, **attributes: Any) -> AbstractContextManager[None]:
        return self._step

    def upstream(
        self, provider: str, request: CompletionRequest
    ) -> AbstractContextManager[UpstreamCall]:
        return self._upstream

    def launched(self) -> None:
        pass

    def end(self, status: str, error: GatewayError | None = None, **attributes: Any) -> None:
        pass


NO_TRACE: AnswerTrace = _NoTrace()


class _NoTracing:
    def __init__(self) -> None:
        self._answer = nullcontext(NO_TRACE)

    def answer(
        self, action: str, room_id: str, generation_id: str
    ) -> AbstractContextManager[AnswerTrace]:
        return self._answer

    def shutdown(self) -> None:
        pass


NO_TRACING: Tracing = _NoTracing()


# ------------------------------------------------------------------- OpenTelemetry


def _recorded(
    span: Span, exc: BaseException, *, failed_by: type[GatewayError] = GatewayError
) -> None:
    """Mark ``span`` as failed by ``exc`` if it is a ``failed_by`` error or a bug; any
    other gateway error (a check stopping the answer), or a cancellation, is noted
    without failing the span."""
    from opentelemetry.trace import Status, StatusCode

    if isinstance(exc, GatewayError) and not isinstance(exc, failed_by):
        span.set_attribute("gateway.stopped_by", exc.code)
    elif isinstance(exc, GatewayError):
        span.set_attribute("error.type", exc.code)
        span.set_status(Status(StatusCode.ERROR, exc.code))
    elif isinstance(exc, Exception):
        span.record_exception(exc)
        span.set_attribute("error.type", type(exc).__qualname__)
        span.set_status(Status(StatusCode.ERROR, type(exc).__qualname__))
    else:
        span.set_attribute("gateway.cancelled", True)


class _OtelCall:
    def __init__(self, span: Span, headers: dict[str, str]) -> None:
        self.span = span
        self.headers = headers

    def first_token(self) -> None:
        if self.span.is_recording():  # text held back by checks shows after the request
            self.span.add_event("gen_ai.first_token")

    def finished(self, finish_reason: str | None, usage: Mapping[str, Any] | None) -> None:
        span = self.span
        if finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        for name, key in (
            ("gen_ai.usage.input_tokens", "prompt_tokens"),
            ("gen_ai.usage.output_tokens", "completion_tokens"),
        ):
            value = (usage or {}).get(key)
            if isinstance(value, int):
                span.set_attribute(name, value)


class _OtelTrace:
    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        self.owned_by_generation = False
        self._ended = False

    @contextmanager
    def step(self, name: str, **attributes: Any) -> Iterator[None]:
        from opentelemetry.trace import set_span_in_context

        parent = set_span_in_context(self.span)
        with self._tracer.start_as_current_span(
            name,
            context=parent,
            attributes=attributes or None,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except BaseException as exc:
                _recorded(span, exc)
                raise

    @contextmanager
    def upstream(self, provider: str, request: CompletionRequest) -> Iterator[UpstreamCall]:
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind, set_span_in_context

        span = self._tracer.start_span(
            f"chat {request.model}",
            context=set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": request.model,
                "gen_ai.request.temperature": request.temperature,
                "gen_ai.request.max_tokens": request.max_tokens,
            },
        )
        headers: dict[str, str] = {}
        propagate.inject(headers, context=set_span_in_context(span))
        try:
            yield _OtelCall(span, headers)
        except BaseException as exc:
            _recorded(span, exc, failed_by=UpstreamError)
            raise
        finally:
            span.end()

    def launched(self) -> None:
        self.owned_by_generation = True

    def end(self, status: str, error: GatewayError | None = None, **attributes: Any) -> None:
        if self._ended:
            return
        self._ended = True
        span = self.span
        span.set_attribute("gateway.answer.status", status)
        for name, value in attributes.items():
            if value is not None:
                span.set_attribute(f"gateway.answer.{name}", value)
        if error is not None:
            _recorded(span, error)
        span.end()


class OpenTelemetryTracing:
    """Spans from ``provider`` (an SDK ``TracerProvider``): see :func:`make_tracing`
    for how the gateway makes one; tests pass one with an in-memory exporter."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("gateway", installed_version())

    @contextmanager
    def answer(self, action: str, room_id: str, generation_id: str) -> Iterator[AnswerTrace]:
        # The current context: an HTTP request's traceparent, when TraceContext took one.
        attributes = {
            "gateway.action": action,
            "gateway.room.id": room_id,
            "gateway.generation.id": generation_id,
        }
        if (request_id := logs.request_id.get()) is not None:
            attributes["gateway.request.id"] = request_id
        span = self._tracer.start_span("answer", attributes=attributes)
        trace = _OtelTrace(self._tracer, span)
        try:
            yield trace
        except BaseException as exc:
            if not trace.owned_by_generation:
                _recorded(span, exc)
                trace.end("not_started")
            raise
        if not trace.owned_by_generation:
            trace.end("not_started")  # e.g. a retried message, already answered

    def shutdown(self) -> None:
        self.provider.shutdown()


class TraceContext:
    """ASGI middleware: while an HTTP request with a ``traceparent`` is served, its
    trace context is the current one (so its answers' spans are its children)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not any(
            name == b"traceparent" for name, _ in scope["headers"]
        ):
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, propagate

        carrier = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        token = context.attach(propagate.extract(carrier))
        try:
            await self.app(scope, receive, send)
        finally:
            context.detach(token)


def make_tracing(settings: Settings) -> Tracing:
    """What ``GATEWAY_TRACING`` asks for: ``off`` (:data:`NO_TRACING`), ``otlp`` (spans
    sent in batches to an OpenTelemetry collector: ``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_HEADERS`` and the other standard variables), or ``console``
    (spans printed to stdout, to try it). ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` name the service (``chat-gateway`` by default)."""
    if settings.tracing == "off":
        return NO_TRACING
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

        exporter: SpanExporter
        if settings.tracing == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter()
    except ImportError as exc:
        raise SettingsError(
            f"GATEWAY_TRACING={settings.tracing} needs the otel extra: "
            f"pip install 'chat-gateway[otel]' ({exc})"
        ) from None
    defaults = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME_KEY: SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(defaults))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info("tracing on: spans go to %s", settings.tracing)
    return OpenTelemetryTracing(provider)
