"""What a person does in the page, in chromium, against the fake upstream."""

from __future__ import annotations

import re
from typing import Any

import httpx2
from playwright.async_api import Page, WebSocketRoute, expect

from gateway.testing.fake_upstream import FakeUpstream, Scenario
from tests.browser.conftest import PageErrors, fill_room, screenshot
from tests.conftest import Gateway, create_room, scaled

ANSWER = [f"word{i} " for i in range(30)]

# Record the text length of the newest answer at every change of the message list.
WATCH_LENGTHS = """() => {
  window.lengths = [];
  const list = document.getElementById("messages");
  new MutationObserver(() => {
    const answers = list.querySelectorAll(".message.assistant .content");
    if (answers.length) window.lengths.push(answers[answers.length - 1].textContent.length);
  }).observe(list, {subtree: true, childList: true, characterData: true});
}"""


async def create_room_in_page(page: Page, name: str, system_prompt: str = "") -> str:
    await page.click("#new-room")
    await page.fill("input[name=name]", name)
    await page.fill("textarea[name=system_prompt]", system_prompt)
    await page.click("#room-save")
    await expect(page.locator("#room-name")).to_have_text(name)
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    match = re.fullmatch(r".*#/rooms/(room_[\w-]+)", page.url)
    assert match, page.url
    return match.group(1)


async def send(page: Page, text: str) -> None:
    await page.fill("#input", text)
    await page.press("#input", "Enter")


def answers(page: Page) -> Any:
    return page.locator(".message.assistant")


async def stored(gateway: Gateway, room_id: str) -> list[dict[str, Any]]:
    async with httpx2.AsyncClient(base_url=gateway.url, timeout=scaled(10)) as http:
        return (await http.get(f"/api/rooms/{room_id}/messages")).json()["messages"]


# --------------------------------------------------------------------------- chatting


async def test_create_a_room_send_and_watch_the_answer_grow(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream, page_errors: PageErrors
) -> None:
    page = await open_page()
    await screenshot(page, "01-empty")
    room_id = await create_room_in_page(page, "Pirates", "Talk like a pirate.")
    await expect(page.locator("#room-list a[aria-current=page] .room-name")).to_have_text("Pirates")
    await expect(page.locator("#room-persona")).to_contain_text("Talk like a pirate.")

    upstream.script(Scenario(tokens=ANSWER, delay=0.05))
    await page.evaluate(WATCH_LENGTHS)
    await send(page, "Hello!")
    await expect(page.locator(".message.user").last).to_contain_text("Hello!")
    await expect(answers(page).last).to_have_class(re.compile("status-streaming"))
    await screenshot(page, "02-streaming")
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    await screenshot(page, "03-answered")

    lengths = await page.evaluate("window.lengths")
    growing = sorted({n for n in lengths if n})
    assert len(growing) >= 5, lengths  # the text grew over many frames, not at once
    text = "".join(ANSWER).strip()
    await expect(answers(page).last.locator(".content")).to_have_text(text)
    messages = await stored(gateway, room_id)
    assert [m["content"] for m in messages] == ["Hello!", "".join(ANSWER)]
    assert page_errors == []


async def test_deep_link_opens_the_room_with_its_history(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway, system_prompt="Be brief.")
    first = await open_page(f"/#/rooms/{room['id']}")
    upstream.script(Scenario(tokens=["Hi", " there"]))
    await send(first, "Hello")
    await expect(answers(first).last).to_have_class(re.compile("status-complete"))

    page = await open_page(f"/#/rooms/{room['id']}")
    await expect(page.locator("#room-name")).to_have_text("test room")
    await expect(answers(page)).to_have_text(re.compile("Hi there"))


