"""`POST /v1/chat` and `POST /v1/generate`: the native dialect of the answer pipeline.

The answer streams as SSE (`"stream": true` or `Accept: text/event-stream`), comes as one JSON
`Completion`, or (`"stream": "deferred"`) is a 202 with the URL to follow it at. An
`Idempotency-Key` becomes the request id: a retry attaches to that request and resumes after its
`Last-Event-ID`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post
from litestar.params import JSONBody

from contracts import Completion, Done, Error, Event, EventHead, Restart, Routed, Token
from contracts.base import check_id
from contracts.messages import Thinking, ToolCallEvent
from contracts.queue import Queued
from contracts.tools import Logprob, ToolCall
from services.edge.admission import request_id_for_key
from services.edge.bodies import ChatBody, GenerateBody
from services.edge.defaults import default_model
from services.edge.dispatch import Dispatcher, EventFeed
from services.edge.errors import set_request_id
from services.edge.requests import deferred, last_event_id, no_more_events
from services.edge.serve import Answer, Dialect, Piped, Pipeline, Source
from services.edge.sse import frame

_decode_event = msgspec.json.Decoder(Event).decode
_encode = msgspec.json.Encoder().encode


@post("/v1/chat", summary="Chat with a model", status_code=200)
async def chat(data: JSONBody[ChatBody], pipeline: Piped) -> Answer:
    return await _generate(pipeline, data)


@post("/v1/generate", summary="Complete a prompt", status_code=200)
async def generate(data: JSONBody[GenerateBody], pipeline: Piped) -> Answer:
    return await _generate(pipeline, data)


class Native(Dialect):
    def __init__(self, model: str, *, streams: bool, detached: bool, dispatcher: Dispatcher) -> None:
        self.model = model
        self.streams = streams
        self.detached = detached
        self.dispatcher = dispatcher

    def at_once(self, source: Source) -> Response[bytes] | None:
        if self.detached:
            assert isinstance(source, EventFeed)  # never cached (services/edge/response_cache.py)
            self.dispatcher.detach(source)  # the client follows it at the events URL, on any edge
            return deferred(source.request_id)
        if self.streams and isinstance(source, EventFeed) and source.nothing_after:
            return no_more_events(source)
        return None

    async def collect(self, source: Source) -> Completion | Error:
        return await collect(source, self.model)

    shows_queue = True

    def queued(self, status: Queued) -> bytes:
        return frame([(EventHead(type="queued", seq=-1), _encode(status))])  # no `id:`: not replayable


async def _generate(pipeline: Pipeline, body: ChatBody | GenerateBody) -> Answer:
    request = pipeline.request
    key = idempotency_key(request)
    if body.model is None:  # left out ("" is refused as any invalid name is)
        body.model = default_model(pipeline.settings)
    wire = body.to_request(key or set_request_id(request))
    detached = body.stream == "deferred"
    streams = not detached and (body.stream is True or pipeline.accepts_events)
    dialect = Native(wire.model, streams=streams, detached=detached, dispatcher=pipeline.dispatcher)
    return await pipeline.serve(
        wire,
        dialect,
        timeout_s=body.timeout,
        idempotent=key is not None,
        detached=detached,
        # A retry resumes a stream after its Last-Event-ID; a JSON answer is always the whole one.
        after=last_event_id(request) if key and streams else -1,
        cache=body.cache,
    )


def idempotency_key(request: Request[Any, Any, Any]) -> str | None:
    """The `Idempotency-Key` header, which becomes the request id: a retry attaches to that request."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    check_id(key, "Idempotency-Key")
    # Namespaced per tenant: another tenant's key never attaches here.
    return set_request_id(request, request_id_for_key(key, request.user))


async def collect(source: Source, model: str) -> Completion | Error:
    """A request's answer as one `Completion` (what came before a `restart` dropped), or its error."""
    parts: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    logprobs: list[Logprob] = []
    routed: Routed | None = None
    async for batch in source.batches():
        for _, data in batch:
            event = _decode_event(data)
            if isinstance(event, Token):
                parts.append(event.text)
                logprobs += event.logprobs or ()
            elif isinstance(event, Thinking):
                thinking.append(event.text)
            elif isinstance(event, ToolCallEvent):
                calls.append(event.call)
            elif isinstance(event, Restart):
                for part in (parts, thinking, calls, logprobs):
                    part.clear()  # a new attempt starts the answer over
            elif isinstance(event, Routed):
                routed = event
            elif isinstance(event, Done):
                return Completion(
                    request_id=source.request_id,
                    model=model if routed is None else routed.model,
                    text="".join(parts),
                    finish_reason=event.finish_reason,
                    usage=event.usage,
                    timings=event.timings,
                    routed=routed,
                    thinking="".join(thinking) or None,
                    tool_calls=calls or None,
                    logprobs=logprobs or None,
                    cached=event.cached,
                )
            elif isinstance(event, Error):
                return event
    raise RuntimeError("event feed ended without a terminal event")  # feeds always end with one
