"""`POST /v1/embed`, and the embeddings dialect every API's embed route builds on.

An embed request is published on `llm.req.embed.<model>` and always answered once: the vectors of
every `vectors` event and the terminal `embeddings` event, in input order.
"""

from __future__ import annotations

import msgspec
from litestar import Response, post
from litestar.params import JSONBody

from contracts import EmbedRequest, EmbedResponse, Error, Event, subjects
from contracts.embed import Dimensions, Embeddings, Vectors
from services.edge.bodies import Timeout
from services.edge.serve import Dialect, Piped, Pipeline, Source, Wire
from services.runtime.settings import Settings

_decode_event = msgspec.json.Decoder(Event).decode


class EmbedBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    input: str | list[str]
    truncate: bool | None = None
    dimensions: Dimensions | None = None
    timeout: Timeout | None = None


class Embedding(Dialect):
    """Never streamed; the operator's limits (`LLMBUS_EMBED_MAX_*`) are checked before submit.
    `answer` is the native `EmbedResponse`; the compat APIs' subclasses render their own."""

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
    pipeline: Pipeline, wire: EmbedRequest, dialect: Embedding, timeout_s: float | None = None
) -> Response[bytes]:
    """Every API's embed route: the pipeline on the request's embed subject (never a stream)."""
    subject = subjects.embed_subject(wire.model)
    return await pipeline.serve(wire, dialect, timeout_s=timeout_s, subject=subject)  # type: ignore[return-value]


@post("/v1/embed", summary="Embed one text or a list of texts", status_code=200)
async def embed(data: JSONBody[EmbedBody], pipeline: Piped) -> Response[bytes]:
    fields = msgspec.structs.asdict(data)
    timeout = fields.pop("timeout")
    wire = EmbedRequest(id=pipeline.request_id, **fields)
    return await embed_with(pipeline, wire, Embedding(pipeline.settings), timeout)
