"""Where the response cache keeps its answers: one NATS KV bucket every edge replica shares.

An entry is a request's events as the worker published them (raw JSON, `start` to `done`), with
when it was stored (its TTL counts from then) and when it was last served. The bucket drops its
oldest writes when full (`discard: old`), and a hit re-writes an entry it has not re-written for
`TOUCH_S`, so the entries that go first are the least recently used: an LRU bounded by bytes.

Keys: `x.<tenant>.<digest>` for answers, `v.<tenant>.<digest>` for the semantic cache's vectors
(services/edge/semantic_cache.py); `<tenant>` is a tag of the tenant's name, so a tenant's
entries are one subject filter (its purge, its count).

The cache is best effort: a NATS hiccup is a miss or an unstored answer, never a failed request.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from contracts import subjects
from services.runtime import bus, cache_bucket
from services.runtime.settings import Settings

log = logging.getLogger("llmbus.edge")

BUCKET = subjects.RESPONSE_CACHE_BUCKET
STREAM = f"KV_{BUCKET}"
TOUCH_S = 60.0  # a hit re-writes its entry (LRU) at most this often


class Entry(msgspec.Struct, omit_defaults=True):
    """A cached answer: its events in order, ending with `done`."""

    stored_at: float  # Unix seconds; the TTL counts from here, however often it is served
    touched_at: float  # the last re-write (a hit moves it to the bucket's newest end)
    model: str
    events: list[msgspec.Raw]


class Plan(msgspec.Struct):
    """One request's cache decision: its key, and whether to look for a similar question."""

    key: str
    semantic: bool
    tenant: str
    scope: str = ""  # what besides the text must match for a semantic hit
    text: str = ""
    vector: Any = None  # the question's embedding, once computed (stored with a miss's answer)


_encode = msgspec.json.Encoder().encode
_decode_entry = msgspec.json.Decoder(Entry).decode


def tenant_tag(tenant: str) -> str:
    """A tenant's key segment: its name hashed (names may hold characters keys may not)."""
    return "anon" if not tenant else hashlib.blake2b(tenant.encode(), digest_size=6).hexdigest()


def cache_stream(settings: Settings) -> StreamConfig:
    """The bucket's stream: its oldest entries dropped when full, each forgotten after the TTL."""
    return cache_bucket.cache_stream(
        BUCKET,
        ttl_s=settings.response_cache_ttl_s,
        max_bytes=settings.response_cache_max_bytes,
        replicas=settings.stream_replicas,
    )


class CacheStore:
    def __init__(self, js: JetStreamContext, settings: Settings) -> None:
        self.js = js
        self.ttl_s = settings.response_cache_ttl_s
        self.max_entry_bytes = settings.response_cache_max_entry_bytes
        self.settings = settings
        self.kv: KeyValue | None = None
        self._warned = False

    async def start(self) -> CacheStore:
        await bus.ensure_stream(self.js, cache_stream(self.settings))
        self.kv = await self.js.key_value(BUCKET)
        return self

    async def get(self, key: str) -> Entry | None:
        """The entry, if stored and within its TTL (a hit that has not been re-written for a while
        is re-written, so it counts as recently used)."""
        raw = await self.get_raw(key)
        if raw is None:
            return None
        try:
            entry = _decode_entry(raw)
        except msgspec.DecodeError:
            return None
        now = time.time()
        if now - entry.stored_at > self.ttl_s:
            return None
        if now - entry.touched_at > TOUCH_S:
            await self.put_raw(key, _encode(msgspec.structs.replace(entry, touched_at=now)))
        return entry

    async def get_raw(self, key: str) -> bytes | None:
        if self.kv is None:
            return None
        try:
            found = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        except Exception as exc:
            self._warn(f"response cache lookup failed, asking the model: {exc!r}")
            return None
        return found.value or None

    async def put(self, key: str, model: str, events: list[bytes]) -> int:
        """Stores the answer; its size in bytes, or 0 when it is too big or could not be stored."""
        now = time.time()
        value = _encode(Entry(now, now, model, [msgspec.Raw(data) for data in events]))
        if len(value) > self.max_entry_bytes:
            return 0
        return len(value) if await self.put_raw(key, value) else 0

    async def put_raw(self, key: str, value: bytes) -> bool:
        if self.kv is None:
            return False
        try:
            await self.kv.put(key, value)
        except Exception as exc:
            self._warn(f"response cache write failed: {exc!r}")
            return False
        return True

    async def purge(self, tenant: str | None) -> int:
        """Drops a tenant's entries (None: every tenant's); how many there were."""
        entries, _ = await self.stats(tenant)
        pattern = f"$KV.{BUCKET}.*.{tenant_tag(tenant)}.>" if tenant is not None else None
        await self.js.purge_stream(STREAM, subject=pattern)
        return entries

    async def stats(self, tenant: str | None) -> tuple[int, int | None]:
        """(answers stored, bytes): a tenant's answers (its bytes are not kept apart: None), or
        the whole bucket's."""
        if tenant is None:
            info = await self.js.stream_info(STREAM)
            return info.state.messages, info.state.bytes
        info = await self.js.stream_info(STREAM, subjects_filter=f"$KV.{BUCKET}.x.{tenant_tag(tenant)}.>")
        return len(info.state.subjects or {}), None

    def _warn(self, message: str) -> None:
        # Once, then at debug: an outage would otherwise log a line per request.
        with contextlib.suppress(Exception):
            log.log(logging.DEBUG if self._warned else logging.WARNING, message)
        self._warned = True
