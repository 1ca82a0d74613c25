"""Building the prompt sent upstream: system prompt + active branch, within a budget.

Pure functions; token counts are estimates (about four characters per token plus a
few tokens of per-message overhead), which is what a gateway that serves many
different models can afford without shipping every tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PER_MESSAGE_OVERHEAD = 4


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4 + PER_MESSAGE_OVERHEAD


@dataclass(frozen=True, slots=True)
class Turn:
    role: str
    content: str


def build_prompt(
    system_prompt: str,
    history: Sequence[Turn],
    *,
    context_tokens: int,
    max_tokens: int,
    max_turns: int | None = None,
) -> list[dict[str, str]]:
    """The messages for the upstream: the system prompt (always kept) and as many of
    the newest turns as fit in ``context_tokens`` minus room for the answer, and at
    most ``max_turns`` of them.

    Turns without text (an answer cancelled before its first token) are skipped. The
    newest turn is always kept, even when it alone exceeds the budget: the upstream
    then reports the overflow itself, which says more than silently sending nothing.
    """
    budget = context_tokens - max_tokens
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if system:
        budget -= estimate_tokens(system_prompt)
    kept: list[dict[str, str]] = []
    for turn in reversed(history):
        if not turn.content:
            continue
        cost = estimate_tokens(turn.content)
        if kept and (cost > budget or len(kept) == max_turns):
            break
        budget -= cost
        kept.append({"role": turn.role, "content": turn.content})
    kept.reverse()
    # Keep the conversation starting with a user turn: some chat templates insist.
    while kept and kept[0]["role"] != "user":
        kept.pop(0)
    return system + kept
