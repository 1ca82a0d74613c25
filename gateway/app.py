"""The composition root: ``create_app`` wires settings, store, provider, hub and
transports together. The lifespan owns every resource; nothing is created at import.

Run with ``chat-gateway serve``, or ``uvicorn --factory gateway.app:create_app``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypedDict

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from gateway.chat import ChatService
from gateway.hub import RoomHub
from gateway.providers.base import ChatProvider
from gateway.rooms import RoomService
from gateway.settings import Settings, load_settings
from gateway.store.db import Database
from gateway.store.repository import MessageStore
from gateway.store.writer import Writer
from gateway.transports import http, websocket

log = logging.getLogger("gateway")

STATIC = Path(__file__).resolve().parent.parent / "static"


class State(TypedDict):
    settings: Settings
    chat: ChatService
    rooms: RoomService


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


def _unavailable(settings: Settings) -> ChatProvider:
    from gateway.providers.unavailable import UnavailableProvider

    return UnavailableProvider()


# Implementations are imported only when chosen.
PROVIDERS: dict[str, Callable[[Settings], ChatProvider]] = {
    "openai": _openai,
    "none": _unavailable,
}


def choose_provider(settings: Settings) -> str:
    """``openai`` when an upstream is configured, else ``none`` (clear errors)."""
    if settings.openai_api_key or settings.openai_base_url:
        return "openai"
    return "none"


def create_app(
    settings: Settings | None = None, *, provider: ChatProvider | None = None
) -> Starlette:
    """Build the ASGI app. ``provider`` overrides the one the settings would choose."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        db = Database(settings.database_url)
        await db.upgrade()
        async with db.transaction() as session:
            interrupted = await MessageStore(session).interrupt_streaming()
        if interrupted:
            log.warning("marked %d answers left streaming by a crash as interrupted", interrupted)
        chosen = provider or PROVIDERS[choose_provider(settings)](settings)
        log.info(
            "provider %s (%s), default model %s",
            chosen.name,
            settings.openai_base_url or "default endpoint",
            settings.default_model,
        )
        writer = Writer(db)
        writer.start()
        chat = ChatService(
            db=db,
            writer=writer,
            hub=RoomHub(settings.send_queue_size),
            provider=chosen,
            settings=settings,
        )
        chat.start()
        try:
            yield {"settings": settings, "chat": chat, "rooms": RoomService(db, chat)}
        finally:
            await chat.shutdown()
            await writer.close()
            await chosen.aclose()
            await db.dispose()

    routes: list[Any] = [*http.routes, *websocket.routes]
    if STATIC.is_dir():
        routes.append(Mount("/", StaticFiles(directory=STATIC, html=True), name="static"))
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=http.exception_handlers)
