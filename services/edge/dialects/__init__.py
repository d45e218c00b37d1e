"""The seeds' HTTP APIs, each an opt-in dialect of the answer pipeline mounted at its own paths.

`LLMBUS_DIALECTS=badges,router,...` turns them on (none by default). Each module here has a
`ROUTES` list; `mounted` checks the names and that no two dialects claim one method and path,
and refuses to start otherwise, naming both (docs/migration.md).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from litestar.handlers import HTTPRouteHandler

NAMES = ("badges", "router", "queued", "shared", "simple")  # modules of this package


class DialectConflict(ValueError):
    """An unknown dialect, or two that claim the same route: the edge does not start."""


def claims(handler: Any) -> list[tuple[str, str]]:
    assert isinstance(handler, HTTPRouteHandler)
    methods = sorted(handler.http_methods)
    return [(method, path) for path in sorted(handler.paths) for method in methods]


def mounted(names: list[str]) -> list[Any]:
    """The route handlers of the dialects named (`LLMBUS_DIALECTS`)."""
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        raise DialectConflict(f"LLMBUS_DIALECTS: unknown dialect {unknown[0]!r}; known: {', '.join(NAMES)}")
    owner: dict[tuple[str, str], str] = {}
    handlers: list[Any] = []
    for name in dict.fromkeys(names):
        routes = import_module(f"{__name__}.{name}").ROUTES
        for handler in routes:
            for claim in claims(handler):
                other = owner.setdefault(claim, name)
                if other != name:
                    raise DialectConflict(
                        f"LLMBUS_DIALECTS: dialects {other!r} and {name!r} both claim {claim[0]} {claim[1]}; "
                        "enable one of them per edge (or run two edges)"
                    )
        handlers.extend(routes)
    return handlers
