"""The ledger's read API: a NATS micro service (`llmbus-ledger`) on `llm.ledger.<verb>`.

Replies are JSON structs from `contracts.ledger`; a failure is a micro-service error
(`Nats-Service-Error-Code` = the HTTP status) with an `ErrorBody`, as the janitor's admin API does.
Scoping a query to a tenant is the caller's job (the edge does it from the API key).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.micro
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.micro.request import Request
from nats.micro.service import Service
from sqlalchemy.ext.asyncio import AsyncEngine

from contracts import ErrorCode, LlmbusError, subjects
from contracts.ledger import LEDGER_VERBS, ForgetQuery, HistoryQuery, RecordRef, StatsQuery, UsageQuery
from services.ledger import consumer, queries
from services.runtime.micro import respond_error

log = logging.getLogger("llmbus.ledger")

_encode = msgspec.json.Encoder().encode
Run = Callable[[AsyncEngine, Any], Awaitable[msgspec.Struct]]
_QUERIES: dict[str, tuple[type[Any], Run]] = {
    "usage": (UsageQuery, queries.usage),
    "stats": (StatsQuery, queries.stats),
    "history": (HistoryQuery, queries.history),
    "record": (RecordRef, queries.record),
}
Erase = Callable[[AsyncEngine, Any], Awaitable[tuple[msgspec.Struct, list[int]]]]
_ERASURES: dict[str, tuple[type[Any], Erase]] = {
    "erase": (RecordRef, queries.erase),
    "forget": (ForgetQuery, queries.forget),
}


def _erasing(js: JetStreamContext, erase: Erase) -> Run:
    """An erasure that also deletes the erased prompts' usage events from LLM_USAGE."""

    async def run(engine: AsyncEngine, query: Any) -> msgspec.Struct:
        result, seqs = await erase(engine, query)
        await consumer.forget_events(js, seqs)
        return result

    return run


def _endpoint(
    engine: AsyncEngine, kind: type[Any], run: Run, verb: str
) -> Callable[[Request], Awaitable[None]]:

    async def handle(request: Request) -> None:
        try:
            try:
                query = msgspec.json.decode(request.data or b"{}", type=kind)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise LlmbusError(ErrorCode.BAD_REQUEST, f"malformed {verb} query: {exc}") from None
            result = await run(engine, query)
        except LlmbusError as exc:
            await respond_error(request, exc.code, exc.message)
            return
        except Exception as exc:  # the database is down, most likely: say so, no stack trace
            log.error("ledger %s failed: %s", verb, exc)
            await respond_error(
                request, ErrorCode.LEDGER_UNAVAILABLE, f"the ledger's database failed: {verb}"
            )
            return
        await request.respond(_encode(result))

    return handle


async def serve(
    nc: Client, engine: AsyncEngine, database: str, stats: Callable[[], dict[str, Any]] | None = None
) -> Service:
    """`stats`: the ledger's own figures, in each endpoint's `data` of `$SRV.STATS.llmbus-ledger`."""
    service = await nats.micro.add_service(
        nc,
        name="llmbus-ledger",
        version="0.1.0",
        description="llmbus ledger: usage, statistics and history of every request",
        metadata={"database": database},
        stats_handler=(lambda _endpoint: stats()) if stats is not None else None,
    )
    js = nc.jetstream()
    for verb in LEDGER_VERBS:
        if verb in _ERASURES:
            kind, erase = _ERASURES[verb]
            run = _erasing(js, erase)
        else:
            kind, run = _QUERIES[verb]
        await service.add_endpoint(
            name=verb,
            subject=subjects.LEDGER_PREFIX + verb,
            handler=_endpoint(engine, kind, run, verb),
            queue_group="ledger",
        )
    return service
