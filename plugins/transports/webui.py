"""The web chat UI: a page at ``GET /`` that chats through the HTTP API of the ``fastapi`` transport.

The page is plain HTML, JavaScript and CSS from ``static/`` (no build step). It streams answers from
``POST /chat_stream?format=delta`` with the browser's session cookie, and offers stop, regenerate,
clear, like/dislike and the generation parameters. When the ``fastapi`` transport is not among the
configured transports, this one mounts its endpoints too, so ``transports = ["webui"]`` is enough.

Options (``plugin_config.webui``): ``title``, the page title (default ``"chatstream"``).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import Field

from chatstream.app import install_transports
from chatstream.chatstream import ChatStream
from chatstream.hookspecs import hookimpl
from chatstream.options import PluginOptions, parse_options
from chatstream.settings import SettingsError

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PATH = "/webui-static"


class WebUIOptions(PluginOptions):
    """``plugin_config.webui``."""

    title: str = Field("chatstream", min_length=1, pattern=r"\S", description="the page title")


# The page loads only its own files and talks only to its own origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


def render_page(title: str = "chatstream") -> str:
    """The chat page's HTML with ``title`` (escaped) filled in."""
    template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return template.replace("{{title}}", html.escape(title))


def install(app: FastAPI, cs: ChatStream, options: WebUIOptions | dict[str, Any] | None = None) -> None:
    """Serve the chat page at ``/`` and its files under ``/webui-static/``; mount the API if needed."""
    page = render_page(parse_options(WebUIOptions, options, "plugin_config.webui").title)

    async def index() -> HTMLResponse:
        """The web chat page."""
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    app.add_api_route("/", index, methods=["GET"], name="webui", include_in_schema=False)
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="webui-static")

    # The page is useless without the chat API; mount it unless the fastapi transport will.
    has_api = any(getattr(route, "path", None) == "/chat_stream" for route in app.routes)
    if not has_api and "fastapi" not in cs.settings.transports:
        transports = cs.contributions("transports")
        if "fastapi" not in transports:
            raise SettingsError(
                "the webui transport chats through the fastapi transport's /chat_stream, and no plugin "
                "provides a 'fastapi' transport (is chatstream.plugins.transports.fastapi in "
                "block_plugins?): unblock it, or remove webui from the transports setting"
            )
        install_transports(app, cs, ["fastapi"])


@hookimpl(trylast=True)
def register_transports(register: Any) -> None:
    register("webui", install, options=WebUIOptions)
