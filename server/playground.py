"""The web playground: the static single-page app in ``server/ui/``, served at ``/ui``.

Plain HTML, CSS and JavaScript modules, no build step and nothing fetched from elsewhere
(the Content-Security-Policy below forbids it): the page calls this server's own API with
the key typed into it. With API keys set, ``GET /ui`` and its files stay open
(:func:`server.auth.is_open_http_request`): they hold no data, and every API call of the
page carries the key. ``/`` redirects to ``/ui/``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

UI_DIR = Path(__file__).resolve().parent / "ui"
UI_PREFIX = "/ui"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class PlaygroundFiles(StaticFiles):
    """The page's files with a strict Content-Security-Policy (same origin only) and no caching
    of stale code after an upgrade (``no-cache``: revalidated with the ETag)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"cache-control", b"no-cache"),
                            (b"x-content-type-options", b"nosniff")]
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, with_headers)


def mount_playground(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse(f"{UI_PREFIX}/", status_code=307)

    @app.get(UI_PREFIX, include_in_schema=False)
    async def ui_root() -> RedirectResponse:
        return RedirectResponse(f"{UI_PREFIX}/", status_code=307)

    app.mount(UI_PREFIX, PlaygroundFiles(directory=UI_DIR, html=True), name="playground")
