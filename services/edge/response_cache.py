"""The response cache: a reproducible request answered again from its stored events.

`ResponseCache.open` is the answer pipeline's one hook (services/edge/serve.py), so every API
(native, OpenAI, Ollama) gets it the same way. A request is cacheable when its answer can be
reproduced (`temperature: 0` or a `seed`, or the client forces it) and nothing attaches it to an
earlier request (idempotency keys, deferred streams, resumes). Its key hashes the whole wire
request but its id (so a field added to `GenerateRequest` is part of the key by construction),
scoped to the tenant. A hit is replayed as the worker's own events (`start` with this request's
id, ..., `done` with `cached: true` and the replay's timings) and never reaches a model; a miss
runs as usual and its events are stored once it ends with `done` (errors and restarted answers
never are). Mode, most specific first: the `Llmbus-Cache` header or the body's `cache`, the
tenant's `cache`, then `LLMBUS_RESPONSE_CACHE` (docs/cache.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec
from nats.aio.client import Client

from contracts import (
    Done,
    ErrorCode,
    EventHead,
    GenerateRequest,
    LlmbusError,
    Routed,
    Start,
    headers,
    subjects,
)
from contracts.messages import Timings
from contracts.models import UsageEvent
from contracts.route import is_routed, route_name
from contracts.usage import CACHE_HOST, Origin
from services.edge.admission import Ticket
from services.edge.cache_store import CacheStore, Entry, Plan, tenant_tag
from services.edge.dispatch import Dispatcher
from services.edge.feed import EventFeed, in_background
from services.edge.outcome import Outcome
from services.edge.semantic_cache import SemanticCache, semantic_scope, semantic_text
from services.edge.tenants import ANONYMOUS, Tenant
from services.runtime import metrics
from services.runtime.events import RawEvent
from services.runtime.settings import Settings

if TYPE_CHECKING:
    from services.edge.serve import Source, Wire

MODES = ("off", "exact", "semantic", "force")
_VERSION = b"llmbus-cache-v1\0"  # bump to orphan every entry when the key or entry changes

_canonical = msgspec.json.Encoder(order="sorted").encode  # dict keys sorted: one key per content
_encode = msgspec.json.Encoder().encode
_decode_head = msgspec.json.Decoder(EventHead).decode
_decode_routed = msgspec.json.Decoder(Routed).decode
_decode_start = msgspec.json.Decoder(Start).decode
_decode_done = msgspec.json.Decoder(Done).decode


def request_key(request: GenerateRequest, tenant: str) -> str:
    """`x.<tenant>.<digest>`: the whole request but its id, dictionaries in sorted order."""
    digest = hashlib.blake2b(_VERSION + _canonical(msgspec.structs.replace(request, id="-")), digest_size=20)
    return f"x.{tenant_tag(tenant)}.{digest.hexdigest()}"


def reproducible(request: GenerateRequest) -> bool:
    """The answer is the same each time: greedy decoding, or a fixed seed."""
    options = request.options
    return options.temperature == 0 or options.seed is not None


def semantic_allowed(request: GenerateRequest) -> bool:
    """A similar question may share an answer: no tools, no images, greedy decoding."""
    if request.tools or request.images or any(m.images for m in request.messages or ()):
        return False
    return request.options.temperature == 0


class ResponseCache:
    def __init__(
        self,
        nc: Client,
        store: CacheStore,
        settings: Settings,
        semantic: SemanticCache | None,
        route_mode: Callable[[str], str] = lambda name: "",
    ) -> None:
        self.nc = nc
        self.route_mode = route_mode  # a route's `cache` in the routes file ("": not set)
        self.store = store
        self.default: str = settings.response_cache
        self.semantic = semantic
        self.settings = settings
        self.counts: dict[tuple[str, str], int] = {}  # (kind, result): this edge's lookups

    @classmethod
    async def start(cls, nc: Client, settings: Settings, route_mode: Callable[[str], str]) -> ResponseCache:
        """Opens the bucket (created if missing) and the semantic cache's watch of its vectors."""
        js = nc.jetstream()
        store = await CacheStore(js, settings).start()
        semantic = await SemanticCache(store, settings).start(js)
        return cls(nc, store, settings, semantic, route_mode)

    async def stop(self) -> None:
        if self.semantic is not None:
            await self.semantic.stop()

    def plan(self, wire: Wire, tenant: Tenant, mode: str | None, submit: dict[str, Any]) -> Plan | None:
        """Whether (and how) this request uses the cache; None: it runs as if there were none."""
        if not isinstance(wire, GenerateRequest):
            return None  # embeddings have their own cache (the embedder's)
        if submit.get("idempotent") or submit.get("detached") or submit.get("after", -1) >= 0:
            return None  # attached to an earlier request, whose events it must follow
        if mode is not None and mode not in MODES:
            raise LlmbusError(ErrorCode.BAD_REQUEST, f"`{headers.CACHE}` must be one of {', '.join(MODES)}")
        named = route_name(wire.model) if is_routed(wire.model) else None  # `route:NAME`, not `auto`
        mode = mode or tenant.cache or (self.route_mode(named) if named else "") or self.default
        if mode == "off" or not (mode == "force" or reproducible(wire)):
            return None
        semantic = self.semantic is not None and mode in ("semantic", "force")
        semantic = semantic and (mode == "force" or semantic_allowed(wire))
        plan = Plan(request_key(wire, tenant.name), semantic, tenant.name)
        if semantic:
            plan.scope, plan.text = semantic_scope(wire, tenant.name), semantic_text(wire)
        return plan

    async def open(
        self, dispatcher: Dispatcher, wire: Wire, mode: str | None, submit: dict[str, Any]
    ) -> Source:
        """A replay of the stored answer, the request submitted with its events recorded (a
        miss), or just submitted (not cacheable)."""
        started = time.perf_counter()
        plan = self.plan(wire, submit.get("tenant", ANONYMOUS), mode, submit)
        if plan is None:
            return await dispatcher.submit(wire, **submit)
        assert isinstance(wire, GenerateRequest)
        kind = "exact"
        entry = await self.store.get(plan.key)
        if entry is None and plan.semantic and self.semantic is not None:
            kind = "semantic"
            entry = await self.semantic.find(dispatcher, plan)
        tenant: Tenant = submit.get("tenant", ANONYMOUS)
        if entry is None:
            self._count("semantic" if plan.semantic else "exact", "miss")
            return Recording(await dispatcher.submit(wire, **submit), self, plan, wire.model)
        ticket = None
        if dispatcher.admission is not None:  # a hit answers only what the tenant may ask, and counts
            dispatcher.admission.check_model(wire.model, tenant)
            ticket = await dispatcher.admission.hold(tenant)
        self._count(kind, "hit")
        replay = Replay(wire.id, entry, started, kind, ticket)
        if dispatcher.on_accepted is not None:  # the request metrics follow it as they follow a feed
            dispatcher.on_accepted(cast(EventFeed, replay), wire.model)
        origin: Origin = submit.get("origin") or Origin(tenant=tenant.name)
        in_background(self._usage(replay, wire, origin))
        return replay

    def _count(self, kind: str, result: str) -> None:
        metrics.CACHE_LOOKUPS.labels(kind, result).inc()
        self.counts[kind, result] = self.counts.get((kind, result), 0) + 1

    async def stats(self, tenant: str | None) -> dict[str, Any]:
        """`GET /v1/cache`: what is stored (shared by every edge) and this edge's hit rates."""
        entries, size = await self.store.stats(tenant)
        lookups = {}
        for kind in ("exact", "semantic"):
            hits, misses = self.counts.get((kind, "hit"), 0), self.counts.get((kind, "miss"), 0)
            rate = round(hits / (hits + misses), 4) if hits + misses else None
            lookups[kind] = {"hits": hits, "misses": misses, "hit_rate": rate}
        settings = self.settings
        return {
            "tenant": tenant,  # None: the whole bucket (answers and vectors)
            "entries": entries,
            "bytes": size,
            "max_bytes": settings.response_cache_max_bytes,
            "ttl_s": settings.response_cache_ttl_s,
            "mode": settings.response_cache,
            "semantic_threshold": settings.semantic_threshold,
            "lookups": lookups,  # since this edge started; /metrics has them for every replica
        }

    async def remember(self, plan: Plan, model: str, events: list[RawEvent]) -> None:
        size = await self.store.put(plan.key, model, [data for _, data in events])
        if size:
            metrics.CACHE_STORED_BYTES.inc(size)
            if plan.semantic and self.semantic is not None:
                await self.semantic.add(plan)

    async def _usage(self, replay: Replay, wire: GenerateRequest, origin: Origin) -> None:
        """The ledger's row for a hit: `host` is `cache`, no model tokens spent."""
        await replay.ended.wait()
        now = time.time()
        model = replay.routed.model if replay.routed is not None else replay.entry.model
        report = UsageEvent(
            model=model,
            kind="generate",
            request_id=wire.id,
            at=now,
            outcome="done",
            duration_ms=round((time.perf_counter() - replay.started) * 1000, 3),
            tenant=origin.tenant,
            key_id=origin.key_id,
            api=origin.api,
            requested_model=wire.model,
            route=origin.route,
            host=CACHE_HOST,
            accepted_at=now,
        )
        hdrs = {headers.MSG_ID: f"{wire.id}.usage"}
        await self.nc.publish(subjects.usage_subject(model), _encode(report), headers=hdrs)


