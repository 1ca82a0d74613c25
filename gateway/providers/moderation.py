"""A moderation check on the ``/v1/moderations`` endpoint of an OpenAI-compatible
server, through the official ``openai`` SDK.

Unlike the checks in :mod:`gateway.checks` this is a network call, so it runs once per
user message (before it is stored) and once per answer, at its end — not on every
token. If the endpoint fails, the message is refused (``moderation_unavailable``):
a gateway configured to moderate does not silently stop moderating.
"""

from __future__ import annotations

import openai

from gateway.checks import ALLOWED, Verdict
from gateway.errors import UpstreamError


class Moderator:
    """The :class:`~gateway.providers.base.Moderation` of an OpenAI-compatible server:
    asks the endpoint whether a text is flagged, and for which categories."""

    def __init__(
        self, *, model: str, api_key: str | None, base_url: str | None, timeout: float = 10.0
    ) -> None:
        self.model = model
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "not-needed", base_url=base_url, max_retries=1, timeout=timeout
        )

    async def check(self, text: str) -> Verdict:
        try:
            response = await self._client.moderations.create(model=self.model, input=text)
        except openai.OpenAIError as exc:
            raise UpstreamError(
                f"the moderation endpoint failed: {exc}", code="moderation_unavailable"
            ) from None
        result = response.results[0]
        if not result.flagged:
            return ALLOWED
        categories = [name for name, on in result.categories.model_dump().items() if on]
        return Verdict.reject("moderation", f"flagged for {', '.join(categories) or 'policy'}")

    async def aclose(self) -> None:
        await self._client.close()
