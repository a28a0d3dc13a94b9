"""The web chat UI in a real headless Chromium, against a live server on the generator mock.

Needs Debian's ``chromium`` (``apt-get install chromium``) and Playwright for Python
(``pip install playwright``; the system browser is used, nothing is downloaded). Screenshots go to
``$CHATSTREAM_SCREENSHOT_DIR`` (default ``docs/``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatstream.app import create_app
from chatstream.hookspecs import hookimpl
from chatstream.plugin_manager import BUILTIN_PLUGINS
from chatstream.plugins.transports import webui
from chatstream.settings import Settings
from chatstream.testing import isolated_plugins

HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
if HAS_PLAYWRIGHT:  # without it the browser tests skip and the others still run
    from playwright.sync_api import expect, sync_playwright

CHROMIUM = os.environ.get("CHATSTREAM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT_DIR = Path(
    os.environ.get("CHATSTREAM_SCREENSHOT_DIR") or Path(__file__).resolve().parents[1] / "docs"
)
VIEWPORT = {"width": 760, "height": 640}

BUSY = "The server is busy right now"
DOWN = "Cannot reach the server"

FIRST = "Streaming answers arrive word by word so you can read them while the model is still writing."
SECOND = "This is another answer, produced when you asked to regenerate the previous one."
THIRD = "A second round keeps the whole conversation visible above the message box."

CODE = 'def greet(name):\n    return f"Hello, {name}!"\n\nprint(greet("world"))'
MARKDOWN = (
    "## Greeting a user\n\n"
    "The function takes **one** argument and returns a string:\n\n"
    "- `name` is who to greet\n"
    "- the result is *not* printed\n\n"
    f"```python\n{CODE}\n```\n\n"
    "See [the tutorial](https://docs.python.org/3/tutorial/) for more."
)
HOSTILE = (
    "Here is what you asked for.\n\n"
    "<script>window.__pwned = 1</script>\n\n"
    'An image: <img src=x onerror="window.__pwned = 1"> and a link: '
    "[click me](javascript:window.__pwned=1)\n\n"
    '<iframe src="javascript:window.__pwned = 1"></iframe>\n\n'
    '<a href="https://example.com/" target="_top" onclick="window.__pwned = 1">raw link</a>'
)
LONG_LINE = "x = [" + ", ".join(str(n) for n in range(80)) + "]"
VENDOR_DIR = webui.STATIC_DIR / "vendor"


class FeedbackRecorder:
    """A plugin that keeps the feedback the server received."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    @hookimpl
    def on_feedback(self, chatstream: Any, feedback: dict[str, Any]) -> None:
        self.received.append(feedback)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not HAS_PLAYWRIGHT:
        pytest.skip("the browser tests need Playwright: pip install playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: install it with apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT, locale="ja-JP")
    yield context.new_page()
    context.close()


@pytest.fixture
def webui_app(mock_chatstream: Callable[..., Any]) -> Callable[..., Any]:
    """Factory: an app serving the web UI and the chat API on the generator mock."""

    def make(*extra: Any, **options: Any) -> Any:
        # Until the web UI is a built-in plugin, register it here.
        plugins = extra if webui.__name__ in BUILTIN_PLUGINS else (webui, *extra)
        cs = mock_chatstream(
            plugins=isolated_plugins(*plugins),
            settings=Settings(transports=["fastapi", "webui"]),
            **options,
        )
        return create_app(chatstream=cs)

    return make


async def test_page_is_served_with_its_files_and_a_strict_content_policy(
    webui_app: Callable[..., Any], chatstream_client: Any
) -> None:
    app = webui_app()
    async with chatstream_client(app) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<title>chatstream</title>" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assets = (
            ("webui.js", "javascript"),
            ("webui.css", "text/css"),
            ("vendor/marked.umd.js", "javascript"),
            ("vendor/purify.min.js", "javascript"),
        )
        for name, kind in assets:
            if kind == "javascript":  # the page loads each script from the app itself
                assert f'<script src="webui-static/{name}" defer></script>' in page.text
            asset = await client.get(f"/webui-static/{name}")
            assert asset.status_code == 200 and kind in asset.headers["content-type"]
            assert asset.content == (webui.STATIC_DIR / name).read_bytes()


