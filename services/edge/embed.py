"""`POST /v1/embed`: validate and check limits, publish on `llm.req.embed.<model>`, answer once."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.params import JSONBody

from contracts import EmbedRequest, EmbedResponse, Error, Event, subjects
from contracts.embed import Dimensions, Embeddings, Vectors
from services.edge.bodies import Timeout
from services.edge.dispatch import Dispatcher, EventFeed
from services.edge.errors import error_response, request_id_of
from services.edge.hangup import ClientGone, unless_client_leaves
from services.runtime.settings import Settings

_decode_event = msgspec.json.Decoder(Event).decode
_encode = msgspec.json.Encoder().encode


class EmbedBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str
    input: str | list[str]
    truncate: bool | None = None
    dimensions: Dimensions | None = None
    timeout: Timeout | None = None


@post("/v1/embed", summary="Embed one text or a list of texts", status_code=200)
async def embed(request: Request[Any, Any, Any], data: JSONBody[EmbedBody]) -> Response[bytes]:
    request_id = request_id_of(request)
    wire = EmbedRequest(
        id=request_id, model=data.model, input=data.input, truncate=data.truncate, dimensions=data.dimensions
    )
    try:
        result = await embed_texts(request, wire, data.timeout)
    except ClientGone:
        return Response(b"", status_code=499)  # nobody is listening any more
    if isinstance(result, Error):
        return error_response(result.code, result.message, request_id, result.retry_after)
    return Response(_encode(result), media_type="application/json", headers={"X-Request-Id": request_id})


async def embed_texts(
    request: Request[Any, Any, Any], wire: EmbedRequest, timeout_s: float | None
) -> EmbedResponse | Error:
    """Checks, publishes and awaits one embed request: the one embed path of every API shape.

    Raises `LlmbusError` for a request refused before it is queued, `ClientGone` if the client
    hangs up first (the request is then cancelled).
    """
    wire.validate()
    settings: Settings = request.app.state.settings
    wire.check_limits(settings.embed_max_inputs, settings.embed_max_input_chars)
    dispatcher: Dispatcher = request.app.state.dispatcher
    feed = await dispatcher.submit(wire, timeout_s, subject=subjects.embed_subject(wire.model))
    return await unless_client_leaves(request, feed, _collect(feed))


async def _collect(feed: EventFeed) -> EmbedResponse | Error:
    vectors: list[list[float]] = []
    async for batch in feed.batches():
        for _, data in batch:
            event = _decode_event(data)
            if isinstance(event, Vectors):
                vectors += event.embeddings
            elif isinstance(event, Embeddings):
                vectors += event.embeddings
                return EmbedResponse(
                    request_id=feed.request_id,
                    model=event.model,
                    embeddings=vectors,
                    usage=event.usage,
                    timings=event.timings,
                )
            elif isinstance(event, Error):
                return event
    raise RuntimeError("event feed ended without a terminal event")  # feeds always end with one
