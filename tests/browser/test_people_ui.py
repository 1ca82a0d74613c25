"""People in rooms (issue 14), in chromium: names, members, typing, edits, hiding —
and the smaller fixes of the same issue (empty states, the model shown, the room
list's order and times, the temperature label, the access fieldset, highlighting)."""

from __future__ import annotations

import re
from typing import Any

import httpx2
from playwright.async_api import Page, WebSocketRoute, expect

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.browser.conftest import PageErrors, screenshot
from tests.browser.test_chat_ui import answers, create_room_in_page, send
from tests.conftest import Gateway, create_room, scaled


async def create_named_room(gateway: Gateway, name: str) -> dict[str, Any]:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        response = await http.post("/api/rooms", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()


def user_messages(page: Page) -> Any:
    return page.locator(".message.user")


async def joined(page: Page, members: int) -> None:
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#members")).to_have_text(f"{members} here")


# --------------------------------------------------------------------------- people


async def test_two_people_see_each_other_typing_and_by_name(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream, page_errors: PageErrors
) -> None:
    room = await create_room(gateway)
    alice = await open_page(f"/#/rooms/{room['id']}", name="Alice")
    bob = await open_page(f"/#/rooms/{room['id']}", name="Bob")
    for page in (alice, bob):
        await joined(page, 2)
        await expect(page.locator("#members")).to_have_attribute("title", re.compile("Alice"))
        await expect(page.locator("#members")).to_have_attribute("title", re.compile("Bob"))
    await expect(alice.locator("#rename")).to_have_text("You: Alice ✎")
    await expect(alice.locator("#members")).to_have_attribute("title", re.compile(r"Alice \(you\)"))

    await alice.locator("#input").press_sequentially("Hello every")  # as typed: input events
    await expect(bob.locator("#typing")).to_have_text("Alice is typing…")
    await expect(alice.locator("#typing")).to_have_text("")  # never yourself
    await screenshot(bob, "people-01-typing")

    upstream.script(Scenario(tokens=["Hi", " Alice"]), Scenario(tokens=["Hi", " Bob"]))
    await alice.locator("#input").press_sequentially("one")
    await alice.press("#input", "Enter")
    await expect(bob.locator("#typing")).to_have_text("")  # her message ended it
    await expect(answers(bob).last).to_have_class(re.compile("status-complete"))
    await send(bob, "Hello from Bob")
    await expect(answers(alice)).to_have_count(2)
    await expect(answers(alice).last).to_have_class(re.compile("status-complete"))

    said = {"Alice": "Hello everyone", "Bob": "Hello from Bob"}
    for page, me, other in ((alice, "Alice", "Bob"), (bob, "Bob", "Alice")):
        mine = user_messages(page).filter(has_text=said[me])
        theirs = user_messages(page).filter(has_text=said[other])
        await expect(mine.locator(".author")).to_have_text("You")
        await expect(mine).to_have_class(re.compile(r"\bown\b"))
        await expect(theirs.locator(".author")).to_have_text(other)
        await expect(theirs).not_to_have_class(re.compile(r"\bown\b"))
        await expect(answers(page).locator(".author")).to_have_text(["fake-model", "fake-model"])
    await screenshot(alice, "people-02-names")

    # Bob leaves: Alice sees one member left.
    await bob.close()
    await expect(alice.locator("#members")).to_have_text("1 here")
    assert page_errors == []


async def test_edit_a_message_and_switch_between_its_versions(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    alice = await open_page(f"/#/rooms/{room['id']}", name="Alice")
    bob = await open_page(f"/#/rooms/{room['id']}", name="Bob")
    await joined(alice, 2)
    upstream.script(
        Scenario(tokens=["About", " cats"]),
        Scenario(tokens=[f"dog{i} " for i in range(30)], delay=0.03),
    )
    await send(alice, "Tell me about cats")
    await expect(answers(bob).last.locator(".content")).to_have_text("About cats")

    # Only the author may edit (without API keys nobody owns a room).
    await expect(user_messages(bob).locator("button.edit")).to_have_count(0)
    await user_messages(alice).locator("button.edit").click()
    editor = user_messages(alice).locator(".editor textarea")
    await expect(editor).to_be_focused()
    await expect(editor).to_have_value("Tell me about cats")
    await editor.fill("Tell me about dogs")
    await screenshot(alice, "people-03-editing")
    await user_messages(alice).get_by_role("button", name="Save and answer again").click()

    for page in (alice, bob):  # a new answer streams to both, on the new branch
        await expect(user_messages(page)).to_have_text(re.compile("Tell me about dogs"))
        await expect(answers(page).last).to_have_class(re.compile("status-streaming"))
    for page in (alice, bob):
        await expect(answers(page).last).to_have_class(re.compile("status-complete"))
        await expect(answers(page).last.locator(".content")).to_contain_text("dog29")
        await expect(user_messages(page).locator(".version-count")).to_have_text("2 / 2")
    await screenshot(alice, "people-04-edited")

    await user_messages(bob).get_by_role("button", name="Previous version").click()
    for page in (alice, bob):
        await expect(user_messages(page)).to_have_text(re.compile("Tell me about cats"))
        await expect(user_messages(page).locator(".version-count")).to_have_text("1 / 2")
        await expect(answers(page).last.locator(".content")).to_have_text("About cats")


async def test_cancel_an_edit_and_an_empty_edit_cannot_be_saved(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    await send(page, "Original")
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    await user_messages(page).locator("button.edit").click()
    editor = user_messages(page).locator(".editor textarea")
    await editor.fill("   ")
    save = user_messages(page).get_by_role("button", name="Save and answer again")
    await expect(save).to_be_disabled()
    await editor.press("Escape")
    await expect(user_messages(page).locator(".editor")).to_have_count(0)
    await expect(user_messages(page).locator(".content")).to_have_text("Original")


async def test_first_visit_asks_for_a_name_and_renaming_reaches_the_others(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}", name=None)
    dialog = page.locator("#name-dialog")
    await expect(dialog).to_be_visible()
    await screenshot(page, "people-05-first-visit")
    await page.fill("#name-form input[name=name]", "Zoe")
    await page.click("#name-save")
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#rename")).to_have_text("You: Zoe ✎")
    other = await open_page(f"/#/rooms/{room['id']}", name="Yann")
    await joined(other, 2)
    await expect(other.locator("#members")).to_have_attribute("title", re.compile("Zoe"))

    await page.click("#rename")
    await page.fill("#name-form input[name=name]", "Zoë B")
    await page.click("#name-save")
    await expect(page.locator("#rename")).to_have_text("You: Zoë B ✎")
    await expect(other.locator("#members")).to_have_attribute("title", re.compile("Zoë B"))
    await expect(other.locator("#members")).to_have_text("2 here")  # a rename, not a join
    await send(page, "Renamed")
    await expect(user_messages(other).locator(".author")).to_have_text("Zoë B")

    await page.reload()  # the name and the user id are kept
    await joined(page, 2)
    await expect(page.locator("#rename")).to_have_text("You: Zoë B ✎")
    await expect(user_messages(page).locator(".author")).to_have_text("You")


async def test_hide_and_unhide_a_message(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    # Without API keys there are no owners: anyone may hide.
    room = await create_room(gateway)
    alice = await open_page(f"/#/rooms/{room['id']}", name="Alice")
    bob = await open_page(f"/#/rooms/{room['id']}", name="Bob")
    await joined(bob, 2)
    upstream.script(Scenario(tokens=["Something", " rude"]))
    await send(alice, "Say something")
    await expect(answers(bob).last.locator(".content")).to_have_text("Something rude")

    await answers(bob).last.locator("button.hide").click()
    for page in (alice, bob):
        await expect(answers(page).last.locator(".hidden-note")).to_have_text(
            "Message hidden by the room owner"
        )
        await expect(answers(page).last.locator(".content")).to_have_count(0)
    await answers(bob).last.locator("button.read").click()
    await expect(answers(bob).last.locator(".content.peek")).to_have_text("Something rude")
    await expect(answers(alice).last.locator(".content")).to_have_count(0)  # Bob's view only
    await screenshot(bob, "people-06-hidden")

    unhide = answers(alice).last.get_by_role("button", name="Show this message to everyone again")
    await unhide.click()
    for page in (alice, bob):
        await expect(answers(page).last.locator(".content")).to_have_text("Something rude")


async def test_with_api_keys_only_the_owner_hides_and_edits_the_others(
    open_page: Any, start_gateway: Any, upstream: FakeUpstream
) -> None:
    locked = start_gateway(api_keys=["alice=sk-alice-secret", "bob=sk-bob-secret"])
    alice = await open_page("/", gateway_=locked, name="Alice")
    await alice.fill("#key-form input[name=key]", "sk-alice-secret")
    await alice.click("#key-save")
    await alice.click("#new-room")
    await expect(alice.locator("fieldset.access")).to_be_visible()  # keys: rooms have access
    await alice.click("#room-cancel")
    room_id = await create_room_in_page(alice, "Alice's room")

    bob = await open_page(f"/#/rooms/{room_id}", gateway_=locked, name=None)
    await expect(bob.locator("#name-dialog")).to_be_visible()
    await bob.keyboard.press("Escape")  # no name chosen: the key's name serves
    await bob.fill("#key-form input[name=key]", "sk-bob-secret")
    await bob.click("#key-save")
    await expect(bob.locator("#rename")).to_have_text("You: bob ✎")
    await joined(bob, 2)

    await send(bob, "Bob's words")
    await expect(answers(alice).last).to_have_class(re.compile("status-complete"))
    bobs = user_messages(alice).filter(has_text="Bob's words")
    await expect(bobs.locator("button.edit")).to_have_count(1)  # the owner may edit
    await expect(bobs.locator("button.hide")).to_have_count(1)
    await expect(user_messages(bob).locator("button.edit")).to_have_count(1)  # his own
    await expect(bob.locator("button.hide")).to_have_count(0)  # not the owner


async def test_over_sse_edit_hide_typing_and_rename_work_too(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    alice = await open_page(f"/#/rooms/{room['id']}", name="Alice")

    async def refuse(ws: WebSocketRoute) -> None:
        await ws.close(code=1011, reason="blocked by a proxy")

    bob = await open_page("/", name="Bob")
    await bob.route_web_socket(re.compile(r".*/ws/.*"), refuse)
    await bob.goto(f"/#/rooms/{room['id']}")
    await expect(bob.locator("#status")).to_have_attribute("data-transport", "sse")
    await joined(bob, 2)

    await bob.locator("#input").press_sequentially("Hi")
    await expect(alice.locator("#typing")).to_have_text("Bob is typing…")
    upstream.script(Scenario(tokens=["One"]), Scenario(tokens=["Two"]))
    await bob.press("#input", "Enter")
    await expect(user_messages(alice).locator(".author")).to_have_text("Bob")
    await expect(answers(bob).last.locator(".content")).to_have_text("One")

    await user_messages(bob).locator("button.edit").click()
    await user_messages(bob).locator(".editor textarea").fill("Hi again")
    await user_messages(bob).locator(".editor textarea").press("Enter")
    await expect(answers(alice).last.locator(".content")).to_have_text("Two")
    await expect(user_messages(bob).locator(".version-count")).to_have_text("2 / 2")

    await answers(bob).last.locator("button.hide").click()
    await expect(answers(alice).last.locator(".hidden-note")).to_be_visible()

    await bob.click("#rename")
    await bob.fill("#name-form input[name=name]", "Robert")
    await bob.click("#name-save")
    await expect(alice.locator("#members")).to_have_attribute("title", re.compile("Robert"))
    await expect(alice.locator("#members")).to_have_text("2 here")


# --------------------------------------------------------------------------- smaller fixes


async def test_empty_states_say_what_to_do(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    page = await open_page()
    await expect(page.locator("#empty")).to_be_visible()
    await expect(page.locator("#empty")).to_have_text(re.compile("Create a room, or pick one"))
    await create_room_in_page(page, "Quiet")
    await expect(page.locator("#empty")).to_have_text("No messages yet — say hello.")
    await send(page, "Hello")
    await expect(page.locator("#empty")).to_have_count(0)
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    await page.goto("/#/")
    await expect(page.locator("#empty")).to_have_text(re.compile("Create a room, or pick one"))


async def test_the_model_that_answers_and_the_answer_figures_are_shown(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    await expect(page.locator("#room-persona")).to_contain_text("fake-model")  # the default
    upstream.script(Scenario(tokens=[f"w{i} " for i in range(12)], delay=0.05))
    await send(page, "Hi")
    answer = answers(page).last
    await expect(answer).to_have_class(re.compile("status-complete"))
    await expect(answer.locator(".author")).to_have_text("fake-model")
    await expect(answer.locator(".stats")).to_have_text(re.compile(r"^12 tokens · \d+ tokens/s$"))
    await expect(answer.locator(".temperature-field")).to_contain_text("temperature 0–2")
    assert await answer.locator(".temperature-field").get_attribute("title")

    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        await http.patch(f"/api/rooms/{room['id']}", json={"persona": {"model": "other-model"}})
    await expect(page.locator("#room-persona")).to_contain_text("other-model")
    shown = await answer.locator(".stats").inner_text()
    await page.reload()  # the speed is the gateway's timing, stored: the same after a reload
    await expect(answers(page).last.locator(".stats")).to_have_text(shown)


async def test_rooms_are_listed_by_last_activity_with_their_time(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    older = await create_named_room(gateway, "Older")
    await create_named_room(gateway, "Newer")
    page = await open_page(f"/#/rooms/{older['id']}")
    names = page.locator("#room-list .room-name")
    await expect(names).to_have_text(["Newer", "Older"])
    await expect(page.locator("#room-list .room-time").first).to_have_text("just now")
    await send(page, "Wake up")
    await expect(names).to_have_text(["Older", "Newer"])


async def test_code_is_highlighted_and_still_sanitized(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream, page_errors: PageErrors
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    markdown = (
        "```python\nprint('hi')  # <img src=x onerror=window.pwned=1>\n```\n\n"
        "```html\n<script>window.pwned=2</script>\n```\n\n```\nplain\n```\n"
    )
    upstream.script(Scenario(tokens=[markdown[i : i + 5] for i in range(0, len(markdown), 5)]))
    await send(page, "Code please")
    answer = answers(page).last
    await expect(answer).to_have_class(re.compile("status-complete"))
    python = answer.locator("pre code").nth(0)
    await expect(python).to_have_class(re.compile(r"\bhljs\b"))
    await expect(python.locator(".hljs-string")).to_have_text("'hi'")
    await expect(python.locator(".hljs-comment")).to_contain_text("<img src=x")
    await expect(answer.locator("pre code").nth(1).locator(".hljs-tag").first).to_be_visible()
    await expect(answer.locator("pre code").nth(2)).not_to_have_class(re.compile(r"\bhljs\b"))
    for selector in ["img", "script", "[onerror]"]:
        await expect(answer.locator(selector)).to_have_count(0)
    await page.wait_for_timeout(200)
    assert await page.evaluate("window.pwned") is None
    await screenshot(page, "people-07-highlighted")
    assert page_errors == []


async def test_without_api_keys_the_room_dialog_has_no_access_section(open_page: Any) -> None:
    page = await open_page()
    await page.click("#new-room")
    await expect(page.locator("#room-dialog")).to_be_visible()
    await expect(page.locator("fieldset.access")).to_be_hidden()
