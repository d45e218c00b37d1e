"""Seed 004's API (the simple generate API): `POST /api/v1/generate` with `{prompt, stream}`.

The model is the server's (`LLMBUS_DEFAULT_MODEL`, else the default route's), never the request's.
The answer is `{"response": text}`, or SSE `data: {"response": chunk}` lines ending with `data: {}`.
"""

from __future__ import annotations

import msgspec
from litestar import Response, post
from litestar.params import JSONBody

from contracts import Completion, GenerateRequest
from services.edge.defaults import default_model
from services.edge.dialects.common import TextDialect, sse_data
from services.edge.serve import Answer, Piped

_encode = msgspec.json.Encoder().encode


class SimpleBody(msgspec.Struct):
    prompt: str
    stream: bool = False


class Simple(TextDialect):
    def token(self, text: str) -> bytes:
        return sse_data({"response": text})

    def tail(self) -> bytes:
        return b"data: {}\n\n"

    def answer(self, result: Completion, request_id: str) -> Response[bytes]:
        return Response(
            _encode({"response": result.text}),
            media_type="application/json",
            headers={"X-Request-Id": request_id},
        )


@post(
    "/api/v1/generate", summary="Seed 004: generate with the server's model", status_code=200, tags=["simple"]
)
async def generate(data: JSONBody[SimpleBody], pipeline: Piped) -> Answer:
    model = default_model(pipeline.settings)
    wire = GenerateRequest(id=pipeline.request_id, model=model, prompt=data.prompt)
    return await pipeline.serve(wire, Simple(model, streams=data.stream))


ROUTES = [generate]
