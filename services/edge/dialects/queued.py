"""Seed 002's API (the queued streaming API): one long-lived SSE stream per client, jobs submitted to it.

The client opens `GET /api/v1/chat/stream/{client_id}` first, then `POST /api/v1/chat/submit` with
`{prompt, context, client_id}`, as often as it likes. Each submit is an ordinary llmbus request
(admission, the queue, the server's default model) published at once; the client's stream relays
the jobs' tokens one job after another in submit order (FIFO), `data: {"token": ...}` lines, each
job ending with `data: {"done": true, "request_id": ...}` (or `{"error", "code"}`). When the client
disconnects, its running and waiting jobs are cancelled. The clients are this edge's: the stream
and its submits must reach the same edge replica (the seed kept them in one process too).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath, JSONBody
from litestar.response import Stream

from contracts import Done, Error, ErrorCode, GenerateRequest, LlmbusError
from services.edge.defaults import default_model
from services.edge.dialects.common import TextDialect, sse_data
from services.edge.serve import SSE_HEADERS, Answer, Piped, Source

KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream

_encode = msgspec.json.Encoder().encode


class SubmitBody(msgspec.Struct):
    prompt: str
    client_id: str
    context: str = ""


class Client:
    """One connected client: its jobs in submit order."""

    def __init__(self) -> None:
        self.jobs: asyncio.Queue[Source] = asyncio.Queue()
        self.current: Source | None = None

    def close(self) -> None:
        """The client left: cancel its running job and every waiting one."""
        if self.current is not None:
            self.current.close()
        while not self.jobs.empty():
            self.jobs.get_nowait().close()


def _clients(request: Request[Any, Any, Any]) -> dict[str, Client]:
    state = request.app.state
    if not hasattr(state, "queued_clients"):
        state.queued_clients = {}
    clients: dict[str, Client] = state.queued_clients
    return clients


class Job(TextDialect):
    def token(self, text: str) -> bytes:
        return sse_data({"token": text})

    def done(self, event: Done) -> bytes:
        return sse_data({"done": True, "request_id": self.request_id})

    def failed(self, event: Error) -> bytes:
        return sse_data({"error": event.message, "code": event.code, "request_id": self.request_id})

    request_id = ""


class Enqueue(TextDialect):
    """The submit: the request is published by the pipeline, then handed to the client's stream."""

    def __init__(self, model: str, client: Client) -> None:
        super().__init__(model, streams=True)
        self.client = client

    def at_once(self, source: Source) -> Response[bytes]:
        self.client.jobs.put_nowait(source)
        body = {"status": "queued", "request_id": source.request_id, "position": self.client.jobs.qsize()}
        return Response(
            _encode(body), media_type="application/json", headers={"X-Request-Id": source.request_id}
        )


@post(
    "/api/v1/chat/submit",
    summary="Seed 002: submit a job to a client's stream",
    status_code=200,
    tags=["queued"],
)
async def submit(data: JSONBody[SubmitBody], pipeline: Piped) -> Answer:
    client = _clients(pipeline.request).get(data.client_id)
    if client is None:
        raise LlmbusError(
            ErrorCode.NOT_FOUND,
            f"client {data.client_id[:64]!r} is not connected: "
            "open GET /api/v1/chat/stream/{client_id} first",
        )
    model = default_model(pipeline.settings)
    prompt = f"Context: {data.context}\n\nQuestion: {data.prompt}" if data.context else data.prompt
    wire = GenerateRequest(id=pipeline.request_id, model=model, prompt=prompt)
    return await pipeline.serve(wire, Enqueue(model, client))


@get(
    "/api/v1/chat/stream/{client_id:str}", summary="Seed 002: a client's stream of its jobs", tags=["queued"]
)
async def stream(client_id: FromPath[str], request: Request[Any, Any, Any]) -> Stream:
    clients = _clients(request)
    previous = clients.pop(client_id, None)
    if previous is not None:  # a reconnect replaces the old stream (whose jobs it cancels)
        previous.close()
    client = clients[client_id] = Client()
    return Stream(_relay(clients, client_id, client), media_type="text/event-stream", headers=SSE_HEADERS)


async def _relay(clients: dict[str, Client], client_id: str, client: Client) -> AsyncIterator[bytes]:
    try:
        yield b": connected\n\n"
        while True:
            try:
                source = await asyncio.wait_for(client.jobs.get(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keepalive\n\n"
                continue
            client.current = source
            job = Job("", streams=True)
            job.request_id = source.request_id
            try:
                async for batch in source.batches():
                    chunk = job.frame(batch)
                    if chunk:
                        yield chunk
                    if job.ended:
                        break
            finally:
                source.close()
                client.current = None
    finally:
        client.close()
        with contextlib.suppress(KeyError):
            if clients[client_id] is client:
                del clients[client_id]


ROUTES = [submit, stream]
