"""Which checks a room's messages and answers go through: its input/output pipeline
(its own list of checks, else the gateway's), a secret-leak rule when its system
prompt is secret, and the moderation endpoint when asked for.

Screening a user message may be slow (a network call to moderate it, a thread for a
long text): the sending use case runs it before taking the room's lock.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.checks import CheckPipeline, SecretLeak, build_pipeline
from gateway.generation import CHECK_EVERY, rejected
from gateway.providers.base import Moderation
from gateway.store.models import Room

log = logging.getLogger(__name__)

SECRET_FRAGMENT_CHARS = 32
"""A secret system prompt counts as leaked from a copied run of about twice this."""

SECRET_HOLD_BACK_CHARS = 4 * SECRET_FRAGMENT_CHARS
"""In a room with a secret prompt, answers reach clients this many characters behind
the model, so that a leak is caught before any of it is shown: a leaked run is caught
at 2 × SECRET_FRAGMENT_CHARS normalised characters; the rest is margin for what
normalising shortens (collapsed whitespace, invisible characters)."""

LONG_INPUT_CHARS = 4000
"""Inputs longer than this are checked in a thread: the heuristics cost ~3 µs/char."""


async def check_input(checks: CheckPipeline, content: str) -> None:
    """Raise ``input_rejected`` (with the rule's name) when ``content`` fails a check."""
    if len(content) > LONG_INPUT_CHARS:
        verdict = await asyncio.to_thread(checks.check_input, content)
    else:
        verdict = checks.check_input(content)
    rejected(verdict, "input_rejected", "message")


class Screening:
    """The gateway's default checks and moderator, applied room by room."""

    def __init__(
        self, default_checks: list[str], *, max_chars: int, moderator: Moderation | None = None
    ) -> None:
        self.default_checks = default_checks
        self.max_chars = max_chars
        self.moderator = moderator

    def names(self, room: Room) -> list[str]:
        return room.checks if room.checks is not None else self.default_checks

    def rules_of(self, room: Room) -> tuple[object, ...]:
        """What the screening of ``room`` depends on: equal for two versions of a room
        that are screened alike."""
        return (tuple(self.names(room)), self.has_secret(room) and room.system_prompt)

    async def check_message(self, room: Room, content: str) -> None:
        """Run the room's input checks, then its moderation, on a user message; raise
        ``input_rejected`` (or ``moderation_unavailable``) when it may not be sent."""
        checks = self.checks(room)
        if checks is not None:
            await check_input(checks, content)
        moderator = self.moderator_of(room)
        if moderator is not None:
            rejected(await moderator.check(content), "input_rejected", "message")

    def moderator_of(self, room: Room) -> Moderation | None:
        """The moderation endpoint, when the room's checks include ``moderation``."""
        if "moderation" not in self.names(room):
            return None
        if self.moderator is None:
            log.warning("room %s asks for moderation, but none is configured", room.id)
        return self.moderator

    def checks(self, room: Room) -> CheckPipeline | None:
        """The room's input/output checks, plus a secret-leak rule when its system
        prompt is secret; None when there are none."""
        pipeline = build_pipeline(
            [name for name in self.names(room) if name not in ("secret_leak", "moderation")],
            max_chars=self.max_chars,
        )
        checks = list(pipeline.checks)
        if self.has_secret(room):
            # Also blocks a copied run of the prompt, not only the whole of it: by the
            # time all of it has streamed, it has leaked.
            checks.append(
                SecretLeak(
                    room.system_prompt,
                    fragment_chars=SECRET_FRAGMENT_CHARS,
                    output_every=CHECK_EVERY,  # on every check: text is held back for it
                )
            )
        return CheckPipeline(checks) if checks else None

    def hold_back(self, room: Room) -> int:
        """Characters an answer runs behind the model in ``room`` (see
        :data:`SECRET_HOLD_BACK_CHARS`)."""
        return SECRET_HOLD_BACK_CHARS if self.has_secret(room) else 0

    @staticmethod
    def has_secret(room: Room) -> bool:
        return room.secret_prompt and bool(room.system_prompt.strip())
