"""The demo page at `/`: static HTML, CSS and a small script from `services/edge/static/`."""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.params import FromPath

from contracts import ErrorCode, LlmbusError

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
_ASSETS = {path.name for path in STATIC.iterdir() if path.suffix in _TYPES and path.name != "index.html"}


def _file(name: str) -> Response[bytes]:
    # Read per request: the files are small, and an edited page shows on reload without a restart.
    path = STATIC / name
    return Response(
        path.read_bytes(),
        media_type=f"{_TYPES[path.suffix]}; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
    )


@get("/", include_in_schema=False)
async def page() -> Response[bytes]:
    return _file("index.html")


@get("/static/{name:str}", include_in_schema=False)
async def asset(name: FromPath[str]) -> Response[bytes]:
    if name not in _ASSETS:  # a fixed set of names: no path ever reaches the file system
        raise LlmbusError(ErrorCode.NOT_FOUND, f"no static file {name[:64]!r}")
    return _file(name)
