"""The routing decision: cheapest method first, then the model the chosen route can use now.

1. `route:NAME` names the route.
2. Rules (keywords, length, code, images, JSON format): the first route whose rule matches.
3. Embedding similarity to each route's examples; when the best two are within `judge_margin`
   and a `judge_model` is set, an LLM picks among the close ones (constrained JSON).
4. Below the route's threshold: the default route.

Then availability: the route's model, else its first available fallback, else the default route's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from contracts import ErrorCode, GenerateRequest, LlmbusError
from contracts.models import canonical_model
from contracts.route import RouteMethod, route_name
from services.classifier import judge
from services.classifier.inventory import Inventory
from services.classifier.routes import Route, RoutesFile, RouteTable
from services.classifier.rules import Rules, features
from services.classifier.similarity import Similarity
from services.runtime.backends import Backend

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    route: Route
    model: str
    score: float
    method: RouteMethod
    why: str
    fallback_from: str | None = None


class Router:
    def __init__(
        self, table: RouteTable, similarity: Similarity, inventory: Inventory, backend: Backend
    ) -> None:
        self.table = table
        self.similarity = similarity
        self.inventory = inventory
        self.backend = backend  # for the judge
        self._rules: tuple[int, Rules] | None = None

    def rules(self, routes: RoutesFile) -> Rules:
        if self._rules is None or self._rules[0] != self.table.version:
            self._rules = (self.table.version, Rules(routes))
        return self._rules[1]

    async def decide(self, request: GenerateRequest) -> Decision:
        routes = self.table.current()
        route, score, method, why = await self._choose(routes, request)
        return await self._with_available_model(routes, route, score, method, why)

    async def _choose(
        self, routes: RoutesFile, request: GenerateRequest
    ) -> tuple[Route, float, RouteMethod, str]:
        name = route_name(request.model)
        if name is not None:
            named = routes.by_name(name)
            if named is None:
                known = ", ".join(r.name for r in routes.route)
                raise LlmbusError(ErrorCode.BAD_REQUEST, f"unknown route {name!r}; routes: {known}")
            return named, 1.0, "named", f"the request named route {name!r}"
        f = features(request)
        hit = self.rules(routes).match(f)
        if hit is not None:
            return hit[0], 1.0, "rule", hit[1]
        try:
            async with asyncio.timeout(routes.router.embed_timeout_s):
                scored = await self.similarity.route_scores(routes, f.text)
        except (LlmbusError, TimeoutError) as exc:
            reason = exc.message if isinstance(exc, LlmbusError) else "it took too long"
            log.warning("similarity routing unavailable, default route: %s", reason)
            return routes.default, 0.0, "default", f"no embedding of the prompt: {reason}"
        if not scored:
            return routes.default, 0.0, "default", "no route has examples"
        best, score = scored[0]
        threshold = routes.threshold(best)
        if score < threshold:
            why = f"best route {best.name!r} scored {score:.3f}, below its threshold {threshold:.2f}"
            return routes.default, round(score, 4), "default", why
        margin = routes.router.judge_margin
        close = [r for r, s in scored if score - s <= margin and s >= routes.threshold(r)]
        judge_model = routes.router.judge_model
        runner_up = f" (next: {scored[1][0].name} {scored[1][1]:.3f})" if len(scored) > 1 else ""
        if judge_model and len(close) > 1:
            ordered = [r for r in routes.route if r in close]  # file order: position carries no score
            try:
                picked = await judge.pick_route(
                    self.backend, judge_model, f.text, ordered, timeout_s=routes.router.judge_timeout_s
                )
            except LlmbusError as exc:
                log.warning("route judge failed, keeping the closest route: %s", exc.message)
                why = f"closest examples: {best.name} {score:.3f}{runner_up}; judge failed: {exc.message}"
                return best, round(score, 4), "similarity", why
            picked_score = next(s for r, s in scored if r is picked)
            names = ", ".join(f"{r.name} {s:.3f}" for r, s in scored if r in close)
            return picked, round(picked_score, 4), "judge", f"{judge_model} chose among close routes: {names}"
        return best, round(score, 4), "similarity", f"closest examples: {best.name} {score:.3f}{runner_up}"

    async def _with_available_model(
        self, routes: RoutesFile, route: Route, score: float, method: RouteMethod, why: str
    ) -> Decision:
        model, note = available_model(routes, route, await self.inventory.available())
        if model == route.model:
            return Decision(route, model, score, method, why)
        return Decision(route, model, score, method, why + note, fallback_from=route.model)


def available_model(routes: RoutesFile, route: Route, available: frozenset[str] | None) -> tuple[str, str]:
    """The model `route` can use now: its own, else its first available fallback, else the default
    route's (model, then fallbacks); with a note saying why when it is not the route's own.
    `available` None: unknown, nothing is filtered. The edge's routing fallback walks the same way."""
    tried = [route] if route is routes.default else [route, routes.default]
    for candidate in tried:
        for model in (candidate.model, *candidate.fallbacks):
            if available is None or canonical_model(model) in available:
                if model == route.model:
                    return model, ""
                if candidate is not route:
                    return model, f"; no model of route {route.name!r} is available, used the default route's"
                return model, f"; {route.model} is not available"
    wanted = ", ".join(m for c in tried for m in (c.model, *c.fallbacks))
    raise LlmbusError(ErrorCode.MODEL_NOT_FOUND, f"none of the route's models is available: {wanted}")
