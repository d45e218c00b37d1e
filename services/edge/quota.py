"""Per-tenant limits shared by every edge replica: one NATS KV entry per tenant, changed by CAS.

The entry `t.<tenant>` in the `llm_admission` bucket holds the tenant's current one-minute window
(requests and tokens counted in it) and its in-flight leases (lease id -> expiry). Admitting a
request reads the entry, checks the limits and writes it back with `update(last=revision)`; a
write that lost a race to another edge is retried on the new value, so no two edges can both take
the last slot. A lease expires `lease_ttl_s` after its last renewal; each edge renews the leases it
holds every third of that, so the slots of an edge that crashed come free on their own.

The same entry holds the tenant's budget reservations (`reserved`: lease id -> tokens, expiry): the
tokens each admitted request may use, counted as spent by the budget check until the ledger's
totals have them (`reserve`, `settle`). Reserving is the same read and conditional write, so two
edges cannot both give away the last of a budget.

Why one entry per tenant: admitting is then one read and one conditional write, and releasing
(which also adds the answer's tokens) is the same; contention is only between the requests of one
tenant. Why fixed one-minute windows: one counter, exact, and `Retry-After` is simply the time to
the next minute (a burst of up to twice the limit across a minute boundary is the known price).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import msgspec
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from contracts import ErrorCode, LlmbusError, subjects
from services.edge.tenants import Tenant
from services.runtime import bus

log = logging.getLogger(__name__)

WINDOW_S = 60
CAS_ATTEMPTS = 20
INFLIGHT_RETRY_S = 1.0  # Retry-After when every in-flight slot is taken
INFLIGHT_RECHECK_S = 0.05  # how long this edge trusts that without looking again
# An ended request's tokens stay reserved this long, until the ledger's totals count them (its lag
# is milliseconds: docs/benchmarks.md "Ledger"); a ledger further behind lets the overshoot grow.
HOLD_S = 2.0


class TenantState(msgspec.Struct, omit_defaults=True):
    window: int = 0  # minute number (Unix seconds // 60)
    requests: int = 0
    tokens: int = 0
    leases: dict[str, float] = {}  # lease id -> Unix seconds it expires
    reserved: dict[str, tuple[int, float]] = {}  # lease id -> (tokens, Unix seconds it expires)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(TenantState).decode


async def open_bucket(js: JetStreamContext) -> KeyValue:
    return await bus.key_value(
        js,
        KeyValueConfig(
            bucket=subjects.ADMISSION_BUCKET,
            description="llmbus admission: t.<tenant> -> this minute's requests/tokens, in-flight leases",
            history=1,
            ttl=3600,  # a tenant idle for an hour starts afresh
            storage=StorageType.MEMORY,  # counters, not records: a restart of NATS may forget them
        ),
    )


def _key(tenant: Tenant) -> str:
    return f"t.{tenant.name}"


class Quota:
    """Admits and releases requests against tenants' limits, through the shared KV entries."""

    def __init__(self, kv: KeyValue, lease_ttl_s: float) -> None:
        self.kv = kv
        self.lease_ttl_s = lease_ttl_s
        self._locks: dict[str, asyncio.Lock] = {}  # one change per tenant at a time from this edge
        self._held: dict[str, tuple[Tenant, set[str]]] = {}  # leases this edge holds, per tenant
        self._renewer: asyncio.Task[None] | None = None
        # A refused tenant is refused again here without a KV round trip, so a client hammering
        # past its limits costs almost nothing: until the next minute for a per-minute limit
        # (counts only grow within a window), briefly or until this edge frees a slot for in-flight.
        self._refused: dict[str, tuple[float, LlmbusError]] = {}  # tenant -> (monotonic until, why)

    async def acquire(self, tenant: Tenant, lease: str) -> None:
        """Counts one request and takes an in-flight slot; raises `rate_limited` over a limit."""
        refused = self._refused.get(tenant.name)
        if refused is not None:
            left = refused[0] - time.monotonic()
            if left > 0:
                inflight = refused[1].retry_after == INFLIGHT_RETRY_S
                retry_after = INFLIGHT_RETRY_S if inflight else left
                raise LlmbusError(ErrorCode.RATE_LIMITED, refused[1].message, retry_after=retry_after)
            del self._refused[tenant.name]
        refusal: LlmbusError | None = None

        def admit(state: TenantState, now: float) -> bool:
            nonlocal refusal
            to_next_minute = WINDOW_S - now % WINDOW_S
            if tenant.requests_per_minute and state.requests >= tenant.requests_per_minute:
                refusal = _limited(f"{tenant.requests_per_minute} requests per minute", to_next_minute)
            elif tenant.tokens_per_minute and state.tokens >= tenant.tokens_per_minute:
                refusal = _limited(f"{tenant.tokens_per_minute} tokens per minute", to_next_minute)
            elif tenant.max_inflight and len(state.leases) >= tenant.max_inflight:
                refusal = _limited(f"{tenant.max_inflight} requests in flight", INFLIGHT_RETRY_S)
            if refusal is not None:
                return False
            state.requests += 1
            if tenant.max_inflight:
                state.leases[lease] = now + self.lease_ttl_s
            return True

        await self._change(tenant, admit)
        if refusal is not None:
            per_minute = refusal.retry_after != INFLIGHT_RETRY_S
            hold = (refusal.retry_after or 0) if per_minute else INFLIGHT_RECHECK_S
            self._refused[tenant.name] = (time.monotonic() + hold, refusal)
            raise refusal
        if tenant.max_inflight:
            self._held.setdefault(tenant.name, (tenant, set()))[1].add(lease)
            if self._renewer is None or self._renewer.done():
                self._renewer = asyncio.create_task(self._renew())

    async def reserve(self, tenant: Tenant, lease: str, tokens: int, check: Callable[[int], None]) -> None:
        """Reserves `tokens` for the request `lease` against the tenant's budget; `check(reserved)`
        raises (`budget_exceeded`) when what every edge reserved, with the ledger's totals, spent it."""
        refusal: LlmbusError | None = None

        def take(state: TenantState, now: float) -> bool:
            nonlocal refusal
            try:
                check(sum(tokens for tokens, _ in state.reserved.values()))
            except LlmbusError as exc:
                refusal = exc
                return False
            state.reserved[lease] = (tokens, now + self.lease_ttl_s)
            return True

        await self._change(tenant, take)
        if refusal is not None:
            raise refusal
        self._held.setdefault(tenant.name, (tenant, set()))[1].add(lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew())

    async def settle(self, tenant: Tenant, lease: str, used: int) -> None:
        """The request ended having used `used` tokens: its reservation becomes that, for `HOLD_S`."""
        self._drop_held(tenant, lease)

        def end(state: TenantState, now: float) -> bool:
            if used > 0:
                state.reserved[lease] = (used, now + HOLD_S)
            else:
                state.reserved.pop(lease, None)
            return True

        await self._change(tenant, end)

    def _drop_held(self, tenant: Tenant, lease: str) -> None:
        held = self._held.get(tenant.name)
        if held is not None:
            held[1].discard(lease)
            if not held[1]:
                del self._held[tenant.name]

    async def release(self, tenant: Tenant, lease: str, tokens: int) -> None:
        """Frees the slot and counts the answer's tokens in the current minute."""
        refused = self._refused.get(tenant.name)
        if refused is not None and refused[1].retry_after == INFLIGHT_RETRY_S:
            del self._refused[tenant.name]  # a slot comes free: look again
        self._drop_held(tenant, lease)
        if not tenant.max_inflight and not (tenant.tokens_per_minute and tokens):
            return

        def free(state: TenantState, now: float) -> bool:
            state.leases.pop(lease, None)
            state.tokens += tokens
            return True

        await self._change(tenant, free)

    async def _change(self, tenant: Tenant, change: object) -> None:
        """Read, change, write back only if nobody wrote in between; else again on the new value."""
        assert callable(change)
        key = _key(tenant)
        lock = self._locks.setdefault(tenant.name, asyncio.Lock())
        async with lock:
            for _ in range(CAS_ATTEMPTS):
                try:
                    entry = await self.kv.get(key)
                    revision: int | None = entry.revision
                    state = _decode(entry.value) if entry.value else TenantState()
                except KeyNotFoundError:
                    revision, state = None, TenantState()
                now = time.time()
                minute = int(now // WINDOW_S)
                if state.window != minute:
                    state.window, state.requests, state.tokens = minute, 0, 0
                state.leases = {lid: until for lid, until in state.leases.items() if until > now}
                state.reserved = {lid: r for lid, r in state.reserved.items() if r[1] > now}
                if not change(state, now):
                    return
                try:
                    if revision is None:
                        await self.kv.create(key, _encode(state))
                    else:
                        await self.kv.update(key, _encode(state), last=revision)
                    return
                except KeyWrongLastSequenceError:
                    await asyncio.sleep(random.uniform(0, 0.005))  # another edge wrote first
        raise LlmbusError(
            ErrorCode.BACKEND_UNAVAILABLE, "admission counters are too contended", retry_after=1
        )

    async def _renew(self) -> None:
        """Pushes the expiry of every lease this edge holds, every third of the lease TTL."""
        while self._held:
            await asyncio.sleep(self.lease_ttl_s / 3)
            for tenant, leases in list(self._held.values()):
                mine = set(leases)

                def extend(
                    state: TenantState, now: float, mine: set[str] = mine, tenant: Tenant = tenant
                ) -> bool:
                    for lid in mine:
                        if tenant.max_inflight:
                            state.leases[lid] = now + self.lease_ttl_s
                        if lid in state.reserved:
                            state.reserved[lid] = (state.reserved[lid][0], now + self.lease_ttl_s)
                    return True

                try:
                    await self._change(tenant, extend)
                except Exception as exc:  # the next round tries again; leases last 3 rounds
                    log.warning("could not renew in-flight leases of tenant %s: %s", tenant.name, exc)

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer


def _limited(what: str, retry_after: float) -> LlmbusError:
    return LlmbusError(ErrorCode.RATE_LIMITED, f"over this key's limit of {what}", retry_after=retry_after)
