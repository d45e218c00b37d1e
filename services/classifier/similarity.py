"""Embedding similarity: a text against each route's examples (or each label), by cosine.

Embeddings come from the backend's `embed()`; those of examples and labels are cached as unit
vectors (keyed by model and text, so a routes reload embeds only what changed), stacked into one
matrix per set of texts, so scoring a request is one matrix-vector product. The request's text is
embedded once per request, in the same backend call as any example not cached yet. A route's
score is the mean of its `top_k` best example similarities (semantic-router's aggregation): one
stray example cannot win a route, and a route with many examples is not favoured.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import numpy.typing as npt

from contracts import ErrorCode, LlmbusError
from services.classifier.routes import Route, RoutesFile
from services.runtime.backends import EmbedResult

# (model, texts) -> one vector per text, in order, and the tokens the call cost
EmbedFn = Callable[[str, list[str]], Awaitable[EmbedResult]]
Matrix = npt.NDArray[np.float32]


def unit_rows(vectors: Sequence[Sequence[float]]) -> Matrix:
    matrix = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    unit: Matrix = matrix / norms
    return unit


class Similarity:
    def __init__(self, embed: EmbedFn, max_cached: int = 100_000) -> None:
        self._embed = embed
        self._rows: dict[tuple[str, str], Matrix] = {}  # (model, text) -> unit vector
        self._stacks: dict[tuple[str, tuple[str, ...]], Matrix] = {}  # (model, texts) -> their rows
        self._max_cached = max_cached

    async def vectors(
        self, model: str, cached: Sequence[str], fresh: Sequence[str] = ()
    ) -> tuple[Matrix, Matrix, int]:
        """Unit vectors of `cached` (kept) and of `fresh` (never kept), from one backend call at most,
        and the tokens that call cost (0 when every text was cached)."""
        key = (model, tuple(cached))
        stack = self._stacks.get(key)
        if stack is None and len(self._rows) > self._max_cached:
            self._rows.clear()  # labels from callers are unbounded; routes re-warm on next use
            self._stacks.clear()
        missing = (
            [] if stack is not None else [t for t in dict.fromkeys(cached) if (model, t) not in self._rows]
        )
        asked = [*missing, *fresh]
        result = await self._embed(model, asked) if asked else EmbedResult(vectors=[], prompt_tokens=0)
        got = result.vectors
        if len(got) != len(asked):
            raise LlmbusError(ErrorCode.BACKEND_ERROR, f"{len(got)} embeddings for {len(asked)} texts")
        rows = unit_rows(got) if got else np.empty((0, 0), dtype=np.float32)
        if stack is None:
            known = {t: rows[i] for i, t in enumerate(missing)}
            for text, row in known.items():
                self._rows[(model, text)] = row
            stack = (
                np.stack([known[t] if t in known else self._rows[(model, t)] for t in cached])
                if cached
                else rows[:0]
            )
            if len(self._stacks) > 64:
                self._stacks.clear()
            self._stacks[key] = stack
        return stack, rows[len(missing) :], result.prompt_tokens

    async def warm(self, routes: RoutesFile) -> None:
        await self.vectors(routes.router.embed_model, _examples(routes))

    async def route_scores(self, routes: RoutesFile, text: str) -> list[tuple[Route, float]]:
        """Every route with examples and its score, best first."""
        router = routes.router
        examples, query, _ = await self.vectors(
            router.embed_model, _examples(routes), [text[-router.max_chars :]]
        )
        sims = examples @ query[0]
        scored: list[tuple[Route, float]] = []
        at = 0
        for route in routes.route:
            if route.examples:
                mine = np.sort(sims[at : at + len(route.examples)])[::-1][: router.top_k]
                at += len(route.examples)
                scored.append((route, float(mine.mean())))
        scored.sort(key=lambda pair: pair[1], reverse=True)
        return scored

    async def label_scores(self, model: str, text: str, labels: list[str]) -> tuple[list[float], int]:
        """Cosine similarity of `text` to each label, in label order, and the tokens it cost."""
        vectors, query, tokens = await self.vectors(model, labels, [text])
        return [float(s) for s in vectors @ query[0]], tokens


def _examples(routes: RoutesFile) -> list[str]:
    return [e for r in routes.route for e in r.examples]
