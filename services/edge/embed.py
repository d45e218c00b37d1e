"""`POST /v1/embed`, and the embeddings dialect every API's embed route builds on.

An embed request is published on `llm.req.embed.<model>` and always answered once: the vectors of
every `vectors` event and the terminal `embeddings` event, in input order.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from contracts import EmbedRequest, EmbedResponse, Error, Event, subjects
from contracts.embed import Dimensions, Embeddings, Vectors
from services.edge.bodies import Timeout
from services.edge.dispatch import Dispatcher
from services.edge.errors import request_id_of
from services.edge.serve import Dialect, Source, Wire, serve
from services.runtime.settings import Settings

_decode_event = msgspec.json.Decoder(Event).decode


class EmbedBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    input: str | list[str]
    truncate: bool | None = None
    dimensions: Dimensions | None = None
    timeout: Timeout | None = None


class Embedding(Dialect):
    """Never streamed; the operator's limits (`LLMBUS_EMBED_MAX_*`) are checked before submit."""

    def __init__(self, settings: Settings) -> None:
        self.max_inputs = settings.embed_max_inputs
        self.max_input_chars = settings.embed_max_input_chars

    def check(self, wire: Wire) -> None:
        assert isinstance(wire, EmbedRequest)
        wire.check_limits(self.max_inputs, self.max_input_chars)

    async def collect(self, source: Source) -> EmbedResponse | Error:
        vectors: list[list[float]] = []
        async for batch in source.batches():
            for _, data in batch:
                event = _decode_event(data)
                if isinstance(event, Vectors):
                    vectors += event.embeddings
                elif isinstance(event, Embeddings):
                    vectors += event.embeddings
                    return EmbedResponse(
                        request_id=source.request_id,
                        model=event.model,
                        embeddings=vectors,
                        usage=event.usage,
                        timings=event.timings,
                    )
                elif isinstance(event, Error):
                    return event
        raise RuntimeError("event feed ended without a terminal event")  # feeds always end with one


async def embed_with(
    request: Request[Any, Any, Any],
    wire: EmbedRequest,
    dialect: Embedding,
    dispatcher: Dispatcher,
    timeout_s: float | None = None,
) -> Response[bytes]:
    """Every API's embed route: `serve` on the request's embed subject."""
    return await serve(  # type: ignore[return-value]  # an embed answer never streams
        request, wire, dialect, dispatcher, timeout_s=timeout_s, subject=subjects.embed_subject(wire.model)
    )


@post("/v1/embed", summary="Embed one text or a list of texts", status_code=200)
async def embed(
    request: Request[Any, Any, Any],
    data: JSONBody[EmbedBody],
    dispatcher: NamedDependency[Dispatcher],
    settings: NamedDependency[Settings],
) -> Response[bytes]:
    wire = EmbedRequest(
        id=request_id_of(request),
        model=data.model,
        input=data.input,
        truncate=data.truncate,
        dimensions=data.dimensions,
    )
    return await embed_with(request, wire, Embedding(settings), dispatcher, data.timeout)