def test_vendored_libraries_come_with_their_licenses_and_documented_versions() -> None:
    readme = (VENDOR_DIR / "README.md").read_text(encoding="utf-8")
    marked = re.search(r"marked v(\d+\.\d+\.\d+)", (VENDOR_DIR / "marked.umd.js").read_text(encoding="utf-8"))
    purify = re.search(
        r"DOMPurify (\d+\.\d+\.\d+)", (VENDOR_DIR / "purify.min.js").read_text(encoding="utf-8")
    )
    assert marked and purify
    assert f"| {marked[1]} |" in readme and f"marked-{marked[1]}.tgz" in readme
    assert f"| {purify[1]} |" in readme and f"dompurify-{purify[1]}.tgz" in readme
    assert "Permission is hereby granted, free of charge" in (VENDOR_DIR / "marked.LICENSE").read_text(
        encoding="utf-8"
    )
    assert "Apache License" in (VENDOR_DIR / "dompurify.LICENSE").read_text(encoding="utf-8")
    assert "Mozilla Public License" in (VENDOR_DIR / "dompurify.LICENSE-MPL").read_text(encoding="utf-8")


async def test_title_option_is_escaped_and_webui_alone_brings_the_chat_api(
    mock_chatstream: Callable[..., Any], chatstream_client: Any
) -> None:
    plugins = () if webui.__name__ in BUILTIN_PLUGINS else (webui,)
    settings = Settings(transports=["webui"], plugin_config={"webui": {"title": "Ask <Bot>"}})
    cs = mock_chatstream(plugins=isolated_plugins(*plugins), settings=settings)
    async with chatstream_client(create_app(chatstream=cs)) as client:
        assert "<title>Ask &lt;Bot&gt;</title>" in (await client.get("/")).text
        answer = await client.post("/chat_stream?format=delta", json={"user_input": "Hi"})
        assert answer.status_code == 200 and answer.headers["x-message-id"] and answer.text


def test_unknown_or_empty_options_are_rejected_by_name(mock_chatstream: Callable[..., Any]) -> None:
    from fastapi import FastAPI

    cs = mock_chatstream()
    with pytest.raises(
        ValueError, match=r"'plugin_config\.webui\.colour': unknown option; known options: title"
    ):
        webui.install(FastAPI(), cs, {"colour": "blue"})
    with pytest.raises(ValueError, match=r"'plugin_config\.webui\.title': .* \(got ''\)"):
        webui.install(FastAPI(), cs, {"title": ""})


def screenshot(page: Any, name: str) -> None:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / name))


