"""The web chat UI in a real headless Chromium, against a live server on the generator mock.

Needs Debian's ``chromium`` (``apt-get install chromium``) and Playwright for Python
(``pip install playwright``; the system browser is used, nothing is downloaded). Screenshots go to
``$CHATSTREAM_SCREENSHOT_DIR`` (default ``docs/``).
"""

from __future__ import annotations

import importlib.util
import os
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
        for name, kind in (("webui.js", "javascript"), ("webui.css", "text/css")):
            asset = await client.get(f"/webui-static/{name}")
            assert asset.status_code == 200 and kind in asset.headers["content-type"]


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
