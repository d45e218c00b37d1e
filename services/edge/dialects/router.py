"""Seed 001's API (the routing backend): `POST /complete` with `{"message"}`, routed by the classifier.

The answer is SSE, one `data:` line per chunk in the seed's shape `{"message", "timestamp",
"user_id", "model"}` where `model` is the model the router chose (never `auto`); an error after the
stream began is one more line with `"error"` and `"code"` set.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import post
from litestar.params import JSONBody

from contracts import Error, GenerateRequest, Message
from services.edge.dialects.common import TextDialect, sse_data
from services.edge.serve import Answer, Piped


class CompleteBody(msgspec.Struct):
    message: str
    user_id: str | None = None  # the seed took it from its auth; here: the tenant, unless given


class Complete(TextDialect):
    def __init__(self, user_id: str) -> None:
        super().__init__("auto", streams=True)
        self.user_id = user_id

    def _line(self, message: str, **more: Any) -> bytes:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return sse_data(
            {"message": message, "timestamp": now, "user_id": self.user_id, "model": self.model} | more
        )

    def token(self, text: str) -> bytes:
        return self._line(text)

    def failed(self, event: Error) -> bytes:
        return self._line("", error=event.message, code=event.code)


@post("/complete", summary="Seed 001: routed completion (SSE)", status_code=200, tags=["router"])
async def complete(data: JSONBody[CompleteBody], pipeline: Piped) -> Answer:
    tenant = pipeline.request.user
    user_id = data.user_id or getattr(tenant, "name", None) or "anonymous"
    wire = GenerateRequest(
        id=pipeline.request_id, model="auto", messages=[Message(role="user", content=data.message)]
    )
    return await pipeline.serve(wire, Complete(user_id))


ROUTES = [complete]
