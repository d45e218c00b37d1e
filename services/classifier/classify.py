"""Classification as a product: score a text against caller-given labels.

`embedding` (the default: one embedding call, labels cached): single-label scores are a softmax of
the cosine similarities (temperature `[classify].temperature`), so they sum to 1; multi-label
scores are the similarities clipped to [0, 1], each on its own. `llm`: the model answers JSON
constrained to the labels; scores are its decisions, 1.0 or 0.0.
"""

from __future__ import annotations

import asyncio
import math

from contracts import ErrorCode, LlmbusError, Usage
from contracts.route import ClassifyReply, ClassifyRequest, LabelScore
from services.classifier import judge
from services.classifier.routes import RouteTable
from services.classifier.similarity import Similarity
from services.runtime.backends import Backend


def softmax(values: list[float], temperature: float) -> list[float]:
    top = max(values)
    weights = [math.exp((v - top) / temperature) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


class Classify:
    def __init__(self, table: RouteTable, similarity: Similarity, backend: Backend) -> None:
        self.table = table
        self.similarity = similarity
        self.backend = backend

    async def __call__(self, request: ClassifyRequest) -> ClassifyReply:
        request.validate()
        routes = self.table.current()
        config = routes.classify
        if request.method == "llm":
            model = request.model or config.llm_model
            scores, usage = await judge.pick_labels(
                self.backend,
                model,
                request.text,
                request.labels,
                multi_label=request.multi_label,
                timeout_s=config.timeout_s,
            )
        else:
            model = request.model or config.embed_model or routes.router.embed_model
            try:
                async with asyncio.timeout(config.timeout_s):
                    sims, tokens = await self.similarity.label_scores(model, request.text, request.labels)
            except TimeoutError:
                raise LlmbusError(ErrorCode.DEADLINE_EXCEEDED, f"{model} did not embed in time") from None
            usage = Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
            if request.multi_label:
                scores = [min(1.0, max(0.0, s)) for s in sims]
            else:
                scores = softmax(sims, config.temperature)
        ranked = sorted(
            (LabelScore(label, round(score, 4)) for label, score in zip(request.labels, scores, strict=True)),
            key=lambda ls: ls.score,
            reverse=True,
        )
        return ClassifyReply(
            label=ranked[0].label,
            labels=ranked,
            method=request.method,
            model=model,
            multi_label=request.multi_label,
            usage=usage,
        )
