"""The composition root: ``create_app`` wires settings, store, provider, broker, hub
and transports together. The lifespan owns every resource; nothing is created at import.

Run with ``chat-gateway serve``, or ``uvicorn --factory gateway.app:create_app``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypedDict

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount

from gateway.access import AccessControl, parse_keys, read_keys_file
from gateway.broker.base import EventBus, RoomLeases
from gateway.bundled import bundled_dir
from gateway.chat import ChatService
from gateway.eventlog import EventLogs
from gateway.hub import RoomHub
from gateway.metrics import OFF, Metrics
from gateway.providers.base import ChatProvider
from gateway.providers.moderation import Moderator
from gateway.quotas import Quotas
from gateway.rooms import RoomService
from gateway.search import SearchService
from gateway.settings import Settings, SettingsError, load_settings
from gateway.store.db import Database, describe_database
from gateway.store.repository import MessageStore
from gateway.store.writer import Writer
from gateway.tracing import NO_TRACING, TraceContext, Tracing, make_tracing
from gateway.transports import http, openai_api, websocket
from gateway.transports.guard import AccessGuard, redact_tokens_in_logs
from gateway.transports.web import RequestIds, SecurityHeaders, UIFiles

log = logging.getLogger("gateway")

STATIC = bundled_dir("static")


class State(TypedDict):
    """What the lifespan yields; uvicorn shares it with every request (scope["state"])
    and with its protocols (``app_state``)."""

    settings: Settings
    access: AccessControl
    chat: ChatService
    rooms: RoomService
    drain: Callable[[], asyncio.Task[None]]
    """Starts (once; later calls return the same task) the shutdown's first step: end
    running answers as ``interrupted`` and every stream after its last frames. The
    server's protocols call it when uvicorn begins to shut down (:mod:`gateway.server`)."""


def access_control(settings: Settings) -> AccessControl:
    """The keys from GATEWAY_API_KEYS and GATEWAY_API_KEYS_FILE; raises SettingsError."""
    entries = list(settings.api_keys)
    try:
        if settings.api_keys_file is not None:
            entries += read_keys_file(settings.api_keys_file)
        keys = parse_keys(entries)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"GATEWAY_API_KEYS / GATEWAY_API_KEYS_FILE: {exc}") from None
    return AccessControl(keys, token_secret=settings.token_secret, token_ttl=settings.token_ttl)


def _openai(settings: Settings) -> ChatProvider:
    from gateway.providers.openai import OpenAIProvider

    return OpenAIProvider(
        api_key=settings.openai_api_key,
        base_url=settings.openai_base_url,
        connect_timeout=settings.upstream_connect_timeout,
        first_token_timeout=settings.upstream_first_token_timeout,
        token_timeout=settings.upstream_token_timeout,
        max_retries=settings.upstream_max_retries,
    )


def _local(settings: Settings) -> ChatProvider:
    from gateway.providers.local import LocalProvider, check_available

    return LocalProvider(
        check_available(settings.local_model),
        context_tokens=settings.local_context_tokens,
        threads=settings.local_threads,
        max_sequences=settings.local_slots,
        queue_size=settings.local_queue_size,
    )


def _unavailable(settings: Settings) -> ChatProvider:
    from gateway.providers.local import LocalModelMissing, check_available
    from gateway.providers.unavailable import UnavailableProvider

    try:
        check_available(settings.local_model)
        reason = "the local model is available but GATEWAY_PROVIDER chose none"
    except LocalModelMissing as exc:
        reason = str(exc)
    return UnavailableProvider(reason)


def make_broker(
    settings: Settings, redis: Any, metrics: Metrics = OFF
) -> tuple[EventBus, RoomLeases]:
    """The event bus and the room leases: on Redis when ``GATEWAY_REDIS_URL`` is set
    (several processes, sharing one connection), else in memory."""
    if redis is not None:
        from gateway.broker.redis import RedisBackend, RedisEventBus, RedisRoomLeases

        backend = RedisBackend(
            redis,
            prefix=settings.redis_prefix,
            log_size=settings.event_buffer_size,
            log_seconds=settings.event_buffer_seconds,
            metrics=metrics,
        )
        return RedisEventBus(backend, presence_seconds=settings.lease_seconds), RedisRoomLeases(
            backend, lease_seconds=settings.lease_seconds
        )
    from gateway.broker.memory import MemoryEventBus, MemoryRoomLeases

    bus = MemoryEventBus(EventLogs(settings.event_buffer_size, settings.event_buffer_seconds))
    return bus, MemoryRoomLeases(bus)


REDIS_CONNECTIONS = 64
"""Connections to Redis per process. A burst of sends waits for one (up to 5 s)
rather than opening hundreds, or failing as redis-py's default pool does past 100."""


def connect_redis(url: str) -> Any:
    """One redis-py asyncio client (and connection pool) for the whole process."""
    import redis.asyncio

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=5,
        socket_connect_timeout=2,
        health_check_interval=5,
    )
    return redis.asyncio.Redis.from_pool(pool)  # closing the client closes the pool


# Implementations are imported only when chosen.
PROVIDERS: dict[str, Callable[[Settings], ChatProvider]] = {
    "openai": _openai,
    "local": _local,
    "none": _unavailable,
}


