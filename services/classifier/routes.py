"""The routes file (`infra/routes.toml`): routes are data, reloaded without a restart.

`RouteTable.current()` stats the file on every call (about a microsecond) and reloads it when its
modification time, size or inode changed, so a saved edit applies to the next request. A file that
does not parse or validate is logged and ignored: the previous routes stay in force.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Literal

import msgspec

from contracts import ErrorCode, LlmbusError
from contracts.route import ROUTE_NAME
from contracts.subjects import MODEL_NAME

log = logging.getLogger(__name__)


class Rule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Matches when every condition it sets holds (a route's rules are alternatives)."""

    keywords: list[str] = msgspec.field(default_factory=list)  # any of them, whole words, any case
    code: bool | None = None  # the prompt contains code (a fenced block or code-like lines)
    images: bool | None = None  # a message carries images
    format: bool | None = None  # the request asks for JSON output (`format`)
    min_chars: int | None = None  # prompt length (every message's content), in characters
    max_chars: int | None = None


class Route(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    model: str
    fallbacks: list[str] = msgspec.field(default_factory=list)  # in order, when `model` is unavailable
    description: str = ""  # shown to the LLM judge
    examples: list[str] = msgspec.field(default_factory=list)  # utterances for similarity
    rules: list[Rule] = msgspec.field(default_factory=list)
    threshold: float | None = None  # overrides [router].threshold for this route
    cache: Literal["", "off", "exact", "semantic"] = ""  # `route:NAME` requests' cache (docs/cache.md)


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    default: str  # the route taken when no route scores above its threshold
    threshold: float = 0.5  # minimum similarity score (cosine, mean of the top_k examples)
    top_k: int = 3
    embed_model: str = "nomic-embed-text"
    max_chars: int = 2000  # only the end of a longer prompt is embedded
    embed_timeout_s: float = 5.0  # no embedding in time: the default route (routing never fails a request)
    judge_model: str | None = None  # set to ask an LLM when the best two routes are this close:
    judge_margin: float = 0.05
    judge_timeout_s: float = 10.0


class ClassifyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    embed_model: str | None = None  # default: [router].embed_model
    llm_model: str = "llama3.2:1b"  # for `"method": "llm"`
    temperature: float = 0.05  # softmax temperature of single-label embedding scores
    timeout_s: float = 30.0


class RoutesFile(msgspec.Struct, forbid_unknown_fields=True):
    router: RouterConfig
    route: list[Route]
    classify: ClassifyConfig = msgspec.field(default_factory=ClassifyConfig)

    def by_name(self, name: str) -> Route | None:
        return next((r for r in self.route if r.name == name), None)

    @property
    def default(self) -> Route:
        route = self.by_name(self.router.default)
        assert route is not None  # checked by `parse`
        return route

    def threshold(self, route: Route) -> float:
        return self.router.threshold if route.threshold is None else route.threshold


class RoutesError(Exception):
    """The routes file is missing, malformed or inconsistent."""


def parse(text: str, source: str = "routes") -> RoutesFile:
    try:
        routes = msgspec.convert(tomllib.loads(text), RoutesFile)
    except (tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise RoutesError(f"{source}: {exc}") from None
    problems: list[str] = []
    names = [r.name for r in routes.route]
    problems += [f"duplicate route {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"invalid route name {n!r} (use [a-z0-9_-])" for n in names if not ROUTE_NAME.match(n)]
    if routes.by_name(routes.router.default) is None:
        problems.append(f"[router].default names no route: {routes.router.default!r}")
    models = [routes.router.embed_model, routes.classify.llm_model]
    models += [m for m in (routes.router.judge_model, routes.classify.embed_model) if m]
    for route in routes.route:
        models += [route.model, *route.fallbacks]
        if not route.examples and not route.rules and route.name != routes.router.default:
            problems.append(f"route {route.name!r} has neither examples nor rules: it can never match")
        if any(rule == Rule() for rule in route.rules):
            problems.append(f"route {route.name!r} has an empty rule")
    problems += [f"invalid model name {m!r}" for m in models if not MODEL_NAME.match(m)]
    if routes.router.top_k < 1:
        problems.append("[router].top_k must be at least 1")
    if problems:
        raise RoutesError(f"{source}: " + "; ".join(problems))
    return routes


def load(path: str | Path) -> RoutesFile:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RoutesError(f"cannot read the routes file: {exc}") from None
    return parse(text, str(path))


def resolve(path: str | Path) -> Path:
    """A relative path from the working directory, else from the source tree (`pip install -e .`)."""
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    in_tree = Path(__file__).resolve().parents[2] / given
    return in_tree if in_tree.exists() else given


class RouteTable:
    """The routes currently in force, reloaded when the file changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve(path)
        self._stamp: tuple[int, int, int] | None = None
        self._routes: RoutesFile | None = None
        self.version = 0  # bumped on every successful reload

    def current(self) -> RoutesFile:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp != self._stamp or self._routes is None:
            self._stamp = stamp
            try:
                self._routes = load(self.path)
                self.version += 1
                names = ", ".join(r.name for r in self._routes.route)
                log.info("routes loaded from %s: %s", self.path, names)
            except RoutesError as exc:
                if self._routes is None:
                    raise LlmbusError(ErrorCode.INTERNAL, f"no usable routes: {exc}") from None
                log.error("%s; keeping the routes loaded before", exc)
        return self._routes
