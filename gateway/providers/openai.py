"""The OpenAI-compatible provider, on the official ``openai`` SDK.

This is the only module that imports ``openai``; its exceptions are translated into
:class:`gateway.errors.UpstreamError` here. Works with any server that speaks the
Chat Completions API (OpenAI, vLLM, Ollama, llama.cpp's server, ...).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx2
import openai

from gateway.errors import UpstreamError
from gateway.providers.base import Chunk, CompletionRequest


class OpenAIProvider:
    """Streams from ``base_url`` with ``AsyncOpenAI(stream=True)``.

    Timeouts: ``first_token_timeout`` bounds the wait for the response and its first
    chunk (SDK retries included); ``token_timeout`` bounds each gap between chunks.
    The SDK retries only while no response has arrived, so nothing is ever retried
    after a token reached a client.
    """

    name = "openai"

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None,
        connect_timeout: float = 10.0,
        first_token_timeout: float = 60.0,
        token_timeout: float = 30.0,
        max_retries: int = 2,
    ) -> None:
        self.first_token_timeout = first_token_timeout
        self.token_timeout = token_timeout
        read = max(first_token_timeout, token_timeout)
        self._client = openai.AsyncOpenAI(
            # Local servers (Ollama, vLLM) accept any key, but the SDK insists on one.
            api_key=api_key or "not-needed",
            base_url=base_url,
            max_retries=max_retries,
            timeout=httpx2.Timeout(read, connect=connect_timeout),
        )

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        try:
            async with asyncio.timeout(self.first_token_timeout):
                stream = await self._client.chat.completions.create(
                    model=request.model,
                    messages=request.messages,  # type: ignore[arg-type]
                    temperature=request.temperature,
                    max_tokens=request.max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                )
        except TimeoutError:
            raise UpstreamError(
                f"no response from the model within {self.first_token_timeout:g} s",
                code="upstream_timeout",
            ) from None
        except Exception as exc:
            raise _translate(exc) from exc

        try:
            chunks = stream.__aiter__()
            timeout = self.first_token_timeout
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise UpstreamError(
                        f"the model sent nothing for {timeout:g} s", code="upstream_timeout"
                    ) from None
                except Exception as exc:
                    raise _translate(exc) from exc
                usage = chunk.usage.model_dump() if chunk.usage is not None else None
                if chunk.choices:
                    choice = chunk.choices[0]
                    text = choice.delta.content or ""
                    if text:  # the role-only opening chunk does not count as a token
                        timeout = self.token_timeout
                    yield Chunk(text, choice.finish_reason, usage)
                elif usage is not None:
                    yield Chunk(usage=usage)
        finally:
            # Closing the response makes the upstream stop generating; breaking out of
            # the SDK's iterator alone would leave it streaming into the void.
            await stream.close()

    async def aclose(self) -> None:
        await self._client.close()


def _translate(exc: Exception) -> UpstreamError:
    """Map an SDK or transport exception onto the gateway's error tree."""
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, openai.RateLimitError):
        return UpstreamError(
            f"the model's rate limit was hit: {_detail(exc)}",
            code="upstream_rate_limited",
            status=429,
        )
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamError("the model timed out", code="upstream_timeout")
    if isinstance(exc, openai.APIStatusError):
        return UpstreamError(
            f"the model answered HTTP {exc.status_code}: {_detail(exc)}", code="upstream_error"
        )
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return UpstreamError(f"cannot reach the model: {exc}", code="upstream_unavailable")
    if isinstance(exc, json.JSONDecodeError | openai.APIError | ValueError):
        return UpstreamError(
            f"the model sent a malformed stream: {exc}", code="upstream_bad_response"
        )
    return UpstreamError(f"the model stream failed: {exc!r}", code="upstream_error")


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return exc.message
