"""The page while the bundled model keeps an answer waiting: the real local model, a
batch of one sequence, and another room's long answer holding it."""

from __future__ import annotations

import re
from typing import Any

import httpx2
from playwright.async_api import expect

from tests.browser.conftest import screenshot
from tests.browser.test_chat_ui import answers, send
from tests.conftest import Gateway, create_room, scaled
from tests.test_local_provider import STORY, needs_model


@needs_model
async def test_an_answer_waiting_for_the_model_says_where_it_is_in_line(
    open_page: Any, start_gateway: Any
) -> None:
    gateway: Gateway = start_gateway(
        provider="local",
        openai_base_url=None,
        openai_api_key=None,
        default_model=None,
        local_slots=1,  # one answer at a time: the next one waits
    )
    busy = await create_room(gateway, max_tokens=1000)
    room = await create_room(gateway, max_tokens=20)
    page = await open_page(f"/#/rooms/{room['id']}", gateway_=gateway)
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        sent = await http.post(f"/api/rooms/{busy['id']}/messages", json={"content": STORY})
        assert sent.status_code == 202, sent.text

        await send(page, "Hello!")
        badge = answers(page).last.locator(".badge")
        await expect(badge).to_have_text("waiting for the model (1st in line)")
        await screenshot(page, "local-model-waiting")
        await page.reload()  # a newcomer sees it too
        await expect(badge).to_have_text("waiting for the model (1st in line)")

        generation = sent.json()["generation_id"]
        cancel = f"/api/rooms/{busy['id']}/generations/{generation}/cancel"
        assert (await http.post(cancel)).status_code == 202  # the line moves on
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    await expect(answers(page).last.locator(".badge")).to_have_count(0)
    assert (await answers(page).last.locator(".content").text_content() or "").strip()