async def test_shift_enter_is_a_newline_and_enter_sends(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await page.click("#input")
    await page.keyboard.type("line one")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("line two")
    assert await page.input_value("#input") == "line one\nline two"
    await page.keyboard.press("Enter")
    await expect(page.locator(".message.user")).to_contain_text("line two")
    assert await page.input_value("#input") == ""
    messages = await stored(gateway, room["id"])
    assert messages[0]["content"] == "line one\nline two"


async def test_markdown_is_rendered_with_code_copy_lists_and_tables(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(
        f"/#/rooms/{room['id']}", permissions=["clipboard-read", "clipboard-write"]
    )
    markdown = (
        "Here:\n\n- one\n- **two**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "```python\nprint('hi')\n```\n"
    )
    tokens = [markdown[i : i + 7] for i in range(0, len(markdown), 7)]
    upstream.script(Scenario(tokens=tokens, delay=0.01))
    await send(page, "Show me markdown")
    answer = answers(page).last
    await expect(answer).to_have_class(re.compile("status-complete"))
    await expect(answer.locator("li")).to_have_count(2)
    await expect(answer.locator("strong")).to_have_text("two")
    await expect(answer.locator("table td")).to_have_text(["1", "2"])
    await expect(answer.locator("pre code")).to_have_text("print('hi')\n")
    await answer.locator("pre button.copy").click()
    await expect(answer.locator("pre button.copy")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"
    await screenshot(page, "04-markdown")


async def test_the_view_follows_the_stream_unless_scrolled_up(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}", viewport={"width": 900, "height": 500})
    lines = [f"line {i}\n\n" for i in range(120)]
    upstream.script(Scenario(tokens=lines, delay=0.03))
    await send(page, "Many lines")
    await expect(answers(page).last.locator(".content")).to_contain_text("line 30")
    gap = "el => el.scrollHeight - el.scrollTop - el.clientHeight"
    assert await page.locator("#messages").evaluate(gap) < 80  # following

    await page.locator("#messages").evaluate("el => el.scrollTo(0, 0)")  # reading above
    await expect(answers(page).last.locator(".content")).to_contain_text("line 60")
    assert await page.locator("#messages").evaluate("el => el.scrollTop") == 0

    await page.locator("#messages").evaluate("el => el.scrollTo(0, el.scrollHeight)")
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    assert await page.locator("#messages").evaluate(gap) < 80  # following again


async def test_hostile_markup_is_shown_as_inert_text(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream, page_errors: PageErrors
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    # Tags split across tokens: only the whole text, sanitized, is ever rendered.
    tokens = [
        "<im", 'g src=x one', 'rror="window.pwned=1">',
        " and [click me](javascript:window.pwned=2) ",
        "<scr", "ipt>window.pwned=3</scr", "ipt>",
        ' <a href="javascript:window.pwned=4">x</a>',
        " <svg onload=window.pwned=5>",
        " <iframe src=javascript:window.pwned=6></iframe>",
    ]  # fmt: skip
    upstream.script(Scenario(tokens=tokens, delay=0.02))
    await send(
        page, '<img src=x onerror="window.pwned=7"> **bold** <script>window.pwned=8</script>'
    )
    answer = answers(page).last
    await expect(answer).to_have_class(re.compile("status-complete"))
    await page.wait_for_timeout(300)  # give any injected handler the chance to run

    assert await page.evaluate("window.pwned") is None
    content = page.locator(".message .content")
    for selector in ["img", "script", "svg", "iframe", "[onerror]", "[onload]"]:
        await expect(content.locator(selector)).to_have_count(0)
    for link in await content.locator("a").all():
        href = await link.get_attribute("href")
        assert href is None or not href.lower().startswith("javascript:"), href
    # The markup is there to read, as text.
    await expect(answer.locator(".content")).to_contain_text('<img src=x onerror="window.pwned=1">')
    await expect(answer.locator(".content")).to_contain_text("<script>window.pwned=3</script>")
    await expect(page.locator(".message.user .content")).to_contain_text("<script>")
    await expect(page.locator(".message.user strong")).to_have_text("bold")
    assert not [e for e in page_errors if "Content Security Policy" in e]
    await screenshot(page, "05-hostile-markup")


async def test_page_is_served_with_a_csp_that_forbids_inline_script(
    gateway: Gateway, open_page: Any
) -> None:
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        response = await http.get("/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["cache-control"] == "no-cache"
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        vendored = await http.get("/vendor/marked-18.2.1/marked.esm.js")
    assert vendored.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert vendored.headers["content-type"].startswith("text/javascript")
    page = await open_page()
    assert await page.locator("script:not([src])").count() == 0
    # The CSP is in force: an inline script added now does not run.
    await page.evaluate(
        "() => { const s = document.createElement('script');"
        " s.textContent = 'window.inlineRan = true'; document.body.append(s); }"
    )
    assert await page.evaluate("window.inlineRan") is None


# --------------------------------------------------------------------------- stop, regenerate


async def test_stop_mid_answer_keeps_the_partial_answer_marked_stopped(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    upstream.script(Scenario(count=400, delay=0.03))
    await send(page, "Tell me a long story")
    answer = answers(page).last
    await expect(answer.locator(".content")).to_contain_text("tok5")
    await expect(page.locator("#send")).to_be_hidden()
    await page.click("#stop")
    await expect(answer).to_have_class(re.compile("status-cancelled"))
    await expect(answer.locator(".badge")).to_have_text("stopped")
    await expect(page.locator("#stop")).to_be_hidden()
    await screenshot(page, "06-stopped")

    shown = await answer.locator(".content").inner_text()
    messages = await stored(gateway, room["id"])
    assert messages[-1]["status"] == "cancelled"
    assert messages[-1]["content"].strip() == shown.strip()
    assert 0 < len(messages[-1]["content"].split()) < 400
    assert upstream.requests[-1].disconnected_at is not None  # the upstream really stopped


async def test_regenerate_with_a_temperature_and_switch_versions(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    upstream.script(Scenario(tokens=["First", " version"]), Scenario(tokens=["Second", " version"]))
    await send(page, "Hi")
    answer = answers(page).last
    await expect(answer.locator(".content")).to_have_text("First version")

    await answer.locator("input.temperature").fill("1.3")
    await answer.locator("button.regenerate").click()
    await expect(answers(page).last.locator(".content")).to_have_text("Second version")
    await expect(answers(page).last.locator(".version-count")).to_have_text("2 / 2")
    assert upstream.requests[-1].body["temperature"] == 1.3
    await screenshot(page, "07-regenerated")

    await answers(page).last.get_by_role("button", name="Previous version").click()
    await expect(answers(page).last.locator(".content")).to_have_text("First version")
    await expect(answers(page).last.locator(".version-count")).to_have_text("1 / 2")
    await answers(page).last.get_by_role("button", name="Next version").click()
    await expect(answers(page).last.locator(".content")).to_have_text("Second version")
    assert len(await stored(gateway, room["id"])) == 2


async def test_upstream_failure_is_shown_on_the_answer_with_a_retry(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    upstream.script(Scenario(fault="500"), Scenario(tokens=["Better", " now"]))
    await send(page, "Hi")
    answer = answers(page).last
    await expect(answer).to_have_class(re.compile("status-error"))
    await expect(answer.locator(".error-text")).to_contain_text("upstream_error")
    await screenshot(page, "08-upstream-error")
    await answer.get_by_role("button", name="Retry this answer").click()
    await expect(answers(page).last.locator(".content")).to_have_text("Better now")
    await expect(answers(page).last.locator(".version-count")).to_have_text("2 / 2")


# --------------------------------------------------------------------------- live, resume


async def test_two_pages_in_one_room_see_the_same_stream(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    alice = await open_page(f"/#/rooms/{room['id']}")
    bob = await open_page(f"/#/rooms/{room['id']}")
    await expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
    await bob.evaluate(WATCH_LENGTHS)
    upstream.script(Scenario(tokens=ANSWER, delay=0.04))
    await send(alice, "Hello from Alice")
    await expect(bob.locator(".message.user")).to_contain_text("Hello from Alice")
    await expect(answers(bob).last).to_have_class(re.compile("status-streaming"))
    await expect(answers(bob).last).to_have_class(re.compile("status-complete"))
    text = "".join(ANSWER).strip()
    await expect(answers(alice).last.locator(".content")).to_have_text(text)
    await expect(answers(bob).last.locator(".content")).to_have_text(text)
    assert len({n for n in await bob.evaluate("window.lengths") if n}) >= 5


async def test_reload_mid_answer_picks_up_the_text_so_far_and_the_rest(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(f"/#/rooms/{room['id']}")
    upstream.script(Scenario(count=60, delay=0.03))
    await send(page, "Count")
    await expect(answers(page).last.locator(".content")).to_contain_text("tok10")
    await page.reload()
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    expected = "".join(f"tok{i} " for i in range(60))
    await expect(answers(page).last.locator(".content")).to_have_text(expected.strip())
    assert (await stored(gateway, room["id"]))[-1]["content"] == expected


async def test_a_dropped_websocket_reconnects_and_resumes_without_loss_or_duplicates(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    sockets: list[WebSocketRoute] = []
    urls: list[str] = []

    async def relay(ws: WebSocketRoute) -> None:
        sockets.append(ws)
        urls.append(ws.url)
        ws.connect_to_server()

    page = await open_page("/", viewport={"width": 1100, "height": 760})
    await page.route_web_socket(re.compile(r".*/ws/rooms/.*"), relay)
    await page.goto(f"/#/rooms/{room['id']}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    upstream.script(Scenario(count=80, delay=0.02))
    await send(page, "Count")
    await expect(answers(page).last.locator(".content")).to_contain_text("tok10")

    await sockets[-1].close(code=1012, reason="going away")  # the connection drops
    await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    await screenshot(page, "09-reconnecting")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    assert "last_event_id=" in urls[-1]
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    expected = "".join(f"tok{i} " for i in range(80))
    await expect(answers(page).last.locator(".content")).to_have_text(expected.strip())


async def test_without_websocket_the_page_falls_back_to_sse(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page("/")

    async def refuse(ws: WebSocketRoute) -> None:
        await ws.close(code=1011, reason="blocked by a proxy")

    await page.route_web_socket(re.compile(r".*/ws/.*"), refuse)
    await page.goto(f"/#/rooms/{room['id']}")
    await expect(page.locator("#status")).to_have_attribute("data-transport", "sse")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#status")).to_contain_text("SSE")

    upstream.script(Scenario(tokens=ANSWER, delay=0.03), Scenario(count=300, delay=0.03))
    await page.evaluate(WATCH_LENGTHS)
    await send(page, "Hello over SSE")
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    await expect(answers(page).last.locator(".content")).to_have_text("".join(ANSWER).strip())
    assert len({n for n in await page.evaluate("window.lengths") if n}) >= 5
    await screenshot(page, "10-sse-fallback")

    # Stop and regenerate work the same over plain HTTP.
    await answers(page).last.locator("button.regenerate").click()
    await expect(answers(page).last.locator(".content")).to_contain_text("tok3")
    await page.click("#stop")
    await expect(answers(page).last).to_have_class(re.compile("status-cancelled"))
    await expect(answers(page).last.locator(".version-count")).to_have_text("2 / 2")


# --------------------------------------------------------------------------- rooms, layout


async def test_edit_and_delete_a_room(open_page: Any, gateway: Gateway) -> None:
    page = await open_page()
    room_id = await create_room_in_page(page, "Draft")
    await page.click("#edit-room")
    await page.fill("input[name=name]", "Final")
    await page.fill("input[name=temperature]", "0.3")
    await page.click("#room-save")
    await expect(page.locator("#room-name")).to_have_text("Final")
    await expect(page.locator("#room-list")).to_contain_text("Final")
    async with httpx2.AsyncClient(base_url=gateway.url) as http:
        room = (await http.get(f"/api/rooms/{room_id}")).json()
    assert room["persona"]["temperature"] == 0.3

    page.once("dialog", lambda dialog: dialog.accept())
    await page.click("#delete-room")
    await expect(page.locator("#room-list a")).to_have_count(0)
    await expect(page.locator("#room-name")).to_have_text("No room open")


async def test_phone_screen_and_dark_mode(
    open_page: Any, gateway: Gateway, upstream: FakeUpstream
) -> None:
    room = await create_room(gateway)
    page = await open_page(
        f"/#/rooms/{room['id']}",
        viewport={"width": 390, "height": 780},
        color_scheme="dark",
        is_mobile=True,
        has_touch=True,
    )
    upstream.script(Scenario(tokens=["A **short**", " answer."]))
    await send(page, "Hi")
    await expect(answers(page).last).to_have_class(re.compile("status-complete"))
    await expect(page.locator("#sidebar")).not_to_be_in_viewport()
    await screenshot(page, "11-phone-dark")
    await page.click("#toggle-sidebar")
    await expect(page.locator("#sidebar")).to_be_in_viewport()
    await screenshot(page, "12-phone-rooms")
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(21, 22, 26)"  # the dark palette


async def test_with_api_keys_the_page_asks_for_one_and_then_works(
    open_page: Any, start_gateway: Any, upstream: FakeUpstream, page_errors: PageErrors
) -> None:
    locked = start_gateway(api_keys=["alice=sk-alice-secret"])
    page = await open_page("/", gateway_=locked)
    dialog = page.locator("#key-dialog")
    await expect(dialog).to_be_visible()
    await screenshot(page, "13-api-key")
    await page.fill("#key-form input[name=key]", "sk-alice-secret")
    await page.click("#key-save")
    await expect(dialog).to_be_hidden()
    await create_room_in_page(page, "Locked room")
    upstream.script(Scenario(tokens=["Only", " for", " keys"]))
    await send(page, "Hi")
    await expect(answers(page).last.locator(".content")).to_have_text("Only for keys")
    # The WebSocket carried a short-lived token, never the key itself.
    urls = await page.evaluate("performance.getEntries().map(e => e.name).join(' ')")
    assert "sk-alice-secret" not in urls
    assert [e for e in page_errors if "401" not in e] == []


async def test_a_long_room_shows_its_newest_messages_and_the_earlier_ones_on_request(
    open_page: Any, start_gateway: Any, upstream: FakeUpstream, page_errors: PageErrors
) -> None:
    # ``ready`` carries about 2 KiB of the branch here: the oldest messages are left
    # out of it, and the page offers to load them.
    gateway = start_gateway(ready_max_bytes=2048)
    room = await create_room(gateway)
    questions = [f"question {i}" for i in range(6)]
    await fill_room(gateway, upstream, room["id"], questions, lambda i: [f"answer{i} ", "x" * 300])
    page = await open_page(f"/#/rooms/{room['id']}", gateway_=gateway)
    await expect(page.locator(".message.user").last).to_contain_text("question 5")
    await expect(page.locator(".message.user", has_text="question 0")).to_have_count(0)
    await page.click(".load-earlier")
    await expect(page.locator(".message.user")).to_have_count(6)
    await expect(page.locator(".message.user").first).to_contain_text("question 0")
    await expect(page.locator(".load-earlier")).to_have_count(0)
    await screenshot(page, "earlier-loaded")


async def test_scrolling_up_a_long_room_loads_it_a_page_at_a_time(
    open_page: Any, start_gateway: Any, upstream: FakeUpstream, page_errors: PageErrors
) -> None:
    gateway = start_gateway(page_messages=4)  # 12 messages: 3 pages
    room = await create_room(gateway)
    questions = [f"question {i}" for i in range(6)]
    await fill_room(
        gateway, upstream, room["id"], questions, lambda i: [f"answer{i} ", "line\n" * 8]
    )
    page = await open_page(f"/#/rooms/{room['id']}", gateway_=gateway)
    messages = page.locator("#messages .message")
    await expect(messages).to_have_count(4)
    await expect(messages.first).to_contain_text("question 4")

    for count in (8, 12):
        first_id = await messages.first.get_attribute("data-id")
        shown_first = page.locator(f'#messages [data-id="{first_id}"]')
        await page.locator("#messages").evaluate("list => list.scrollTo(0, 0)")
        await expect(messages).to_have_count(count)
        await expect(shown_first).to_be_in_viewport()  # the reader stays where they were
    await expect(messages.first).to_contain_text("question 0")
    await expect(page.locator(".load-earlier")).to_have_count(0)
    assert page_errors == []
