"""``GET /``: the chat playground, static files shipped inside the package (no build step).

The page talks to the server's own ``/v1/models`` and ``/v1/chat/completions`` and nothing else:
the Content-Security-Policy below lets it load scripts, styles and data from this origin only,
so even a bug in its rendering could not run a script that a model wrote.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response

from stepserve.server.access import open_without_key

STATIC = Path(__file__).parent / "static"
ASSETS = {"playground.js": "text/javascript", "playground.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def add_playground_routes(app: FastAPI) -> None:
    # The page and its assets hold no data and load without --api-key; the page sends the key
    # itself on its API calls (which stay guarded).
    open_without_key(app, "/", "/favicon.ico", *(f"/playground/{name}" for name in ASSETS))

    @app.get("/", include_in_schema=False)
    async def playground() -> Response:
        return FileResponse(STATIC / "playground.html", media_type="text/html", headers=HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)  # no icon, and no 404 in the browser's console

    @app.get("/playground/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:  # a fixed list: no path from the URL reaches the file system
            return Response(status_code=404)
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers=HEADERS)