def choose_provider(settings: Settings) -> str:
    """The provider ``GATEWAY_PROVIDER`` names; for ``auto``, ``openai`` when an upstream
    is configured, else ``local`` when it can run, else ``none`` (every generation then
    fails with ``no_provider``, saying how to configure one).

    Raises :class:`SettingsError` when ``local`` is asked for but cannot run.
    """
    from gateway.providers.local import LocalModelMissing, check_available

    if settings.local_model is not None and not settings.local_model.is_file():
        # Whatever the mode: a model named but missing is a mistake, not "no model".
        raise SettingsError(f"GATEWAY_LOCAL_MODEL={settings.local_model} is not a file")
    if settings.provider == "openai":
        return "openai"
    if settings.provider == "auto" and (settings.openai_api_key or settings.openai_base_url):
        return "openai"
    try:
        check_available(settings.local_model)
    except LocalModelMissing as exc:
        if settings.provider == "local":
            raise SettingsError(f"GATEWAY_PROVIDER=local: {exc}") from None
        return "none"
    return "local"


def create_app(
    settings: Settings | None = None,
    *,
    provider: ChatProvider | None = None,
    tracing: Tracing | None = None,
) -> Starlette:
    """Build the ASGI app. ``provider`` and ``tracing`` override what the settings would
    choose (tracing given here is not shut down with the app).

    Raises :class:`SettingsError` when the chosen provider cannot run, or tracing is
    asked for without its extra.
    """
    settings = settings or load_settings()
    make_provider = PROVIDERS[choose_provider(settings)] if provider is None else None
    own_tracing = tracing is None
    tracing = make_tracing(settings) if tracing is None else tracing
    access = access_control(settings)
    metrics = Metrics(enabled=settings.metrics)
    redact_tokens_in_logs()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        db = Database(settings.database_url)
        log.info("database %s", describe_database(settings.database_url))
        await db.upgrade()
        redis = connect_redis(settings.redis_url) if settings.redis_url else None
        bus, leases = make_broker(settings, redis, metrics)
        # Answers other processes are streaming are theirs (or, if those died, the
        # leases' takeover ends them with their published text).
        streaming_elsewhere = await leases.generating()
        async with db.transaction() as session:
            store = MessageStore(session)
            interrupted = await store.interrupt_streaming(streaming_elsewhere)
        if interrupted:
            log.warning("marked %d answers left streaming by a crash as interrupted", interrupted)
        chosen = provider if make_provider is None else make_provider(settings)
        where = settings.openai_base_url or "the OpenAI API"
        log.info(
            "provider %s, default model %s%s",
            chosen.name,
            settings.default_model or chosen.default_model,
            f" at {where}" if chosen.name == "openai" else "",
        )
        moderator = (
            Moderator(
                model=settings.moderation_model,
                api_key=settings.openai_api_key,
                base_url=settings.moderation_base_url or settings.openai_base_url,
            )
            if settings.moderation_model
            else None
        )
        writer = Writer(db, metrics)
        writer.start()
        chat = ChatService(
            db=db,
            writer=writer,
            hub=RoomHub(settings.send_queue_size, metrics),
            bus=bus,
            leases=leases,
            provider=chosen,
            settings=settings,
            quotas=Quotas(
                messages=settings.rate_limit_messages,
                room_messages=settings.rate_limit_room_messages,
                max_generations=settings.max_concurrent_generations,
                max_connections=settings.max_connections_per_client,
                storage=settings.rate_limit_storage or settings.redis_url or "memory://",
                key_prefix=settings.redis_prefix,
                # One pool for the broker and the counters, unless they are elsewhere.
                connection_pool=(
                    redis.connection_pool if redis and not settings.rate_limit_storage else None
                ),
            ),
            moderator=moderator,
            metrics=metrics,
            tracing=tracing,
        )
        await chat.start()
        draining: list[asyncio.Task[None]] = []

        async def drain_logged() -> None:
            try:
                await chat.drain()
            except Exception:
                log.exception("ending the streams for shutdown failed")

        def drain() -> asyncio.Task[None]:
            if not draining:
                draining.append(asyncio.create_task(drain_logged(), name="drain"))
            return draining[0]

        try:
            yield {
                "settings": settings,
                "access": access,
                "chat": chat,
                "rooms": RoomService(db, chat),
                "metrics": metrics,
                "search": SearchService(db),
                "drain": drain,
            }
        finally:
            if draining:  # started by the server; normally long done
                await asyncio.gather(draining[0], return_exceptions=True)
            await chat.shutdown()
            await bus.aclose()  # first: the people still here leave, with its last events
            await leases.aclose()
            if redis is not None:
                await redis.aclose()
            await writer.close()
            await chosen.aclose()
            if moderator is not None:
                await moderator.aclose()
            await db.dispose()
            if own_tracing:
                await asyncio.to_thread(tracing.shutdown)  # sends the last spans

    routes: list[Any] = [*websocket.routes, *http.routes, *openai_api.routes]  # hot ones first
    if STATIC.is_dir():
        routes.append(Mount("/", UIFiles(directory=STATIC, html=True), name="static"))
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=http.exception_handlers,
        middleware=[
            Middleware(RequestIds),
            *([] if tracing is NO_TRACING else [Middleware(TraceContext)]),
            Middleware(SecurityHeaders),
            # Outside the guard: a CORS preflight carries no credentials.
            *cors(settings.allowed_origins),
            Middleware(
                AccessGuard,
                access=access,
                allowed_origins=settings.allowed_origins,
                allowed_hosts=settings.allowed_hosts,
                metrics=metrics,
            ),
        ],
    )


def cors(origins: list[str]) -> list[Middleware]:
    """Cross-origin REST/SSE for the configured origins only (none: same origin)."""
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["authorization", "content-type", "last-event-id", "accept"],
            max_age=600,
        )
    ]