class Replay:
    """A hit as an event source: the stored events in one batch, `start` renamed to this request,
    `done` marked `cached` with the replay's own timings. Quacks like an `EventFeed` for the
    request metrics (`outcome`, `first_token_at`, `routed`)."""

    cache_status = "hit"

    def __init__(
        self, request_id: str, entry: Entry, started: float, kind: str, ticket: Ticket | None
    ) -> None:
        self.request_id = request_id
        self.entry = entry
        self.started = started
        self.cache_status = "hit" if kind == "exact" else "semantic"
        self.finished = True
        self.nothing_after = False
        self.outcome: Outcome | None = None
        self.first_token_at: float | None = None
        self.routed: Any = None
        self.ended = asyncio.Event()
        self._ticket = ticket

    async def batches(self) -> AsyncIterator[list[RawEvent]]:
        out: list[RawEvent] = []
        first_token: float | None = None
        for raw in self.entry.events:
            data = bytes(raw)
            head = _decode_head(data)
            if head.type == "start":
                data = _encode(msgspec.structs.replace(_decode_start(data), request_id=self.request_id))
            elif head.type == "token" and first_token is None:
                first_token = time.perf_counter()
            elif head.type == "done":
                done = _decode_done(data)
                now = time.perf_counter()
                timings = Timings(
                    total_ms=round((now - self.started) * 1000, 3),
                    ttft_ms=round(((first_token or now) - self.started) * 1000, 3),  # microseconds show
                    tokens_per_s=done.timings.tokens_per_s,
                )
                data = _encode(msgspec.structs.replace(done, cached=True, timings=timings))
                self.outcome = Outcome("done", data)
            elif head.type == "routed":
                self.routed = _decode_routed(data)  # logs and metrics name the model that answered
            out.append((head, data))
        self.first_token_at = first_token or time.perf_counter()
        yield out

    def close(self) -> None:
        if self._ticket is not None:
            ticket, self._ticket = self._ticket, None
            ticket.give_back(0)  # no model tokens spent
        self.ended.set()


class Recording:
    """A miss's event source: the feed's batches, passed on, and its events kept; once it ends with
    `done` (no error, no restart) they are stored in the background."""

    cache_status = "miss"

    def __init__(self, source: Source, cache: ResponseCache, plan: Plan, model: str) -> None:
        self.source = source
        self.request_id = source.request_id
        self.cache = cache
        self.plan = plan
        self.model = model
        self.events: list[RawEvent] = []
        self.clean = True

    def __getattr__(self, name: str) -> Any:  # the feed's other attributes (`nothing_after`, ...)
        return getattr(self.source, name)

    async def batches(self) -> AsyncIterator[list[RawEvent]]:
        async for batch in self.source.batches():
            if self.clean:
                self._keep(batch)
            yield batch

    def _keep(self, batch: list[RawEvent]) -> None:
        for head, data in batch:
            if head.type in ("restart", "error") or head.seq != len(self.events):
                self.clean = False  # never store an answer that failed, restarted or has a gap
                self.events.clear()
                return
            self.events.append((head, data))
            if head.type == "done":
                self.clean = False  # stored once
                events, self.events = self.events, []
                in_background(self.cache.remember(self.plan, self.model, events))
                return

    def close(self) -> None:
        self.source.close()
