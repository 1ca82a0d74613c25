"""The browser UI in a real browser: Debian's chromium driven by Playwright.

Skipped, saying why, when Playwright or chromium is missing (``.ci/run`` installs
both). Screenshots of the main states go to ``test-artifacts/screenshots/`` (or
``$TEST_ARTIFACTS/screenshots``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx2
import pytest

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.conftest import Gateway, scaled

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    async_playwright = None

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
SCREENSHOTS = ARTIFACTS / "screenshots"

# As the machine notes say: without the background-networking flags chromium keeps
# trying to reach Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = None
    if async_playwright is None:
        reason = "Playwright is not installed (pip install -e '.[test]')"
    elif not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        reason = f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    if reason:
        for item in items:
            if "tests/browser/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:  # type: ignore[misc]
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=scaled(30) * 1000
        )
        yield browser
        await browser.close()


class PageErrors(list[str]):
    """Uncaught exceptions and console errors of the pages of a test."""


@pytest.fixture
def page_errors() -> PageErrors:
    return PageErrors()


@pytest.fixture
async def open_page(browser: Browser, gateway: Gateway, page_errors: PageErrors) -> Any:
    """``page = await open_page(path="/", gateway_=None, name="Tester", **context_options)``:
    a new page on the gateway (or ``gateway_``), its errors collected in ``page_errors``.
    Each page is a browser of its own (its own storage, so its own user id), whose
    person already chose the display name ``name`` (``None``: a first visit, which asks
    for one)."""
    contexts = []

    async def open_(
        path: str = "/",
        *,
        gateway_: Gateway | None = None,
        name: str | None = "Tester",
        **options: Any,
    ) -> Page:
        options.setdefault("viewport", {"width": 1100, "height": 760})
        context = await browser.new_context(base_url=(gateway_ or gateway).url, **options)
        context.set_default_timeout(scaled(10) * 1000)
        contexts.append(context)
        if name is not None:  # kept if the page renames itself, across reloads
            await context.add_init_script(  # about:blank has no storage: try
                "try { localStorage.getItem('chat-gateway.name') ?? "
                f"localStorage.setItem('chat-gateway.name', {json.dumps(name)}) }} catch {{}}"
            )
        page = await context.new_page()
        page.on("pageerror", lambda error: page_errors.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: message.type == "error" and page_errors.append(message.text),
        )
        await page.goto(path)
        return page

    yield open_
    for context in contexts:
        await context.close()


async def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=SCREENSHOTS / f"{name}.png")


async def fill_room(
    gateway: Gateway,
    upstream: FakeUpstream,
    room_id: str,
    questions: Sequence[str],
    answer: Callable[[int], list[str]],
) -> None:
    """Post each of ``questions`` over REST and wait for its answer (``answer(i)``: the
    tokens of the i-th)."""
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        for i, question in enumerate(questions):
            upstream.script(Scenario(tokens=answer(i)))
            response = await http.post(
                f"/api/rooms/{room_id}/messages",
                json={"content": question},
                headers={"accept": "text/event-stream"},
            )
            assert "event: done" in response.text
