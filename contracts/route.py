"""Routing and classification on the bus.

A generation request whose `model` is `"auto"` (or `"route:NAME"`) is published to `llm.req.route`
instead of `llm.req.generate.<model>`. The classifier picks a model, publishes a `routed` event on
the request's event subject and republishes the request to `llm.req.generate.<model>`, so the
client sees one stream: `start`, `routed`, `token`..., `done`.

Classification as a product is a NATS request/reply on `llm.classify` (and `POST /v1/classify`):
a `ClassifyRequest` answered by a `ClassifyReply`, or by an `ErrorBody` when it fails.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from contracts.base import EventBase
from contracts.errors import ErrorCode, LlmbusError
from contracts.subjects import MODEL_NAME
from contracts.usage import Usage

ROUTE_SUBJECT = "llm.req.route"
# Not under `llm.req.>`: that prefix is captured by the work-queue stream, a request/reply is not.
CLASSIFY_SUBJECT = "llm.classify"
# KV bucket in which the classifier or the edge (whichever is first) takes ownership of routing
# one request, so a slow classifier and the edge's fallback never both route it.
CLAIMS_BUCKET = "llm_route_claims"

AUTO = "auto"
ROUTE_PREFIX = "route:"
ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")


def is_routed(model: str) -> bool:
    """Whether a request's `model` asks the classifier to choose (`auto` or `route:NAME`)."""
    return model == AUTO or model.startswith(ROUTE_PREFIX)


def route_name(model: str) -> str | None:
    """The route a `route:NAME` model names; None for `auto`. Raises `bad_request` when malformed."""
    if model == AUTO:
        return None
    name = model[len(ROUTE_PREFIX) :]
    if not model.startswith(ROUTE_PREFIX) or not ROUTE_NAME.match(name):
        raise LlmbusError(
            ErrorCode.BAD_REQUEST, f"model must be 'auto' or 'route:NAME' to be routed, got {model[:64]!r}"
        )
    return name


# rule: a route's rules matched; similarity: closest examples; judge: an LLM chose among close
# routes; default: nothing scored above the threshold; named: `route:NAME`; edge_fallback: the
# classifier did not answer in time and the edge used the default route's model.
RouteMethod = Literal["rule", "similarity", "judge", "default", "named", "edge_fallback"]


class Routed(EventBase, tag="routed"):
    """Which model a routed request went to, and why. Always `seq` 1, right after `start`."""

    model: str
    route: str
    score: float  # 1.0 for rules and named routes; the similarity score otherwise
    method: RouteMethod
    why: str
    fallback_from: str | None = None  # the route's preferred model, when it was unavailable


ClassifyMethod = Literal["embedding", "llm"]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class ClassifyRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Score `text` against `labels`: by embedding similarity (default) or an LLM's JSON answer."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=100_000)]
    labels: Annotated[list[Label], msgspec.Meta(min_length=1, max_length=100)]
    multi_label: bool = False  # scores are independent (several labels can apply)
    method: ClassifyMethod = "embedding"
    model: str | None = None  # embedding model or LLM; defaults come from the routes file

    def validate(self) -> None:
        if not self.text.strip():
            raise LlmbusError(ErrorCode.BAD_REQUEST, "`text` must not be blank")
        if len(set(self.labels)) != len(self.labels):
            raise LlmbusError(ErrorCode.BAD_REQUEST, "`labels` must be distinct")
        if self.model is not None and not MODEL_NAME.match(self.model):
            raise LlmbusError(ErrorCode.BAD_REQUEST, f"invalid model name {self.model[:64]!r}")


class LabelScore(msgspec.Struct):
    label: str
    score: float


class ClassifyReply(msgspec.Struct):
    """Every label with its score, best first; `label` is the best one.

    Single-label scores sum to 1. Multi-label scores are independent, each in [0, 1]. `usage`: the
    tokens the model calls cost (labels already embedded cost none), counted against the caller's
    `tokens_per_minute`.
    """

    label: str
    labels: list[LabelScore]
    method: ClassifyMethod
    model: str
    multi_label: bool
    usage: Usage