def send(page: Any, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def wait_streaming(page: Any, min_chars: int = 1) -> None:
    """Wait until the last answer shows some text while it is still streaming."""
    page.wait_for_function(
        """(min) => {
            const answers = document.querySelectorAll('.message.assistant');
            const last = answers[answers.length - 1];
            return last && last.getAttribute('aria-busy') === 'true'
                && last.querySelector('.text').textContent.length >= min;
        }""",
        arg=min_chars,
    )


def api(page: Any, method: str, path: str, body: Any = None) -> Any:
    """Call the chat API from the page (same cookie as the UI); returns status and JSON body."""
    return page.evaluate(
        """async ([method, path, body]) => {
            const init = {method, headers: {'Content-Type': 'application/json'}};
            if (body !== null) init.body = JSON.stringify(body);
            const response = await fetch(path, init);
            return {status: response.status, body: await response.json()};
        }""",
        [method, path, body],
    )


def test_chat_streams_and_keeps_rounds_regenerates_rates_and_clears(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    feedback = FeedbackRecorder()
    app = webui_app(
        feedback,
        mock_params={"type": "round", "texts": [FIRST, SECOND, THIRD], "time_per_token_sec": 0.03},
    )
    with live_server(app) as url:
        page.goto(url)
        expect(page.get_by_text("Send a message to start")).to_be_visible()
        send(page, "How do answers arrive?")
        answers = page.locator(".message.assistant .text")

        # Part of the answer is on screen while the rest is still coming, and Stop is offered.
        wait_streaming(page, 5)
        partial = answers.last.text_content()
        assert FIRST.startswith(partial) and len(partial) < len(FIRST)
        expect(page.get_by_role("button", name="Stop")).to_be_visible()
        expect(answers.last).to_have_text(FIRST)
        expect(page.get_by_role("button", name="Send")).to_be_visible()
        expect(page.get_by_text("Send a message to start")).to_be_hidden()

        page.get_by_role("button", name="Good answer").click()
        expect(page.get_by_role("button", name="Good answer")).to_have_attribute("aria-pressed", "true")
        assert [(f["type"], f["message"]) for f in feedback.received] == [("like", FIRST)]

        page.get_by_role("button", name="Regenerate").click()
        expect(answers.last).to_have_text(SECOND)
        expect(page.locator(".message")).to_have_count(2)
        expect(page.get_by_role("button", name="Good answer")).to_have_attribute("aria-pressed", "false")
        page.get_by_role("button", name="Bad answer").click()
        expect(page.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "true")
        assert (feedback.received[-1]["type"], feedback.received[-1]["message"]) == ("dislike", SECOND)

        send(page, "And a second round?")
        expect(answers.last).to_have_text(THIRD)
        expect(page.locator(".message .text")).to_have_text(
            ["How do answers arrive?", SECOND, "And a second round?", THIRD]
        )
        screenshot(page, "webui-chat.png")

        page.get_by_role("button", name="Clear chat").click()
        expect(page.locator(".message")).to_have_count(0)
        expect(page.get_by_role("button", name="Regenerate")).to_be_disabled()
        # The server forgot the conversation too: there is nothing left to regenerate.
        result = api(page, "POST", "chat_stream?format=delta", {"regenerate": True})
        assert (result["status"], result["body"]["error"]) == (409, "nothing_to_regenerate")


def test_generation_settings_show_and_change_the_session_params(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    with live_server(webui_app(temperature=0.7, top_k=40)) as url:
        page.goto(url)
        page.get_by_role("button", name="Settings").click()
        expect(page.get_by_label("Temperature")).to_have_value("0.7")
        expect(page.get_by_label("Top-k")).to_have_value("40")
        page.get_by_label("Temperature").fill("0.25")
        page.get_by_label("Max new tokens").fill("12")
        page.get_by_label("Repetition penalty").fill("1.1")
        page.get_by_role("button", name="Apply").click()
        expect(page.locator("#params-status")).to_have_text("Saved.")
        params = api(page, "GET", "get_generation_params")["body"]
        assert (params["temperature"], params["max_new_tokens"], params["repetition_penalty"]) == (
            0.25,
            12,
            1.1,
        )
        page.get_by_label("Top-k").fill("2.5")
        page.get_by_role("button", name="Apply").click()
        expect(page.locator("#params-status")).to_contain_text("top_k")


def test_japanese_ime_enter_confirms_conversion_and_text_round_trips(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    with live_server(webui_app(mock_params={"type": "echo"})) as url:
        page.goto(url)
        box = page.get_by_label("Message")
        box.fill("")
        box.focus()
        cdp = page.context.new_cdp_session(page)
        cdp.send("Input.imeSetComposition", {"text": "にほんご", "selectionStart": 4, "selectionEnd": 4})
        # The Enter that confirms the conversion reaches the page with isComposing set.
        cdp.send(
            "Input.dispatchKeyEvent",
            {"type": "rawKeyDown", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13},
        )
        cdp.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Enter", "code": "Enter"})
        cdp.send("Input.insertText", {"text": "日本語"})
        page.wait_for_timeout(200)
        expect(page.locator(".message")).to_have_count(0)
        expect(box).to_have_value("日本語")

        box.press("End")
        page.keyboard.insert_text("で話しましょう。🍣")
        box.press("Enter")
        expect(page.locator(".message .text")).to_have_text(["日本語で話しましょう。🍣"] * 2)


def test_stop_ends_the_answer_and_frees_the_slot(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    app = webui_app(
        mock_params={"type": "long", "time_per_token_sec": 0.02},
        num_of_concurrent_executions=1,
        max_queue_size=0,
    )
    with live_server(app) as url:
        page.goto(url)
        send(page, "Tell me a long story")
        wait_streaming(page, 30)
        page.get_by_role("button", name="Stop").click()
        answer = page.locator(".message.assistant")
        expect(answer).to_have_class("message assistant stopped")
        stopped_at = answer.locator(".text").text_content()
        page.wait_for_timeout(400)
        assert answer.locator(".text").text_content() == stopped_at
        expect(page.get_by_role("button", name="Send")).to_be_visible()

        # With one slot and no queue, a new message is answered only if the stop freed the slot.
        deadline = time.monotonic() + 5
        while api(page, "GET", "get_load")["body"]["processing"] and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        send(page, "Once more")
        wait_streaming(page, 10)
        expect(page.locator("#notice")).to_be_hidden()
        page.get_by_role("button", name="Stop").click()


@pytest.mark.parametrize("http_error", [True, False], ids=["429", "200-json"])
def test_busy_server_gets_a_clear_message_and_the_text_back(
    browser: Any, page: Any, live_server: Any, webui_app: Callable[..., Any], http_error: bool
) -> None:
    app = webui_app(
        mock_params={"type": "long", "time_per_token_sec": 0.05},
        num_of_concurrent_executions=1,
        max_queue_size=0,
        too_many_request_as_http_error=http_error,
    )
    other = browser.new_context()
    try:
        with live_server(app) as url:
            other_page = other.new_page()
            other_page.goto(url)
            send(other_page, "Keep the only slot busy")
            wait_streaming(other_page)

            page.goto(url)
            send(page, "Is anyone there?")
            expect(page.get_by_role("alert")).to_contain_text(BUSY)
            expect(page.locator(".message")).to_have_count(0)
            expect(page.get_by_label("Message")).to_have_value("Is anyone there?")
            if http_error:
                screenshot(page, "webui-busy.png")
            other_page.get_by_role("button", name="Stop").click()
    finally:
        other.close()


def test_server_down_gets_a_clear_message(page: Any, live_server: Any, webui_app: Callable[..., Any]) -> None:
    with live_server(webui_app()) as url:
        page.goto(url)
    send(page, "Hello?")
    expect(page.get_by_role("alert")).to_contain_text(DOWN)
    expect(page.locator(".message")).to_have_count(0)
    expect(page.get_by_label("Message")).to_have_value("Hello?")


def wait_answered(page: Any) -> None:
    """Wait until the last answer has finished streaming."""
    page.wait_for_function(
        """() => {
            const answers = document.querySelectorAll('.message.assistant');
            const last = answers[answers.length - 1];
            return last && !last.hasAttribute('aria-busy') && last.querySelector('.text').textContent;
        }"""
    )


def test_markdown_answer_renders_as_markup_while_streaming_and_its_code_copies(
    browser: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    context = browser.new_context(viewport=VIEWPORT, permissions=["clipboard-read", "clipboard-write"])
    page = context.new_page()
    app = webui_app(mock_params={"type": "round", "texts": [MARKDOWN], "time_per_token_sec": 0.03})
    try:
        with live_server(app) as url:
            page.goto(url)
            send(page, "How do I greet someone in Python?")
            answer = page.locator(".message.assistant .text")
            # The start of the answer is already markup while the code is still on its way.
            page.wait_for_function(
                """() => {
                    const answer = document.querySelector('.message.assistant');
                    return answer.getAttribute('aria-busy') === 'true'
                        && answer.querySelector('.text strong') && !answer.querySelector('.text pre');
                }"""
            )
            expect(answer.get_by_role("heading", name="Greeting a user")).to_be_visible()
            wait_answered(page)

            expect(answer.locator("strong")).to_have_text("one")
            expect(answer.locator("em")).to_have_text("not")
            expect(answer.locator("li")).to_have_text(["name is who to greet", "the result is not printed"])
            expect(answer.locator("li code")).to_have_text("name")
            assert answer.locator("pre code").text_content() == CODE + "\n"
            expect(answer.locator(".code-block")).to_contain_text("python")
            for marker in ("**", "```", "## ", "- `"):
                assert marker not in answer.text_content()
            link = answer.get_by_role("link", name="the tutorial")
            expect(link).to_have_attribute("href", "https://docs.python.org/3/tutorial/")
            expect(link).to_have_attribute("target", "_blank")
            expect(link).to_have_attribute("rel", "noopener noreferrer")

            # The Copy button is a real button: it is reached from the message box with Shift+Tab.
            copy = answer.locator(".code-block button")
            expect(copy).to_have_accessible_name("Copy code")
            page.get_by_label("Message").focus()
            for _ in range(6):
                page.keyboard.press("Shift+Tab")
                if copy.evaluate("(button) => button === document.activeElement"):
                    break
            expect(copy).to_be_focused()
            page.keyboard.press("Enter")
            expect(copy).to_have_text("Copied")
            expect(copy).to_have_accessible_name("Copied code")
            assert page.evaluate("navigator.clipboard.readText()") == CODE
            screenshot(page, "webui-markdown.png")
            expect(copy).to_have_text("Copy", timeout=5000)
    finally:
        context.close()


def test_html_in_an_answer_runs_nothing_and_is_shown_as_text(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    with live_server(webui_app(mock_params={"type": "round", "texts": [HOSTILE]})) as url:
        page.goto(url)
        send(page, "Show me some HTML")
        wait_answered(page)
        answer = page.locator(".message.assistant .text")
        # The tags are there to read, as text: none became an element.
        expect(answer).to_contain_text("<script>window.__pwned = 1</script>")
        expect(answer).to_contain_text('<img src=x onerror="window.__pwned = 1">')
        expect(answer).to_contain_text("<iframe")
        assert answer.locator("script, iframe, img, [onerror], [onclick], [style]").count() == 0
        # The markdown link to javascript: is left without its target, so clicking does nothing.
        link = answer.locator("a", has_text="click me")
        expect(link).to_have_count(1)
        assert link.get_attribute("href") is None
        link.click()
        page.wait_for_timeout(200)
        assert page.evaluate("window.__pwned") is None
        assert page.evaluate("document.querySelectorAll('#messages script, #messages iframe').length") == 0
        # No error at all, so nothing was blocked by the Content-Security-Policy as a last resort.
        assert [line for line in console if line.startswith(("error", "pageerror"))] == []
        screenshot(page, "webui-markdown-html.png")


def test_user_messages_show_markdown_and_html_as_typed(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    typed = 'Is **this** bold?\n  <b>and this</b> `code` <img src=x onerror="window.__pwned = 1">'
    with live_server(webui_app(mock_params={"type": "echo"})) as url:
        page.goto(url)
        box = page.get_by_label("Message")
        box.fill(typed)
        box.press("Enter")
        wait_answered(page)
        question = page.locator(".message.user .text")
        assert question.text_content() == typed
        assert question.evaluate("(text) => text.children.length") == 0
        expect(question).to_have_css("white-space", "pre-wrap")
        # The same text as an answer is markdown: the difference is what the user sees.
        expect(page.locator(".message.assistant .text strong")).to_have_text("this")
        assert page.evaluate("window.__pwned") is None


def test_code_scrolls_sideways_on_a_phone_instead_of_widening_the_page(
    browser: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    columns = [f"column{n}" for n in range(1, 13)]
    table = f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}\n| {' | '.join(['1'] * len(columns))} |"
    text = f"A wide table:\n\n{table}\n\nand a long line:\n\n```python\n{LONG_LINE}\n```"
    try:
        with live_server(webui_app(mock_params={"type": "round", "texts": [text]})) as url:
            page.goto(url)
            send(page, "A long line, please")
            wait_answered(page)
            sizes = page.evaluate(
                """() => {
                    const pre = document.querySelector('.message.assistant pre');
                    const root = document.scrollingElement;
                    return {page: root.scrollWidth, viewport: root.clientWidth,
                            pre: pre.scrollWidth, preBox: pre.clientWidth};
                }"""
            )
            assert sizes["page"] <= sizes["viewport"], sizes
            assert sizes["pre"] > sizes["preBox"], sizes
            expect(page.get_by_role("button", name="Copy code")).to_be_in_viewport()
            screenshot(page, "webui-markdown-phone.png")
    finally:
        context.close()


def test_without_the_vendored_libraries_answers_still_show_as_plain_text(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    page.route("**/vendor/**", lambda route: route.abort())
    with live_server(webui_app(mock_params={"type": "round", "texts": [HOSTILE]})) as url:
        page.goto(url)
        send(page, "Anything")
        wait_answered(page)
        answer = page.locator(".message.assistant .text")
        assert answer.text_content() == HOSTILE
        assert answer.evaluate("(text) => text.children.length") == 0
        assert page.evaluate("window.__pwned") is None


# -- conversations in the sidebar ------------------------------------------------------------------
EMPTY = "Send a message to start the conversation."
APPLES = "Apples grow on trees in the orchard"
PEARS = "Pears ripen best off the branch"


def sidebar(page: Any) -> Any:
    return page.get_by_role("navigation", name="Conversations")


def conversation_button(page: Any, title: str) -> Any:
    """The button that opens the conversation named `title`."""
    return sidebar(page).get_by_role("button", name=title, exact=True)


def conversation_row(page: Any, title: str) -> Any:
    return sidebar(page).locator("li").filter(has_text=title)


def chat_round(page: Any, text: str, answers: int, shown: str | None = None) -> None:
    """Send `text` on the echo mock and wait until the `answers`-th answer, the echo, is complete
    (`shown`: how the echo reads once rendered as markdown, when not as typed)."""
    send(page, text)
    expect(page.locator(".message.assistant")).to_have_count(answers)
    wait_answered(page)
    expect(page.locator(".message.assistant .text").last).to_have_text(shown or text)


def conversation_ids(page: Any) -> dict[str, str]:
    """Title -> id of the session's conversations, as the server lists them."""
    listed = api(page, "GET", "conversations")["body"]["conversations"]
    return {c["title"]: c["id"] for c in listed}


def stored_texts(page: Any, conversation_id: str) -> list[str | None]:
    conversation = api(page, "GET", f"conversations/{conversation_id}")
    assert conversation["status"] == 200, conversation
    return [m["message"] for m in conversation["body"]["messages"]]


def two_conversations(page: Any) -> None:
    """APPLES in one conversation, then PEARS in a second, started with New chat."""
    chat_round(page, APPLES, 1)
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".message")).to_have_count(0)
    expect(page.get_by_text(EMPTY)).to_be_visible()
    expect(page.get_by_label("Message")).to_be_focused()
    chat_round(page, PEARS, 1)
    expect(sidebar(page).locator(".conversation-open")).to_have_text([PEARS, APPLES])


def test_reload_shows_the_conversation_the_server_kept(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    first = "Is **this** kept as typed?"
    second = "And a <b>second</b> question"
    with live_server(webui_app(mock_params={"type": "echo"})) as url:
        page.goto(url)
        expect(page.get_by_text(EMPTY)).to_be_visible()
        expect(sidebar(page).locator("li")).to_have_count(0)
        chat_round(page, first, 1, "Is this kept as typed?")
        # The first message made the conversation: it is listed, named by that message, and current.
        expect(conversation_button(page, first)).to_have_attribute("aria-current", "true")
        chat_round(page, second, 2)

        page.reload()
        texts = page.locator(".message .text")
        expect(texts).to_have_text([first, "Is this kept as typed?", second, "And a <b>second</b> question"])
        expect(page.locator(".message.user .who")).to_have_text(["You", "You"])
        expect(page.locator(".message.assistant .who")).to_have_text(["Assistant", "Assistant"])
        expect(page.get_by_text(EMPTY)).to_be_hidden()
        # The answer is rendered markdown again; what the user typed is still plain text.
        expect(page.locator(".message.assistant .text strong")).to_have_text("this")
        assert page.locator(".message.user .text").first.evaluate("(text) => text.children.length") == 0
        assert page.locator(".message .text b").count() == 0
        expect(conversation_button(page, first)).to_have_attribute("aria-current", "true")

        # The restored conversation is the one the next message continues.
        chat_round(page, "A third one", 3)
        page.reload()
        expect(page.locator(".message.user .text")).to_have_text([first, second, "A third one"])
        expect(sidebar(page).locator("li")).to_have_count(1)


def test_opening_another_conversation_shows_its_history_and_continues_it(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    with live_server(webui_app(mock_params={"type": "echo"})) as url:
        page.goto(url)
        two_conversations(page)
        expect(conversation_button(page, PEARS)).to_have_attribute("aria-current", "true")
        expect(conversation_button(page, APPLES)).not_to_have_attribute("aria-current", "true")

        conversation_button(page, APPLES).click()
        expect(page.locator(".message .text")).to_have_text([APPLES, APPLES])
        expect(page.locator(".message .text", has_text=PEARS)).to_have_count(0)
        expect(conversation_button(page, APPLES)).to_have_attribute("aria-current", "true")
        expect(conversation_button(page, PEARS)).not_to_have_attribute("aria-current", "true")
        expect(page.get_by_label("Message")).to_be_focused()

        more = "Which apples keep through winter"
        chat_round(page, more, 2)
        ids = conversation_ids(page)
        assert stored_texts(page, ids[APPLES]) == [APPLES, APPLES, more, more]
        assert stored_texts(page, ids[PEARS]) == [PEARS, PEARS]
        # The conversation just answered moves to the top of the list.
        expect(sidebar(page).locator(".conversation-open")).to_have_text([APPLES, PEARS])
        screenshot(page, "webui-conversations.png")

        conversation_button(page, PEARS).click()
        expect(page.locator(".message .text")).to_have_text([PEARS, PEARS])
        page.reload()
        expect(page.locator(".message .text")).to_have_text([PEARS, PEARS])
        expect(conversation_button(page, PEARS)).to_have_attribute("aria-current", "true")


def test_conversations_cannot_change_while_an_answer_streams(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    app = webui_app(mock_params={"type": "long", "time_per_token_sec": 0.03})
    with live_server(app) as url:
        page.goto(url)
        api(page, "POST", "conversations", {"title": "Earlier notes"})
        api(page, "POST", "conversations", {"title": "Today"})
        page.reload()
        expect(conversation_button(page, "Today")).to_have_attribute("aria-current", "true")
        send(page, "Tell me a long story")
        wait_streaming(page, 20)
        expect(page.get_by_role("button", name="New chat")).to_be_disabled()
        expect(conversation_button(page, "Earlier notes")).to_be_disabled()
        expect(conversation_row(page, "Earlier notes").get_by_role("button", name="Delete")).to_be_disabled()
        page.get_by_role("button", name="Stop").click()
        expect(conversation_button(page, "Earlier notes")).to_be_enabled()
        expect(page.get_by_role("button", name="New chat")).to_be_enabled()

        # Just after Stop the server may still count the answer as running: the page asks again.
        opens: list[str] = []

        def busy_once(route: Any) -> None:
            opens.append(route.request.url)
            if len(opens) == 1:
                route.fulfill(status=409, json={"error": "session_busy", "message": "busy"})
            else:
                route.continue_()

        page.route("**/conversations/*/open", busy_once)
        conversation_button(page, "Earlier notes").click()
        expect(conversation_button(page, "Earlier notes")).to_have_attribute("aria-current", "true")
        expect(page.locator(".message")).to_have_count(0)
        expect(page.locator("#notice")).to_be_hidden()
        assert len(opens) == 2


def test_rename_and_delete_from_the_sidebar(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    with live_server(webui_app(mock_params={"type": "echo"})) as url:
        page.goto(url)
        two_conversations(page)
        ids = conversation_ids(page)

        # Rename: Enter saves, the list and the server agree.
        conversation_row(page, APPLES).get_by_role("button", name="Rename").click()
        title = sidebar(page).get_by_role("textbox", name="Conversation title")
        expect(title).to_be_focused()
        expect(title).to_have_value(APPLES)
        title.fill("Orchard notes")
        title.press("Enter")
        # A renamed conversation moves to the top, as the server orders them.
        expect(sidebar(page).locator(".conversation-open")).to_have_text(["Orchard notes", PEARS])
        assert conversation_ids(page)["Orchard notes"] == ids[APPLES]
        rename = conversation_row(page, "Orchard notes").get_by_role("button", name="Rename")
        expect(rename).to_be_focused()

        # Escape cancels; an empty title is refused with a reason, and nothing changes.
        rename.click()
        title.fill("Not this one")
        title.press("Escape")
        expect(title).to_have_count(0)
        expect(sidebar(page).locator(".conversation-open")).to_have_text(["Orchard notes", PEARS])
        expect(rename).to_be_focused()
        rename.click()
        title.fill("   ")
        title.press("Enter")
        expect(sidebar(page).get_by_text("A title needs at least one visible character.")).to_be_visible()
        expect(title).to_have_attribute("aria-invalid", "true")
        title.press("Escape")
        assert set(conversation_ids(page)) == {PEARS, "Orchard notes"}

        # Delete asks first: Cancel keeps the conversation.
        conversation_row(page, PEARS).get_by_role("button", name="Delete").click()
        expect(sidebar(page).get_by_text(f"Delete “{PEARS}”?")).to_be_visible()
        sidebar(page).get_by_role("button", name="Cancel").click()
        expect(sidebar(page).locator(".conversation-open")).to_have_text(["Orchard notes", PEARS])

        # Deleting the conversation on screen leaves an empty chat; the next message starts anew.
        conversation_row(page, PEARS).get_by_role("button", name="Delete").click()
        sidebar(page).get_by_role("button", name="Delete", exact=True).click()
        expect(sidebar(page).locator(".conversation-open")).to_have_text(["Orchard notes"])
        expect(page.locator(".message")).to_have_count(0)
        expect(page.get_by_text(EMPTY)).to_be_visible()
        expect(conversation_button(page, "Orchard notes")).not_to_have_attribute("aria-current", "true")
        expect(conversation_button(page, "Orchard notes")).to_be_focused()
        assert api(page, "GET", f"conversations/{ids[PEARS]}")["status"] == 404
        assert set(conversation_ids(page)) == {"Orchard notes"}

        fresh = "A fresh start"
        chat_round(page, fresh, 1)
        expect(page.locator(".message .text")).to_have_text([fresh, fresh])
        expect(sidebar(page).locator(".conversation-open")).to_have_text([fresh, "Orchard notes"])
        expect(conversation_button(page, fresh)).to_have_attribute("aria-current", "true")
        assert stored_texts(page, conversation_ids(page)["Orchard notes"]) == [APPLES, APPLES]


def test_the_sidebar_works_from_the_keyboard(
    page: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    with live_server(webui_app(mock_params={"type": "echo"})) as url:
        page.goto(url)
        two_conversations(page)
        focused = page.locator(":focus")

        # Tab from the top bar reaches New chat, then the conversations; the focus ring shows.
        page.get_by_role("button", name="Clear chat").focus()
        page.keyboard.press("Tab")
        expect(page.get_by_role("button", name="New chat")).to_be_focused()
        page.keyboard.press("Tab")
        expect(conversation_button(page, PEARS)).to_be_focused()
        expect(focused).to_have_css("outline-style", "solid")
        page.keyboard.press("ArrowDown")
        expect(conversation_button(page, APPLES)).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator(".message .text")).to_have_text([APPLES, APPLES])
        expect(page.get_by_label("Message")).to_be_focused()

        # Rename with Tab and Enter, type, Enter.
        conversation_button(page, APPLES).focus()
        page.keyboard.press("Tab")
        expect(focused).to_have_accessible_name(f"Rename “{APPLES}”")
        page.keyboard.press("Enter")
        expect(page.get_by_role("textbox", name="Conversation title")).to_be_focused()
        page.keyboard.type("Typed title")  # the old title was selected: typing replaces it
        page.keyboard.press("Enter")
        expect(sidebar(page).locator(".conversation-open")).to_have_text(["Typed title", PEARS])
        expect(focused).to_have_accessible_name("Rename “Typed title”")

        # Delete: Tab, Enter; the harmless Cancel has the focus; Shift+Tab, Enter confirms.
        page.keyboard.press("Tab")
        expect(focused).to_have_accessible_name("Delete “Typed title”")
        page.keyboard.press("Enter")
        expect(page.get_by_role("button", name="Cancel")).to_be_focused()
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Enter")
        expect(sidebar(page).locator(".conversation-open")).to_have_text([PEARS])
        expect(page.locator(".message")).to_have_count(0)
        expect(conversation_button(page, PEARS)).to_be_focused()  # the focus stays in the list

        # New chat from the keyboard puts the focus in the message box.
        page.keyboard.press("Shift+Tab")
        expect(page.get_by_role("button", name="New chat")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.get_by_label("Message")).to_be_focused()
        expect(sidebar(page).locator(".conversation-open")).to_have_text(["Untitled", PEARS])


def test_on_a_phone_the_sidebar_folds_behind_its_toggle(
    browser: Any, live_server: Any, webui_app: Callable[..., Any]
) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        with live_server(webui_app(mock_params={"type": "echo"})) as url:
            page.goto(url)
            two_conversations_on_a_phone(page)
            toggle = page.get_by_role("button", name="Conversations")
            expect(toggle).to_have_attribute("aria-expanded", "false")
            expect(toggle).to_have_attribute("aria-controls", "sidebar")
            expect(sidebar(page)).to_be_hidden()
            width = page.evaluate("() => document.scrollingElement.clientWidth")
            composer = page.locator("#composer").bounding_box()
            assert composer["width"] >= width - 40, (composer, width)  # the chat has the screen's width
            assert page.evaluate("() => document.scrollingElement.scrollWidth") <= width

            toggle.click()
            expect(toggle).to_have_attribute("aria-expanded", "true")
            expect(sidebar(page)).to_be_visible()
            expect(conversation_button(page, PEARS)).to_be_focused()
            assert page.locator("#composer").bounding_box()["width"] == composer["width"]
            screenshot(page, "webui-conversations-phone.png")

            # Choosing a conversation opens it and folds the sidebar away again.
            conversation_button(page, APPLES).click()
            expect(page.locator(".message .text")).to_have_text([APPLES, APPLES])
            expect(sidebar(page)).to_be_hidden()
            expect(toggle).to_have_attribute("aria-expanded", "false")

            # Escape closes it too and gives the focus back to the toggle.
            toggle.click()
            expect(sidebar(page)).to_be_visible()
            page.keyboard.press("Escape")
            expect(sidebar(page)).to_be_hidden()
            expect(toggle).to_be_focused()
    finally:
        context.close()


def two_conversations_on_a_phone(page: Any) -> None:
    """APPLES, then PEARS in a new chat started from the folded sidebar."""
    chat_round(page, APPLES, 1)
    page.get_by_role("button", name="Conversations").click()
    page.get_by_role("button", name="New chat").click()
    expect(sidebar(page)).to_be_hidden()
    expect(page.locator(".message")).to_have_count(0)
    chat_round(page, PEARS, 1)
