"""The search box: results with their room, author and highlighted words in place of
the room list; a result opens its room at the message, paging it in from far back."""

from __future__ import annotations

from typing import Any

from playwright.async_api import expect

from gateway.testing.fake_upstream import FakeUpstream
from tests.browser.conftest import PageErrors, fill_room, screenshot
from tests.conftest import create_room


async def test_a_search_result_opens_its_room_at_the_message_found(
    open_page: Any, start_gateway: Any, upstream: FakeUpstream, page_errors: PageErrors
) -> None:
    gateway = start_gateway(page_messages=4)  # the found message is pages back
    room = await create_room(gateway)
    other = await create_room(gateway)
    questions = ["Where do <b>turnips</b> grow?", *(f"question {i}" for i in range(6))]
    await fill_room(gateway, upstream, room["id"], questions, lambda i: ["answer ", "line\n" * 6])

    page = await open_page(f"/#/rooms/{other['id']}", gateway_=gateway)
    await page.fill("#search-input", "turnips")
    await page.press("#search-input", "Enter")
    result = page.locator("#search-results a")
    await expect(result).to_have_count(1)
    await expect(page.locator("#room-list")).to_be_hidden()
    await expect(result.locator("mark")).to_have_text("turnips")
    await expect(result).to_contain_text("Where do <b>turnips</b> grow?")  # text, not markup
    await screenshot(page, "search-results")

    await result.click()
    found = page.locator(".message.found")
    await expect(found).to_contain_text("Where do <b>turnips</b> grow?")
    await expect(found).to_be_in_viewport()
    assert page.url.endswith(
        f"#/rooms/{room['id']}/messages/{await found.get_attribute('data-id')}"
    )

    await page.fill("#search-input", "")
    await page.press("#search-input", "Escape")
    await expect(page.locator("#room-list")).to_be_visible()
    await page.fill("#search-input", "parsnips")
    await page.press("#search-input", "Enter")
    await expect(page.locator("#search-results")).to_contain_text("No messages found.")
    assert page_errors == []
